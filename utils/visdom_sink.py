"""Live visdom dashboards for training and search runs, fed by ``RunLogger`` records.

``RunLogger.record`` hands every JSONL row to ``VisdomSink.record``, which only queues it: a
background thread turns rows into plot updates (``Dashboard``), writes them to visdom's own log
(``logs/{name}.visdom``) and posts them. A missing, dead, hung or wrong server therefore never
stops or slows a run: the first failed request prints one warning and the sink goes on writing
the log without posting. Rows that queue up while a slow server catches up are sent together, one
request per trace; rows that arrive while ``max_queue`` rows wait are only written to the log
(counted), so the log always holds every plot.
``python -m utils.plot --replay logs/{name}.visdom`` plays visdom's log into a server later.

Windows have fixed ids, so a resumed run appends to the panes of the run it continues; a run that
starts from scratch first clears its own traces (other legends in the env are kept). Which one a
run is, its ``run`` record says (``utils.logger.run_start``).
"""
from __future__ import annotations

import argparse
import html
import itertools
import json
import math
import queue
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

import requests
import visdom

from .logger import Sink, run_start

Message = tuple[str, dict]  # (visdom endpoint, request body)

# record field: (pane, trace suffix), for step rows (against the global step) and epoch rows (at
# the last step of the epoch).
STEP_SERIES = {"loss": ("loss", "train"), "top1": ("top1", "train"), "lr": ("lr", ""), "img_s": ("img_s", "")}
EPOCH_SERIES = {"val_loss": ("loss", "val"), "val_top1": ("top1", "val"), "val_top1_widest": ("top1", "val widest"),
                "val_top1_middle": ("top1", "val middle"), "val_top1_narrowest": ("top1", "val narrowest")}
TRAINING_PANES = {  # pane: (title, x label, y label)
    "loss": ("loss (train: running mean over the epoch)", "step", "cross-entropy"),
    "top1": ("top-1 accuracy (train: running mean over the epoch)", "step", "top-1 (%)"),
    "lr": ("learning rate", "step", "lr"),
    "img_s": ("throughput", "step", "images / s"),
}
SEARCH_PANES = {
    "candidates": ("candidates", "MMac", "top-1 accuracy (%)"),
    "best": ("best so far", "iteration", "top-1 accuracy (%)"),
}
GENE_PANE_SIZE = (520, 400)  # pixels; plots keep visdom's default size, which its layout packs cleanly


def _finite(values: list[float]) -> list[float | None]:
    """Plotly's JSON has no NaN or infinity: such points become gaps."""
    return [v if v is not None and math.isfinite(v) else None for v in values]


