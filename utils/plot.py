"""Plots of a run without a visdom server, and replay of a run's dashboard into one.

    python -m utils.plot logs/RUN.jsonl [more.jsonl ...] --out DIR
        PNGs from RunLogger's JSONL logs: ``RUN_training.png`` (loss, top-1 train/val, learning
        rate and throughput against the step) for a training log, ``RUN_search.png`` (every
        scored candidate's top-1 accuracy against its MACs, colored by iteration, with the Pareto
        front and the budget; the best accuracy per iteration) for a search log.
    python -m utils.plot --replay logs/RUN.visdom [--vis-server URL] [--vis-port N]
        Plays visdom's own log of a ``--visdom`` run into a server: the dashboard as the run left it.

A log holds every run written under its name (runs append); the plots show the last run, with
the runs it was resumed from.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

import requests
from matplotlib.figure import Figure

from .cli import Parser, UserError, run_script, tcp_port
from .files import atomic_write, read_text
from .logger import run_start

MAX_DPI = 1000  # an 11 x 7 inch figure is then 11,000 x 7,000 pixels
MAX_PLOTTED = 1e100  # larger finite values are damage, not measurements (NaN and infinity are plotted as gaps)
VAL_SERIES = {"val_top1": "val", "val_top1_widest": "val widest", "val_top1_middle": "val middle",
              "val_top1_narrowest": "val narrowest"}
NUMBER = (int, float)
# The fields each record kind must have (RunLogger's rows), and optional ones, with their types.
REQUIRED: dict[str, dict[str, Any]] = {
    "run": {"resumed": bool},
    "step": {"epoch": int, "step": int, "loss": NUMBER, "top1": NUMBER, "lr": NUMBER, "img_s": NUMBER},
    "epoch": {"epoch": int},
    "search": {"iteration": int, "scored": int, "best_error": NUMBER, "best_macs": NUMBER, "candidates": list},
}
OPTIONAL: dict[str, dict[str, Any]] = {
    "epoch": dict.fromkeys(["val_loss", *VAL_SERIES], NUMBER),
    "search": {"budget_macs": (*NUMBER, type(None))},
}
CANDIDATE = {"error": NUMBER, "macs": NUMBER}


def _is(value: Any, kind: Any) -> bool:
    """isinstance, except that JSON's true/false are no numbers (bool subclasses int), and that a
    finite number beyond ``MAX_PLOTTED`` is none either (matplotlib's ticks overflow on such a range)."""
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        return False
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return True
    # NaN and infinity are drawn as gaps; an int is never either
    return abs(value) <= MAX_PLOTTED or (isinstance(value, float) and not math.isfinite(value))


def row_problem(row: dict[str, Any]) -> str | None:
    """What makes a record unusable for the plots (a missing field or one of the wrong type), or None."""
    kind = row["kind"]
    required = REQUIRED.get(kind, {})
    missing = [f for f in required if f not in row]
    if missing:
        return f"a {kind} record without {', '.join(missing)}"
    for fields in (required, OPTIONAL.get(kind, {})):
        for field, types in fields.items():
            if field in row and not _is(row[field], types):
                return f"the {kind} record's {field} is {json.dumps(row[field])[:40]}"
    if kind == "search":
        for c in row["candidates"]:
            if not isinstance(c, dict) or not all(_is(c.get(f), t) for f, t in CANDIDATE.items()):
                return f"a search candidate without a numeric error and macs: {json.dumps(c)[:40]}"
    return None


def json_lines(text: str, what: str, expected: str) -> list[tuple[int, Any]]:
    """(line number, value) of every line. A partial last line without its newline, which a run
    killed while appending leaves, is skipped; any other line that is not JSON is a UserError."""
    lines = text.splitlines()
    out = []
    for n, line in enumerate(lines, 1):
        try:
            out.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            if n == len(lines) and not text.endswith("\n"):
                break
            raise UserError(f"{what}:{n}: not a JSON line ({e.msg}); expected {expected}") from None
    return out


def read_log(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSONL log, checked field by field for their kind; a bad line is an error naming it."""
    expected = "a JSONL log of a run (logs/*.jsonl)"
    rows = []
    for n, row in json_lines(read_text(path, str(path), expected), str(path), expected):
        if not isinstance(row, dict) or not isinstance(row.get("kind"), str):
            raise UserError(f"{path}:{n}: expected a RunLogger record with a 'kind', got {json.dumps(row)[:60]}")
        problem = row_problem(row)
        if problem is not None:
            raise UserError(f"{path}:{n}: {problem}; expected {expected}")
        rows.append(row)
    return rows


def last_run(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of the last run started from scratch, and of the runs that resumed it.

    Each run's ``run`` record says which it is (``utils.logger.run_start``, the rule the live
    dashboard follows too); a log without a run from scratch is one run.
    """
    starts = [i for i, r in enumerate(rows) if run_start(r)]
    return rows[starts[-1]:] if starts else rows


def latest(rows: list[dict[str, Any]], kind: str, key: str) -> list[dict[str, Any]]:
    """Rows of ``kind`` sorted by ``key``; where a resumed run logged a key again, its row wins."""
    by_key = {r[key]: r for r in rows if r["kind"] == kind}
    return [by_key[k] for k in sorted(by_key)]


def training_figure(rows: list[dict[str, Any]], title: str) -> Figure:
    """Loss, top-1 (train running mean; validation at the last step of each epoch), lr and images/s."""
    rows = last_run(rows)
    steps, epochs = latest(rows, "step", "step"), latest(rows, "epoch", "epoch")
    if not steps:
        raise UserError(f"{title}: no step records to plot")
    epoch_end = {}  # the last step of every epoch: where its epoch-level points go
    for r in steps:
        epoch_end[r["epoch"] + 1] = r["step"]
    fig = Figure(figsize=(11, 7), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True).ravel()
    xs = [r["step"] for r in steps]
    for ax, field, label in zip(axes, ("loss", "top1", "lr", "img_s"),
                                ("loss (cross-entropy)", "top-1 accuracy (%)", "learning rate", "images / s")):
        ax.plot(xs, [r[field] for r in steps], lw=1.2, label="train" if field in ("loss", "top1") else None)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    val_series = [("val_loss", axes[0], "val")] + [(key, axes[1], name) for key, name in VAL_SERIES.items()]
    for key, ax, name in val_series:
        points = [(epoch_end[r["epoch"]], r[key]) for r in epochs if key in r and r["epoch"] in epoch_end]
        if points:
            ax.plot(*zip(*points), marker="o", ms=5, lw=1, label=name)
    for ax in axes[:2]:
        ax.legend(fontsize=8)
    for ax in axes[2:]:
        ax.set_xlabel("step")
    fig.suptitle(f"{title}: {len(epochs)} epochs, {xs[-1]} steps")
    return fig


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (cost, accuracy) points no cheaper-or-equal point beats: the best accuracy for a given cost."""
    front: list[tuple[float, float]] = []
    for cost, acc in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or acc > front[-1][1]:
            front.append((cost, acc))
    return front


def search_figure(rows: list[dict[str, Any]], title: str) -> Figure:
    """Every scored candidate (MMac vs top-1 accuracy, colored by iteration) with the Pareto front
    and the budget line, beside the best accuracy after each iteration."""
    iterations = latest(last_run(rows), "search", "iteration")
    if not iterations:
        raise UserError(f"{title}: no search records to plot")
    cands = [(c["macs"] / 1e6, 100.0 - c["error"], r["iteration"]) for r in iterations for c in r["candidates"]]
    fig = Figure(figsize=(12, 5), layout="constrained")
    ax, best_ax = fig.subplots(1, 2, width_ratios=(2.2, 1))
    if cands:  # a resumed search that only re-scored known genes logs none
        dots = ax.scatter([c[0] for c in cands], [c[1] for c in cands], c=[c[2] for c in cands], cmap="viridis",
                          s=22, alpha=0.85, edgecolors="none", label=f"{len(cands)} candidates")
        fig.colorbar(dots, ax=ax, label="iteration", pad=0.01)
        front = pareto_front([(c[0], c[1]) for c in cands])
        front.append((max(c[0] for c in cands), front[-1][1]))  # the best accuracy holds up to the largest cost
        ax.step(*zip(*front), where="post", color="black", lw=1.2, label="Pareto front")
    last = iterations[-1]
    ax.scatter([last["best_macs"] / 1e6], [100.0 - last["best_error"]], marker="*", s=220, color="#d62728",
               edgecolors="black", zorder=3, label="best")
    if last.get("budget_macs"):
        ax.axvline(last["budget_macs"] / 1e6, color="#d62728", ls="--", lw=1.5,
                   label=f"budget {last['budget_macs'] / 1e6:.2f} MMac")
    ax.set_xlabel("MMac")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    best_ax.plot([r["iteration"] for r in iterations], [100.0 - r["best_error"] for r in iterations], marker="o")
    best_ax.set_xlabel("iteration")
    best_ax.set_ylabel("best top-1 accuracy (%)")
    best_ax.grid(alpha=0.3)
    fig.suptitle(f"{title}: {len(iterations)} iterations, {last['scored']} genes scored")
    return fig


def figures(log: Path) -> list[tuple[str, Figure]]:
    """The figures a log has data for, each with its name's suffix (``training``, ``search``)."""
    rows = read_log(log)
    kinds = {r["kind"] for r in rows}
    out = []
    if "step" in kinds:
        out.append(("training", training_figure(rows, log.stem)))
    if "search" in kinds:
        out.append(("search", search_figure(rows, log.stem)))
    if not out:
        raise UserError(f"{log}: no step or search records to plot; expected a JSONL log of a run (logs/*.jsonl)")
    return out


def check_out(out_dir: Path) -> None:
    """``--out`` must be a folder, or a path where one can be made, that this process can write into
    (checked without creating anything)."""
    existing = out_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == out_dir else f"cannot be made: {existing} is a file"
        raise UserError(f"--out {out_dir}: {where}; give a folder for the PNGs")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--out {out_dir}: {existing} is not writable; give a writable folder")


def save(fig: Figure, path: Path, dpi: int) -> None:
    """Write one PNG through a temporary file, so that a killed or failed write keeps the previous one."""
    # a pyplot-free Figure renders with Agg: no backend switch
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))


