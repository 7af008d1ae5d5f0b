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
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from .config import Parser, UserError, run_script

VAL_SERIES = {"val_top1": "val", "val_top1_widest": "val widest", "val_top1_middle": "val middle",
              "val_top1_narrowest": "val narrowest"}


def read_log(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSONL log; a line that is not a JSON object is an error naming it."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    lines = text.splitlines()
    rows = []
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines) and not text.endswith("\n"):
                break  # a run killed while appending leaves a partial last line, without its newline
            raise UserError(f"{path}:{n}: not a JSON line ({e})") from None
        if not isinstance(row, dict) or "kind" not in row:
            raise UserError(f"{path}:{n}: expected a RunLogger record with a 'kind', got {line[:60]!r}")
        rows.append(row)
    return rows


def last_run(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of the last run started from scratch, and of the runs that resumed it.

    A run from scratch begins with a search iteration 1, or with the first step row of epoch 0
    (step rows come every ``--vis-interval`` steps, so that step is the smallest of epoch 0 in the
    log); a resumed run, even one resumed mid-epoch, starts at a later step.
    """
    first_step = min((r["step"] for r in rows if r["kind"] == "step" and r["epoch"] == 0), default=0)
    starts = [i for i, r in enumerate(rows)
              if (r["kind"] == "step" and r["epoch"] == 0 and r["step"] <= first_step)
              or (r["kind"] == "search" and r["iteration"] == 1)]
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
    for r in steps:
        missing = [f for f in ("loss", "top1", "lr", "img_s") if f not in r]
        if missing:
            raise UserError(f"{title}: step {r['step']} has no {', '.join(missing)}; is this a RunLogger log?")
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


def render(log: Path, out_dir: Path, dpi: int = 110) -> list[Path]:
    """Write the PNGs a log has data for; returns their paths."""
    rows = read_log(log)
    kinds = {r["kind"] for r in rows}
    figures = []
    if "step" in kinds:
        figures.append(("training", training_figure(rows, log.stem)))
    if "search" in kinds:
        figures.append(("search", search_figure(rows, log.stem)))
    if not figures:
        raise UserError(f"{log}: no step or search records to plot")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix, fig in figures:
        path = out_dir / f"{log.stem}_{suffix}.png"
        fig.savefig(path, dpi=dpi)  # a pyplot-free Figure renders with Agg: no backend switch
        written.append(path)
    return written


def replay(log: Path, server: str, port: int) -> int:
    """Post every message of visdom's log ``log`` to the server, in order; returns how many."""
    from .visdom_sink import connect, failure, open_client

    try:
        lines = log.read_text().splitlines()
    except FileNotFoundError:
        raise UserError(f"--replay {log}: no such file") from None
    entries = []
    for n, line in enumerate(lines, 1):
        try:
            endpoint, msg = json.loads(line)
        except (json.JSONDecodeError, ValueError, TypeError):
            raise UserError(f"--replay {log}:{n}: not a visdom log line ([endpoint, message]): {line[:60]!r}") from None
        entries.append((endpoint, msg))
    client = open_client(server, port, "main", request_timeout=10.0)
    try:
        for env in dict.fromkeys(msg.get("eid") or "main" for _, msg in entries):
            connect(client, env)
        for endpoint, msg in entries:
            client._send(msg, endpoint=endpoint, from_log=True)
    except ConnectionError as e:
        raise UserError(f"--replay {log}: no visdom server at {server}:{port} ({failure(e)}); "
                        f"start one with scripts/visdom_server.sh") from None
    finally:
        client._session.close()
    return len(entries)


def get_args_parser() -> Parser:
    p = Parser(prog="python -m utils.plot", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logs", nargs="*", type=Path, help="JSONL logs (logs/*.jsonl) to plot")
    p.flag("--out", type=Path, default=Path("plots"), help="folder for the PNGs (default: plots)")
    p.flag("--dpi", type=int, default=110, help="PNG resolution (default: 110 dots per inch)")
    p.flag("--replay", type=Path, default=None, help="visdom log (logs/*.visdom) to play into a server")
    p.flag("--vis-server", default="http://127.0.0.1", help="visdom server address (with --replay)")
    p.flag("--vis-port", type=int, default=8097, help="visdom server port (with --replay)")
    return p


def main(argv: list[str] | None = None) -> list[Path]:
    args = get_args_parser().parse_args(argv)
    if not args.logs and args.replay is None:
        raise UserError("nothing to do: give JSONL logs to plot, or --replay a visdom log")
    written = [path for log in args.logs for path in render(log, args.out, args.dpi)]
    for path in written:
        print(path)
    if args.replay is not None:
        count = replay(args.replay, args.vis_server, args.vis_port)
        print(f"replayed {count} messages from {args.replay} into {args.vis_server}:{args.vis_port}")
    return written


if __name__ == "__main__":
    run_script(main)