class Dashboard:
    """Turns RunLogger rows into visdom messages; pure (no I/O), one instance per run.

    Training panes are shared by every run plotting to ``env`` (one trace per legend, to compare
    runs); search panes belong to one search (``name``: its budget), as their budget line does.
    """

    def __init__(self, env: str, legend: str, name: str) -> None:
        self.env, self.legend, self.name = env, legend, name
        # Set by the run's ``run`` record; without one, appending is the safe choice: a run that
        # cannot tell it started from scratch never clears what may be its own earlier points.
        self.fresh = False
        self.last_step: int | None = None  # epoch points are drawn at the last step of their epoch
        # Search panes are titled by the search; visdom's title bar hides a title that does not fit.
        self.search_tag = name.removeprefix("MetaPruneSearch_")
        self._windows: set[str] = set()
        self._traces: set[tuple[str, str]] = set()

    def updates(self, row: dict[str, Any]) -> list[Message]:
        """The messages that plot one record (none for kinds the dashboard does not show)."""
        kind = row.get("kind")
        start = run_start(row)
        if start is not None:
            self.fresh = start
            return []
        if kind == "step":
            self.last_step = row["step"]
            return [m for field, (pane, suffix) in STEP_SERIES.items()
                    for m in self._points(pane, f"{self.legend} {suffix}".strip(), [row["step"]], [row[field]])]
        if kind == "epoch" and self.last_step is not None:
            return [m for field, (pane, suffix) in EPOCH_SERIES.items() if field in row
                    for m in self._points(pane, f"{self.legend} {suffix}", [self.last_step], [row[field]],
                                          mode="lines+markers")]
        if kind == "search":
            return self._search(row)
        return []

    def window(self, pane: str) -> str:
        """The fixed window id of a pane (what a resumed run appends to)."""
        return f"{self.env}:{pane}" if pane in TRAINING_PANES else f"{self.env}:{self.name}:{pane}"

    def _layout(self, pane: str, extra: dict | None = None) -> tuple[dict, dict]:
        """Plotly layout and visdom options of a pane (the title goes in the pane's bar: on the plot
        itself, plotly's toolbar covers it)."""
        title, xlabel, ylabel = TRAINING_PANES.get(pane) or SEARCH_PANES[pane]
        layout = {"showlegend": pane not in SEARCH_PANES, "xaxis": {"title": xlabel}, "yaxis": {"title": ylabel},
                  "margin": {"l": 60, "r": 20, "t": 30, "b": 40},
                  "legend": {"orientation": "h", "x": 0, "y": -0.35, "yanchor": "top"}, **(extra or {})}
        return layout, {"title": f"{self.search_tag}: {title}" if pane in SEARCH_PANES else title}

    def _points(self, pane: str, trace: str, xs: list[float], ys: list[float], mode: str = "lines",
                marker: dict | None = None, layout: dict | None = None) -> list[Message]:
        """Append points to one named trace; the first write of a fresh run replaces the trace instead."""
        win = self.window(pane)
        data = {"x": xs, "y": _finite(ys), "name": trace, "type": "scatter", "mode": mode, "marker": marker or {}}
        msg = {"win": win, "eid": self.env, "name": trace, "data": [data], "layout": {}, "append": True}
        if win not in self._windows:
            # The first message of this process carries the layout: it creates the window when it is
            # missing (an append to an unknown window creates it) and re-titles it otherwise.
            self._windows.add(win)
            msg["layout"], msg["opts"] = self._layout(pane, layout)
        out = []
        if self.fresh and (win, trace) not in self._traces:
            # Clear the trace of an earlier run: an empty append creates window and trace if missing
            # (empty points are skipped), then a replace sets the new points.
            empty = {**data, "x": [], "y": []}
            if "color" in data["marker"]:
                empty["marker"] = {**data["marker"], "color": []}
            out.append(("update", {**msg, "data": [empty]}))
            msg = {**msg, "layout": {}, "append": False}
            msg.pop("opts", None)
        self._traces.add((win, trace))
        out.append(("update", msg))
        return out

    def _search(self, row: dict[str, Any]) -> list[Message]:
        cands, it = row["candidates"], row["iteration"]
        out = []
        budget = row["budget_macs"]
        shapes = {} if not budget else {
            "shapes": [{"type": "line", "xref": "x", "yref": "paper", "x0": budget / 1e6, "x1": budget / 1e6,
                        "y0": 0, "y1": 1, "line": {"color": "#d62728", "dash": "dash", "width": 2}}],
            "annotations": [{"x": budget / 1e6, "y": 1, "xref": "x", "yref": "paper", "showarrow": False,
                             "xanchor": "right", "yanchor": "top", "text": f"budget {budget / 1e6:.2f} MMac "}]}
        if cands:
            marker = {"color": [it] * len(cands), "colorscale": "Viridis", "showscale": True, "size": 8,
                      "colorbar": {"title": {"text": "iteration"}}, "line": {"width": 0.5, "color": "#333"}}
            out += self._points("candidates", self.legend, [c["macs"] / 1e6 for c in cands],
                                [100.0 - c["error"] for c in cands], mode="markers", marker=marker, layout=shapes)
        out += self._points("best", self.legend, [it], [100.0 - row["best_error"]], mode="lines+markers")
        budget_text = f"{budget / 1e6:.2f} MMac" if budget else "none"
        text = (f"<b>{html.escape(self.name)}</b>, iteration {it} ({row['scored']} scored)<br>"
                f"best: top-1 {100.0 - row['best_error']:.2f}% (error {row['best_error']:.2f}%), "
                f"{row['best_macs'] / 1e6:.2f} MMac, budget {budget_text}<br>"
                f"gene <code>{html.escape(json.dumps(row['best_gene']))}</code>"
                f"<pre style='font-size:11px'>{html.escape(row['best_table'])}</pre>")
        out.append(("events", {"win": self.window("gene"), "eid": self.env, "data": [{"content": text, "type": "text"}],
                               "opts": {"title": f"{self.search_tag}: best gene", "width": GENE_PANE_SIZE[0],
                                        "height": GENE_PANE_SIZE[1]}}))
        return out