def render(log: Path, out_dir: Path, dpi: int = 110) -> list[Path]:
    """Write the PNGs a log has data for; returns their paths."""
    made = figures(log)
    check_out(out_dir)
    written = []
    for suffix, fig in made:
        written.append(out_dir / f"{log.stem}_{suffix}.png")
        save(fig, written[-1], dpi)
    return written


REPLAY_EXPECTED = "visdom's log of a --visdom run (logs/*.visdom)"


def read_replay(log: Path) -> list[tuple[int, str, dict]]:
    """(line number, endpoint, message) of every entry of visdom's log, checked before any is sent."""
    what = f"--replay {log}"
    entries = []
    for n, entry in json_lines(read_text(log, what, REPLAY_EXPECTED), what, REPLAY_EXPECTED):
        # visdom logs only these two endpoints (Visdom._log), each as [endpoint, message]
        if not (isinstance(entry, list) and len(entry) == 2 and entry[0] in ("events", "update")
                and isinstance(entry[1], dict)):
            raise UserError(f"{what}:{n}: not a visdom log line ([\"update\" or \"events\", {{message}}]), got "
                            f"{json.dumps(entry)[:60]}")
        entries.append((n, entry[0], entry[1]))
    return entries


def replay(log: Path, server: str, port: int, entries: list[tuple[int, str, dict]] | None = None) -> int:
    """Post every message of visdom's log ``log`` to the server, in order; returns how many.

    ``entries`` are the log's checked lines when the caller has read them already (``read_replay``).
    """
    from .visdom_sink import connect, failure, open_client  # only replaying needs visdom, seconds to import

    if entries is None:
        entries = read_replay(log)
    client = open_client(server, port, "main", request_timeout=10.0)
    n = 0
    try:
        for env in dict.fromkeys(msg.get("eid") or "main" for _, _, msg in entries):
            connect(client, env)
        for n, endpoint, msg in entries:
            client._send(msg, endpoint=endpoint, from_log=True)
    except ConnectionError as e:
        if n and isinstance(e.__context__, requests.HTTPError):
            raise UserError(f"--replay {log}:{n}: the visdom server at {server}:{port} refused this message "
                            f"({failure(e)}); expected {REPLAY_EXPECTED}") from None
        raise UserError(f"--replay {log}: no visdom server at {server}:{port} ({failure(e)}); "
                        f"start one with scripts/visdom_server.sh") from None
    finally:
        client._session.close()
    return len(entries)


