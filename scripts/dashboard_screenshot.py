"""Screenshot of a visdom dashboard as a person sees it: a local server, one filled env, headless Chromium.

    .venv/bin/python scripts/dashboard_screenshot.py OUT.png
        fills the env with a tiny --visdom PruningNet training and search on generated images
    .venv/bin/python scripts/dashboard_screenshot.py OUT.png --replay logs/RUN.visdom [more.visdom ...] [--env ENV]
        fills it by replaying visdom's logs of --visdom runs (python -m utils.plot --replay)

The server is started through scripts/visdom_server.sh on a free loopback port, with a temporary
folder for its environments, and stopped at the end. Debian's chromium (headless) loads
http://127.0.0.1:PORT/env/ENV and writes OUT.png, then loads the page again to count the panes it
drew: no plot pane (a page whose JavaScript did not load stays blank) is an error, and no PNG is
written. Needs chromium (apt-get install chromium) and the page's JavaScript
(scripts/visdom_assets.sh); nothing is fetched from the internet.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from utils.cli import Parser, UserError, run_script
from utils.plot import read_replay, replay
from utils.visdom_server import local_server

TINY = ["--dataset", "imagenet", "--data-root", "img", "--width-mult", "0.125", "--input-size", "24",
        "--batch-size", "8", "--workers", "0", "--val-per-class", "4", "--recal-batches", "2"]
TINY_ENV = "imagenet_mobilenetv2_pruningnet"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


class Unavailable(Exception):
    """Something the script needs is missing or failed (not the user's input): one line, exit 1."""


def get_args_parser() -> Parser:
    p = Parser(prog="scripts/dashboard_screenshot.py", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="the PNG to write")
    p.flag("--replay", type=Path, nargs="+", default=None, help="visdom logs (logs/*.visdom) to fill the env with")
    p.flag("--env", default=None, help="the env to show (default: the one the replayed logs plot to; "
                                       f"{TINY_ENV} for the tiny run)")
    p.flag("--size", default="1400x1250", help="browser window WIDTHxHEIGHT in pixels (default: 1400x1250)")
    p.flag("--wait-ms", type=int, default=15000,
           help="virtual time the page gets to load and draw before the screenshot (default: 15000)")
    return p


def window_size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if not match or not all(200 <= int(v) <= 8000 for v in match.groups()):
        raise UserError(f"--size must be WIDTHxHEIGHT with each from 200 to 8000 pixels, e.g. 1400x1250; got {text!r}")
    return int(match[1]), int(match[2])


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return name
    raise Unavailable("needs Debian's chromium to load the page: apt-get install chromium")


def check_page_assets() -> None:
    import visdom

    if not (Path(visdom.__file__).parent / "static" / "js" / "plotly-plotly.min.js").is_file():
        raise Unavailable("the dashboard page's JavaScript is not installed, so the page would stay blank; "
                          "run scripts/visdom_assets.sh first")


def run(cmd: list[str], cwd: Path, what: str, timeout: float = 600) -> None:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise Unavailable(f"{what} failed (exit status {r.returncode}): {last}")


def tiny_run(work: Path, port: int) -> None:
    """A PruningNet trained 3 epochs on generated images, then a 4-iteration search under half its
    MACs, both plotting to the server (the search plots into its PruningNet's env)."""
    from data.synthetic import make_image_folder
    from models import get_family
    from models.cost import cost_model

    make_image_folder(work / "img", num_classes=3, train_per_class=28, val_per_class=4, size=24)
    vis = ["--visdom", "--vis-port", str(port)]
    run([sys.executable, str(ROOT / "meta_trainer_exp.py"), "--arch", "mobilenetv2_pruningnet", "--epochs", "3",
         "--valuate", "--vis-interval", "1", *TINY, *vis], work, "the tiny training")
    full = cost_model("mobilenetv2", 24, 3, 0.125, True)(get_family("mobilenetv2").layout.full()).macs
    run([sys.executable, str(ROOT / "meta_search_exp.py"), "--arch", "mobilenetv2_pruningnet", "--resume",
         f"checkpoints/meta_prune/{TINY_ENV}_checkpoint.pth.tar", *TINY, "--population", "8", "--select-num", "3",
         "--mutation-num", "3", "--crossover-num", "3", "--epochs", "4", "--flops", f"{full * 0.5 / 1e6:.3f}", *vis],
        work, "the tiny search")


def chromium(browser: str, args: list[str], url: str, profile: Path, timeout: float) -> subprocess.CompletedProcess:
    cmd = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, url]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise Unavailable(f"chromium did not finish loading {url} in {timeout:g} s") from None


def main(argv: list[str] | None = None) -> dict[str, int]:
    """Write the screenshot; returns how many panes the page drew (``plots``, and ``text``: the others)."""
    args = get_args_parser().parse_args(argv)
    width, height = window_size(args.size)
    if args.out.suffix.lower() != ".png":
        raise UserError(f"{args.out}: the screenshot is a PNG; give a path ending in .png")
    if args.out.is_dir() or not args.out.parent.is_dir():
        raise UserError(f"{args.out}: give a file path in an existing folder")
    if not 1000 <= args.wait_ms <= 120_000:
        raise UserError(f"--wait-ms must be from 1000 to 120000, got {args.wait_ms}")
    logs = [(log, read_replay(log)) for log in args.replay or []]
    env = args.env or TINY_ENV
    if logs and args.env is None:
        envs = sorted({msg.get("eid") or "main" for _, entries in logs for _, _, msg in entries})
        if len(envs) != 1:
            raise UserError(f"the logs plot to {len(envs)} envs ({', '.join(envs)}); choose one with --env")
        env = envs[0]
    browser = find_chromium()
    check_page_assets()
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="dashboard_") as tmp, local_server(Path(tmp) / "envs") as (port, _):
        for log, entries in logs:
            replay(log, "http://127.0.0.1", port, entries)
        if not logs:
            (Path(tmp) / "work").mkdir()
            tiny_run(Path(tmp) / "work", port)
        url = f"http://127.0.0.1:{port}/env/{env}"
        timeout = 60 + args.wait_ms / 1000
        page = ["--virtual-time-budget=" + str(args.wait_ms), f"--window-size={width},{height}"]
        png = Path(tmp) / "shot.png"  # moved to args.out only once the page is known to show plots
        shot = chromium(browser, [*page, f"--screenshot={png}"], url, Path(tmp) / "shot", timeout)
        if shot.returncode != 0 or not png.is_file():
            raise Unavailable(f"chromium wrote no screenshot ({shot.returncode}): {shot.stderr.strip()[-300:]}")
        dom = chromium(browser, [*page, "--dump-dom"], url, Path(tmp) / "dom", timeout).stdout
        plots = len(re.findall(r'class="[^"]*\bjs-plotly-plot\b', dom))  # a pane plotly drew into
        panes = {"plots": plots, "text": dom.count('class="window"') - plots}
        if not plots:
            raise Unavailable(f"the page at {url} drew no plot (is the env {env!r} empty, or did its JavaScript "
                              f"not load?); no screenshot written")
        shutil.move(png, args.out)
    counts = ", ".join(f"{n} {kind} pane{'s' * (n != 1)}" for kind, n in (("plot", plots), ("text", panes["text"])))
    print(f"{args.out}: env {env}, {counts}, {time.monotonic() - start:.0f} s")
    return panes


if __name__ == "__main__":
    try:
        run_script(main)
    except Unavailable as e:
        print(f"dashboard_screenshot.py: error: {e}", file=sys.stderr)
        sys.exit(1)