def merged(messages: list[Message]) -> list[Message]:
    """The same plots in fewer requests: points appended to a trace join the trace's previous
    message of the batch (a server that lags behind gets one request per trace, not one per row)."""
    out: list[Message] = []
    last: dict[tuple[str, str], dict] = {}  # (window, trace) -> its latest message holding points
    for endpoint, msg in messages:
        key = (msg["win"], msg.get("name"))
        prev = last.get(key) if endpoint == "update" and msg["append"] else None
        if prev is not None:
            into, new = prev["data"][0], msg["data"][0]
            into["x"] += new["x"]
            into["y"] += new["y"]
            if "color" in new["marker"]:
                into["marker"]["color"] += new["marker"]["color"]
            continue
        out.append((endpoint, msg))
        has_points = endpoint == "update" and bool(msg["data"][0]["x"])
        last[key] = msg if has_points else None
    return out


_STOP = object()
BATCH_ROWS = 256  # rows plotted together (merged) when the server lags behind


class _Client(visdom.Visdom):
    """visdom's client with a time limit on every request (its own waits forever on a hung server)."""

    request_timeout: float

    def _handle_post(self, url: str, data: Any = None) -> str:
        r = self._session.post(url, data=data or {}, timeout=self.request_timeout)
        r.raise_for_status()
        return r.text


def open_client(server: str, port: int, env: str, log_file: Path | None = None,
                request_timeout: float = 2.0) -> _Client:
    """A visdom client that sends nothing until its first message; failed requests raise ConnectionError.

    Built with ``send=False`` and switched on after, visdom's constructor skips its own connection
    attempt (which would block the caller), its event socket and their warnings.
    """
    client = _Client(server=server, port=port, env=env, send=False, raise_exceptions=True,
                     use_incoming_socket=False, log_to_filename=None if log_file is None else str(log_file))
    client.send, client.request_timeout, client._session = True, request_timeout, requests.Session()
    return client


def failure(e: ConnectionError) -> str:
    """A short reason for a failed request (visdom's client wraps requests' exception)."""
    cause = e.__context__ or e
    if isinstance(cause, requests.Timeout):
        return "no answer in time"
    if isinstance(cause, requests.HTTPError):
        return f"HTTP {cause.response.status_code}"
    errno_text = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(cause))
    return errno_text.group(1).lower() if errno_text else str(cause)


def connect(client: _Client, env: str) -> None:
    """Open ``env`` on the server (posting to an env the server has not opened fails)."""
    client._send({"eid": env}, endpoint=f"env/{env}")


def points_only(endpoint: str, msg: dict) -> bool:
    """Whether a message only appends points to a trace that exists (creates, clears or re-titles
    nothing), so the live plot stays consistent without it."""
    return endpoint == "update" and msg["append"] and not msg["layout"]