def get_args_parser() -> Parser:
    p = Parser(prog="python -m utils.plot", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logs", nargs="*", type=Path, help="JSONL logs (logs/*.jsonl) to plot")
    p.flag("--out", type=Path, default=Path("plots"), help="folder for the PNGs (default: plots)")
    p.flag("--dpi", type=int, default=110, help=f"PNG resolution, 1 to {MAX_DPI} (default: 110 dots per inch)")
    p.flag("--replay", type=Path, default=None, help="visdom log (logs/*.visdom) to play into a server")
    p.flag("--vis-server", default="http://127.0.0.1", help="visdom server address (with --replay)")
    p.flag("--vis-port", type=tcp_port, default=8097, help="visdom server port (with --replay)")
    return p


def main(argv: list[str] | None = None) -> list[Path]:
    """Check every input first (nothing is written when one is wrong), then replay and write the PNGs."""
    args = get_args_parser().parse_args(argv)
    if not args.logs and args.replay is None:
        raise UserError("nothing to do: give JSONL logs to plot, or --replay a visdom log")
    if not 1 <= args.dpi <= MAX_DPI:
        raise UserError(f"--dpi must be from 1 to {MAX_DPI} (dots per inch), got {args.dpi}")
    pngs: dict[Path, tuple[Path, Figure]] = {}
    for log in args.logs:
        for suffix, fig in figures(log):
            path = args.out / f"{log.stem}_{suffix}.png"
            if path in pngs:
                raise UserError(f"{pngs[path][0]} and {log} would both be plotted to {path}; "
                                f"plot them with different --out folders")
            pngs[path] = (log, fig)
    entries = read_replay(args.replay) if args.replay is not None else []
    if pngs:
        check_out(args.out)
    if args.replay is not None:  # first: a missing server is then found before any PNG is written
        count = replay(args.replay, args.vis_server, args.vis_port, entries)
        print(f"replayed {count} messages from {args.replay} into {args.vis_server}:{args.vis_port}")
    for path, (_, fig) in pngs.items():
        save(fig, path, args.dpi)
        print(path)
    return list(pngs)


if __name__ == "__main__":
    run_script(main)