class VisdomSink(Sink):
    """Queues RunLogger rows and plots them from a background thread (see the module docstring).

    ``record`` costs one non-blocking queue put; ``close`` lets the queue drain, posting for at most
    ``close_timeout`` seconds (the rest only goes to the visdom log), then stops the thread.
    """

    def __init__(self, dashboard: Dashboard, server: str, port: int, log_file: Path, resumed: bool | None = None,
                 request_timeout: float = 2.0, close_timeout: float = 5.0, max_queue: int = 10_000) -> None:
        super().__init__(resumed)
        self.dashboard, self.url, self.log_file = dashboard, f"{server}:{port}", log_file
        self.close_timeout, self.request_timeout, self.max_queue = close_timeout, request_timeout, max_queue
        log_file.parent.mkdir(parents=True, exist_ok=True)
        self.client = open_client(server, port, dashboard.env, log_file, request_timeout)
        self.online, self.dropped, self.warnings = False, 0, []
        self._record_lock = threading.Lock()
        # Unbounded: every row must reach the visdom log. Only posting is slow, and rows past
        # max_queue are not posted, so the backlog drains at the speed of writing the log.
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._deadline: float | None = None
        self._thread = threading.Thread(target=self._run, name="visdom-sink", daemon=True)
        self._thread.start()

    def record(self, row: dict[str, Any]) -> None:
        """Queue one row for plotting; never blocks. While ``max_queue`` rows wait, the row is only
        written to the visdom log (``dropped`` from the live plots)."""
        with self._record_lock:  # one check-and-put at a time: the count is exact whichever threads record
            post = self._queue.qsize() < self.max_queue
            if not post:
                self.dropped += 1
            self._queue.put((row, post))

    def close(self) -> None:
        """Plot what is queued (posting for at most ``close_timeout`` s) and stop the thread."""
        self._deadline = time.monotonic() + self.close_timeout
        self._queue.put(_STOP)
        # The deadline is checked before every request, so one request may start just before it.
        self._thread.join(self.close_timeout + self.request_timeout + 1.0)
        if self._thread.is_alive() and self.client.offline:
            # It only writes the visdom log now (nothing to wait on but the disk): let it finish, so
            # the log holds every plot however long the backlog.
            self._thread.join()
        if self.dropped and not self.client.offline:  # offline, its warning said the live plots stopped
            self._warn(f"{self.dropped} records were left out of the live plots (the server was too slow); "
                       f"they are in {self.log_file} (replay: python -m utils.plot --replay {self.log_file}) "
                       f"and in the JSONL log")
        self.client._session.close()

    def _warn(self, msg: str) -> None:
        self.warnings.append(msg)
        print(f"visdom: {msg}", file=sys.stderr, flush=True)

    def _go_offline(self, why: str) -> None:
        """Stop posting (warning once why); messages still go to the visdom log, for a replay."""
        self.online, self.client.offline = False, True
        self._warn(f"{why}; live plotting is off, the plots go to {self.log_file} only "
                   f"(replay: python -m utils.plot --replay {self.log_file}); the run goes on")

    def _run(self) -> None:
        try:
            connect(self.client, self.dashboard.env)
            self.online = True
        except ConnectionError as e:
            self._go_offline(f"no server at {self.url} ({failure(e)})")
        while True:
            items = [self._queue.get()]
            while items[-1] is not _STOP and len(items) < BATCH_ROWS:  # what queued up while posting
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            rows = [item for item in items if item is not _STOP]
            # Runs of posted and of log-only rows are merged separately, so the log keeps their order.
            for post, group in itertools.groupby(rows, key=lambda item: item[1]):
                for endpoint, msg in merged([m for row, _ in group for m in self.dashboard.updates(row)]):
                    self._emit(endpoint, msg, post)
            if items[-1] is _STOP:
                return

    def _emit(self, endpoint: str, msg: dict, post: bool) -> None:
        """Write one message to the visdom log and, unless it is a dropped row's points, post it."""
        if self.online and self._deadline is not None and time.monotonic() > self._deadline:
            self._go_offline(f"the server at {self.url} took longer than {self.close_timeout:g} s "
                             f"for the last plots")
        if not post and points_only(endpoint, msg):
            self.client._log(msg, endpoint)
            return
        try:
            self.client._send(msg, endpoint=endpoint)  # logs it, then posts it unless offline
        except ConnectionError as e:
            self._go_offline(f"lost the server at {self.url} ({failure(e)})")


def make_sink(args: argparse.Namespace, name: str, log_path: Path, env: str, resumed: bool) -> Sink:
    """The sink of a run, for the process that logs (rank 0): a VisdomSink with ``--visdom``,
    else one that plots nothing; either tells RunLogger whether the run continues its own
    checkpoint (``resumed``).

    Env ``--vis-env`` (default ``env``), legend ``--vis-legend`` (default ``name``); visdom's log is
    ``log_path`` with the suffix ``.visdom``.
    """
    if not args.visdom:
        return Sink(resumed)
    dashboard = Dashboard(args.vis_env or env, args.vis_legend or name, name)
    return VisdomSink(dashboard, args.vis_server, args.vis_port, Path(log_path).with_suffix(".visdom"), resumed=resumed)
