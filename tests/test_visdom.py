"""--visdom against a real visdom server: training and search dashboards, resume, no/dead/hung server, replay."""
from __future__ import annotations

import argparse
import http.server
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import torch
import visdom
from PIL import Image

from conftest import ROOT
from data.synthetic import make_image_folder
from helpers import TINY_DATA, TINY_TRAIN, invoke, read_jsonl
from models import get_family
from models.cost import cost_model
from utils import plot
from utils.logger import RunLogger
from utils.visdom_server import free_port, local_server
from utils.visdom_sink import Dashboard, VisdomSink, make_sink, merged

CKPT = "checkpoints/meta_prune"
PRUNINGNET = "imagenet_mobilenetv2_pruningnet"
# The stock client, used here to read the server back, warns through a deprecated logging call.
pytestmark = pytest.mark.filterwarnings("ignore:The 'warn' method is deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real visdom server on a free loopback port, started through scripts/visdom_server.sh."""
    with local_server(tmp_path_factory.mktemp("visdom_server")) as (port, _):
        yield port


@pytest.fixture(scope="module")
def client(server):
    return visdom.Visdom(port=server, use_incoming_socket=False, raise_exceptions=True)


def windows(client: visdom.Visdom, env: str) -> dict[str, dict]:
    """Every window of ``env`` (none while the server has not opened it: it then answers empty)."""
    return json.loads(client.get_window_data(env=env) or "{}")


def traces(window: dict) -> dict[str, dict]:
    return {t["name"]: t for t in window["content"]["data"]}


def logged_points(replay_log: list) -> dict[tuple[str, str], list]:
    """The x values visdom's log holds per (window, trace) (a replace starts the trace over)."""
    points: dict[tuple[str, str], list] = {}
    for endpoint, msg in replay_log:
        if endpoint == "update":
            key = (msg["win"], msg["name"])
            points[key] = (points.get(key, []) if msg["append"] else []) + msg["data"][0]["x"]
    return points


def visdom_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("visdom:")]


@pytest.fixture(scope="module")
def pruningnet(tmp_path_factory, server):
    """A tiny MobileNetV2 PruningNet trained for one epoch (two steps of 8 images) while plotting to the server."""
    work = tmp_path_factory.mktemp("visdom_runs")
    make_image_folder(work / "img", num_classes=3, train_per_class=10, val_per_class=2, size=24)
    r = invoke("meta_trainer_exp.py", "--arch", "mobilenetv2_pruningnet", "--epochs", "1", *TINY_TRAIN,
               "--visdom", "--vis-port", str(server), "--vis-interval", "1", cwd=work)
    assert r.returncode == 0, r.stderr
    assert visdom_lines(r.stderr) == []
    return work


def test_training_dashboard(pruningnet, client):
    rows = read_jsonl(pruningnet / "logs" / f"{PRUNINGNET}.jsonl")
    steps = [r for r in rows if r["kind"] == "step"]
    (epoch,) = [r for r in rows if r["kind"] == "epoch"]
    wins = windows(client, PRUNINGNET)
    assert set(wins) == {f"{PRUNINGNET}:{p}" for p in ("loss", "top1", "lr", "img_s")}
    legend = PRUNINGNET  # the default legend: the run's name
    loss, top1 = traces(wins[f"{PRUNINGNET}:loss"]), traces(wins[f"{PRUNINGNET}:top1"])
    assert set(loss) == {f"{legend} train"}  # a PruningNet's validation reports top-1 only
    assert loss[f"{legend} train"]["x"] == [r["step"] for r in steps] and len(steps) == 2
    assert loss[f"{legend} train"]["y"] == [r["loss"] for r in steps]
    assert set(top1) == {f"{legend} {s}" for s in ("train", "val", "val widest", "val middle", "val narrowest")}
    assert top1[f"{legend} val middle"]["x"] == [steps[-1]["step"]]  # epoch points at the epoch's last step
    assert top1[f"{legend} val middle"]["y"] == [epoch["val_top1_middle"]]
    assert traces(wins[f"{PRUNINGNET}:lr"])[legend]["y"] == [r["lr"] for r in steps]
    assert wins[f"{PRUNINGNET}:loss"]["content"]["layout"]["xaxis"]["title"] == "step"
    replay_log = [json.loads(line) for line in (pruningnet / "logs" / f"{PRUNINGNET}.visdom").read_text().splitlines()]
    assert {endpoint for endpoint, _ in replay_log} == {"update"}
    assert logged_points(replay_log)[(f"{PRUNINGNET}:lr", legend)] == [r["step"] for r in steps]


def test_dashboard_page_loads(pruningnet, server):
    """The page a person opens: tornado>=6.6 answers it with 403, which no client call notices."""
    for path in ("/", f"/env/{PRUNINGNET}"):
        r = requests.get(f"http://127.0.0.1:{server}{path}", timeout=10)
        assert r.status_code == 200, (path, r.status_code)
        assert "/static/js/main.js" in r.text and "/static/js/plotly-plotly.min.js" in r.text
    assert requests.get(f"http://127.0.0.1:{server}/static/js/main.js", timeout=10).status_code == 200


def page_scripts_installed() -> bool:
    return (Path(visdom.__file__).parent / "static" / "js" / "plotly-plotly.min.js").is_file()


@pytest.mark.skipif(shutil.which("chromium") is None or not page_scripts_installed(),
                    reason="needs Debian's chromium and scripts/visdom_assets.sh")
def test_dashboard_screenshot_shows_the_plots(pruningnet, tmp_path):
    """What a person sees: headless Chromium loads the replayed dashboard and draws its four panes."""
    shot = tmp_path / "shot.png"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "dashboard_screenshot.py"), str(shot), "--replay",
                        str(pruningnet / "logs" / f"{PRUNINGNET}.visdom"), "--size", "1000x800", "--wait-ms", "5000"],
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    assert f"env {PRUNINGNET}, 4 plot panes, 0 text panes" in r.stdout
    assert Image.open(shot).size == (1000, 800)


def test_search_dashboard(tmp_path, client):
    # a PruningNet of its own: the search adds its panes to that run's env, which other tests count
    pruningnet, run = tmp_path, f"{PRUNINGNET}_searched"
    make_image_folder(pruningnet / "img", num_classes=3, train_per_class=10, val_per_class=2, size=24)
    r = invoke("meta_trainer_exp.py", "--arch", "mobilenetv2_pruningnet", "--epochs", "1", *TINY_TRAIN, "--suffix",
               "_searched", "--visdom", "--vis-port", str(client.port), cwd=pruningnet)
    assert r.returncode == 0, r.stderr
    full = cost_model("mobilenetv2", 24, 3, 0.125, True)(get_family("mobilenetv2").layout.full()).macs
    flops = round(full * 0.5 / 1e6, 3)
    r = invoke("meta_search_exp.py", "--arch", "mobilenetv2_pruningnet", "--resume",
               f"{CKPT}/{run}_checkpoint.pth.tar", *TINY_DATA, "--population", "4", "--select-num", "2",
               "--mutation-num", "1", "--crossover-num", "1", "--recal-batches", "1", "--epochs", "2",
               "--flops", str(flops), "--suffix", "_searched", "--visdom", "--vis-port", str(client.port),
               cwd=pruningnet)
    assert r.returncode == 0, r.stderr
    name = f"MetaPruneSearch_mobilenetv2_pruningnet_flops{flops}_searched"
    rows = [row for row in read_jsonl(pruningnet / "logs" / f"{name}.jsonl") if row["kind"] == "search"]
    cands = [(c, row["iteration"]) for row in rows for c in row["candidates"]]
    assert len(rows) == 2 and len(cands) == rows[-1]["scored"]
    wins = windows(client, run)  # the PruningNet's env: one dashboard per pipeline
    (scatter,) = wins[f"{run}:{name}:candidates"]["content"]["data"]
    assert scatter["x"] == [c["macs"] / 1e6 for c, _ in cands]
    assert scatter["y"] == [100 - c["error"] for c, _ in cands]
    assert scatter["marker"]["color"] == [it for _, it in cands]  # colored by iteration
    assert max(scatter["x"]) <= flops
    (shape,) = wins[f"{run}:{name}:candidates"]["content"]["layout"]["shapes"]
    assert shape["x0"] == shape["x1"] == rows[-1]["budget_macs"] / 1e6
    (best,) = wins[f"{run}:{name}:best"]["content"]["data"]
    assert best["x"] == [1, 2] and best["y"] == [100 - row["best_error"] for row in rows]
    assert best["y"][1] >= best["y"][0]
    text = wins[f"{run}:{name}:gene"]["content"]
    assert json.dumps(rows[-1]["best_gene"]) in text and "last_conv" in text and "iteration 2" in text
    assert f"{run}:loss" in wins  # the training panes are still there
    # The same log renders offline.
    (png,) = plot.render(pruningnet / "logs" / f"{name}.jsonl", pruningnet / "plots")
    assert png.name == f"{name}_search.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def images(tmp_path):
    make_image_folder(tmp_path / "img", num_classes=3, train_per_class=8, val_per_class=2, size=24)
    return tmp_path


def train_prunednet(work: Path, port: int, *args: str):
    r = invoke("trainer_exp.py", "--arch", "mobilenetv2_prunednet", "--valuate", *TINY_DATA, "--visdom",
               "--vis-port", str(port), "--vis-interval", "1", *args, cwd=work)
    assert r.returncode == 0, r.stderr
    return r


def test_resumed_run_appends_to_its_windows(images, client):
    env, legend = "resume_test", "run"
    train_prunednet(images, client.port, "--epochs", "1", "--vis-env", env, "--vis-legend", legend)
    before = windows(client, env)
    first = traces(before[f"{env}:loss"])
    assert set(first) == {"run train", "run val"} and len(first["run val"]["x"]) == 1
    train_prunednet(images, client.port, "--epochs", "2", "--vis-env", env, "--vis-legend", legend,
                    "--resume", f"{CKPT}/imagenet_mobilenetv2_prunednet_checkpoint.pth.tar")
    after = windows(client, env)
    assert set(after) == set(before)
    for pane in ("loss", "top1", "lr", "img_s"):
        old, new = traces(before[f"{env}:{pane}"]), traces(after[f"{env}:{pane}"])
        assert after[f"{env}:{pane}"]["contentID"] != before[f"{env}:{pane}"]["contentID"]
        for trace_name, trace in old.items():  # the first run's points are kept, the resumed run's follow
            n = len(trace["x"])
            assert new[trace_name]["x"][:n] == trace["x"] and new[trace_name]["y"][:n] == trace["y"]
            assert len(new[trace_name]["x"]) == 2 * n
    rows = read_jsonl(images / "logs" / "imagenet_mobilenetv2_prunednet.jsonl")
    steps = [r["step"] for r in rows if r["kind"] == "step"]
    assert traces(after[f"{env}:loss"])["run train"]["x"] == steps == sorted(steps)


def test_no_server_warns_once_and_the_log_replays(images, client):
    port = free_port()  # nothing listens there
    start = time.perf_counter()
    r = train_prunednet(images, port, "--epochs", "2", "--vis-env", "replayed")
    elapsed = time.perf_counter() - start
    (warning,) = visdom_lines(r.stderr)
    assert f"no server at http://127.0.0.1:{port}" in warning and "--replay" in warning and "Traceback" not in r.stderr
    rows = read_jsonl(images / "logs" / "imagenet_mobilenetv2_prunednet.jsonl")
    steps = [row for row in rows if row["kind"] == "step"]
    assert [row["epoch"] for row in rows if row["kind"] == "epoch"] == [1, 2]
    log = images / "logs" / "imagenet_mobilenetv2_prunednet.visdom"
    assert plot.main(["--replay", str(log), "--vis-port", str(client.port)]) == []
    wins = windows(client, "replayed")
    loss = traces(wins["replayed:loss"])
    assert loss["imagenet_mobilenetv2_prunednet train"]["x"] == [row["step"] for row in steps]
    val_losses = [row["val_loss"] for row in rows if row["kind"] == "epoch"]
    assert loss["imagenet_mobilenetv2_prunednet val"]["y"] == val_losses
    assert elapsed < 120  # no retries or waits per step: the whole run is a few seconds on an idle machine


def step_row(epoch: int, step: int) -> dict:
    return {"kind": "step", "epoch": epoch, "step": step, "loss": 1.0 / step, "top1": 50.0, "lr": 0.1, "img_s": 9.0}


def run_row(resumed: bool) -> dict:
    return {"kind": "run", "resumed": resumed}


def search_row(iteration: int) -> dict:
    return {"kind": "search", "iteration": iteration, "scored": iteration, "best_error": 50.0, "best_gene": [1],
            "best_macs": 2e6, "budget_macs": 3e6, "best_table": "layer", "candidates": [{"error": 50.0, "macs": 2e6}]}


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_fresh_run_clears_only_its_own_traces(client, tmp_path):
    env = "fresh_test"

    def run(legend: str, rows: list[dict]) -> None:
        sink = VisdomSink(Dashboard(env, legend, legend), "http://127.0.0.1", client.port, tmp_path / f"{legend}.visdom")
        for row in rows:
            sink.record(row)
        sink.close()
        assert sink.warnings == [] and not sink._thread.is_alive()

    def loss_x() -> dict[str, list]:
        return {name: t["x"] for name, t in traces(windows(client, env)[f"{env}:loss"]).items()}

    run("a", [run_row(False)] + [step_row(0, s) for s in range(1, 6)])
    run("b", [run_row(False)] + [step_row(0, s) for s in range(1, 4)])
    assert loss_x() == {"a train": [1, 2, 3, 4, 5], "b train": [1, 2, 3]}
    run("a", [run_row(False)] + [step_row(0, s) for s in (1, 2)])  # a from scratch again: its old points go
    assert loss_x() == {"a train": [1, 2], "b train": [1, 2, 3]}
    run("a", [run_row(True)] + [step_row(0, s) for s in (2, 3)])  # resumed early in epoch 0: appended
    assert loss_x() == {"a train": [1, 2, 2, 3], "b train": [1, 2, 3]}
    run("a", [step_row(1, s) for s in (4, 5)])  # a run that does not say: appended, never cleared
    assert loss_x() == {"a train": [1, 2, 2, 3, 4, 5], "b train": [1, 2, 3]}


def test_run_resumed_early_in_epoch_0_appends(images, client):
    """Resumed before the first plotted step of epoch 0, a run logs the same first step as a fresh one;
    its run record, not the step, says it resumed, for the live plots and utils.plot alike."""
    env, legend = "early_resume", "run"
    args = ("--epochs", "1", "--vis-env", env, "--vis-legend", legend, "--vis-interval", "2")
    train_prunednet(images, client.port, *args)
    first = traces(windows(client, env)[f"{env}:loss"])["run train"]["x"]
    assert first[0] == 2  # a fresh run's first point: the same as the resumed run's below
    ckpt = images / CKPT / "imagenet_mobilenetv2_prunednet_checkpoint.pth.tar"
    state = torch.load(ckpt, weights_only=True)
    torch.save({**state, "epoch": 0, "step_in_epoch": 1}, ckpt)  # as if stopped after step 1 of epoch 0
    train_prunednet(images, client.port, *args, "--resume", f"{CKPT}/imagenet_mobilenetv2_prunednet_checkpoint.pth.tar")
    loss = traces(windows(client, env)[f"{env}:loss"])
    assert loss["run train"]["x"] == first + first and len(loss["run val"]["x"]) == 2  # the first run's points kept
    rows = read_jsonl(images / "logs" / "imagenet_mobilenetv2_prunednet.jsonl")
    assert [row["resumed"] for row in rows if row["kind"] == "run"] == [False, True]
    assert plot.last_run(rows) == rows  # the resumed run continues the fresh one


def test_each_run_says_whether_it_resumed(trained):
    """Each script tells its sink from its own resume flag (a search's --resume is its PruningNet)."""
    def run_rows(log: str) -> list[bool]:
        return [row["resumed"] for row in read_jsonl(trained / "logs" / log) if row["kind"] == "run"]

    pruningnet = "checkpoints/meta_prune/imagenet_mobilenetv2_pruningnet_checkpoint.pth.tar"
    r = invoke("meta_trainer_exp.py", *TINY_TRAIN, "--arch", "mobilenetv2_pruningnet", "--epochs", "2", "--resume",
               pruningnet, cwd=trained)
    assert r.returncode == 0, r.stderr
    assert run_rows("imagenet_mobilenetv2_pruningnet.jsonl") == [False, True]
    search = [*TINY_TRAIN, "--arch", "mobilenetv2_pruningnet", "--resume", pruningnet, "--population", "4",
              "--select-num", "2", "--mutation-num", "1", "--crossover-num", "1"]
    searched = "checkpoints/meta_prune/MetaPruneSearch_mobilenetv2_pruningnet_flops0_checkpoint.pth.tar"
    for epochs, extra in (("1", []), ("2", ["--search-resume", searched])):
        r = invoke("meta_search_exp.py", *search, "--epochs", epochs, *extra, cwd=trained)
        assert r.returncode == 0, r.stderr
    assert run_rows("MetaPruneSearch_mobilenetv2_pruningnet_flops0.jsonl") == [False, True]
    r = invoke("meta_trainer_exp.py", *TINY_TRAIN, "--arch", "mobilenetv2_prunednet", "--epochs", "1",
               "--search-resume", searched, cwd=trained)
    assert r.returncode == 0, r.stderr
    assert run_rows("imagenet_mobilenetv2_prunednet_flops0.jsonl") == [False]  # a search's gene, a fresh training
    quiet = RunLogger(trained / "nothing.txt", sink=make_sink(argparse.Namespace(visdom=False), "nothing",
                                                              trained / "nothing.txt", "env", resumed=False))
    quiet.close()  # a run that failed before its first record leaves no start that would hide the run before it
    assert (trained / "nothing.jsonl").read_text() == ""


@pytest.fixture
def posting_threads(monkeypatch) -> list[str]:
    """The name of the thread of every HTTP post: a sink that never blocks its caller posts from its own."""
    names, post = [], requests.Session.post
    monkeypatch.setattr(requests.Session, "post",
                        lambda self, *a, **kw: names.append(threading.current_thread().name) or post(self, *a, **kw))
    return names


# Bounds on how long close() may take: its deadline plus one request's timeout, and slack for a busy
# machine far below what a blocking sink would take (a request's timeout for each of hundreds of rows).
SLACK = 5.0


def test_server_dying_mid_run_warns_once_and_never_blocks(tmp_path, capsys, posting_threads):
    with local_server(tmp_path / "server") as (port, proc):
        sink = VisdomSink(Dashboard("dying", "run", "run"), "http://127.0.0.1", port,
                          tmp_path / "run.visdom", request_timeout=1.0, close_timeout=2.0)
        reader = visdom.Visdom(port=port, use_incoming_socket=False, raise_exceptions=True)
        for s in range(1, 4):
            sink.record(step_row(0, s))
        wait_for(lambda: "dying:img_s" in windows(reader, "dying")
                 and len(traces(windows(reader, "dying")["dying:img_s"])["run"]["x"]) == 3)
        proc.terminate()  # the script execs the server: its process is the server
        proc.wait(10)
        posting_threads.clear()  # the reader above posts from this thread; from here on only the sink posts
        for s in range(4, 504):
            sink.record(step_row(0, s))
        start = time.perf_counter()
        sink.close()
        assert time.perf_counter() - start < 2.0 + 1.0 + SLACK
    assert not sink._thread.is_alive() and sink.dropped == 0
    assert set(posting_threads) == {"visdom-sink"}  # record() is a queue put, never a request
    (warning,) = sink.warnings
    assert warning.startswith("lost the server") and capsys.readouterr().err.count("visdom:") == 1
    # Every plot went to visdom's log all the same.
    replay_log = [json.loads(line) for line in (tmp_path / "run.visdom").read_text().splitlines()]
    series = (("loss", "run train"), ("top1", "run train"), ("lr", "run"), ("img_s", "run"))
    assert logged_points(replay_log) == {(f"dying:{pane}", name): list(range(1, 504)) for pane, name in series}


def test_local_server_stops_its_server(tmp_path):
    with local_server(tmp_path / "server") as (port, proc):
        assert requests.get(f"http://127.0.0.1:{port}/", timeout=10).status_code == 200
    assert proc.returncode is not None
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/", timeout=2)


def test_hung_server_never_blocks(tmp_path, posting_threads):
    with socket.socket() as hung:  # accepts connections, never answers
        hung.bind(("127.0.0.1", 0))
        hung.listen(64)
        sink = VisdomSink(Dashboard("hung", "run", "run"), "http://127.0.0.1", hung.getsockname()[1],
                          tmp_path / "run.visdom", request_timeout=0.5, close_timeout=1.0)
        for s in range(1, 201):
            sink.record(step_row(0, s))
        start = time.perf_counter()
        sink.close()
        closed = time.perf_counter() - start
    assert closed < 1.0 + 0.5 + SLACK  # blocking calls would take 0.5 s each, 100 s in all
    assert not sink._thread.is_alive() and set(posting_threads) == {"visdom-sink"}
    (warning,) = sink.warnings
    assert "no answer in time" in warning


class SlowServer(http.server.ThreadingHTTPServer):
    """Answers every POST like visdom's server, ``delay`` seconds late, and keeps what was posted."""

    def __init__(self, delay: float) -> None:
        self.delay, self.posted = delay, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                time.sleep(outer.delay)
                outer.posted.append((self.path.lstrip("/"), json.loads(body)))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def points(self) -> dict[tuple[str, str], list]:
        return logged_points([(endpoint, msg) for endpoint, msg in self.posted if endpoint in ("update", "events")])


def test_rows_past_the_queue_limit_are_logged_not_posted(tmp_path):
    slow = SlowServer(delay=0.3)
    with slow:
        sink = VisdomSink(Dashboard("slow", "run", "run"), "http://127.0.0.1", slow.server_address[1],
                          tmp_path / "run.visdom", max_queue=3)
        for s in range(1, 101):  # all queued while the sink still waits for the server to open the env
            sink.record(step_row(0, s))
        sink.close()
        slow.shutdown()
    assert sink.dropped == 97 and not sink._thread.is_alive()
    (warning,) = sink.warnings
    assert warning.startswith("97 records were left out of the live plots") and "run.visdom" in warning
    series = (("loss", "run train"), ("top1", "run train"), ("lr", "run"), ("img_s", "run"))
    assert slow.points() == {(f"slow:{pane}", name): [1, 2, 3] for pane, name in series}
    replay_log = [json.loads(line) for line in (tmp_path / "run.visdom").read_text().splitlines()]
    assert logged_points(replay_log) == {(f"slow:{pane}", name): list(range(1, 101)) for pane, name in series}


def test_close_deadline_holds_per_request(tmp_path):
    """A live server that answers every request just in time cannot make close() outlast its limit:
    a search row's text pane is one request each, so 40 rows are 40 requests of 0.3 s in one batch."""
    slow = SlowServer(delay=0.3)
    with slow:
        sink = VisdomSink(Dashboard("late", "run", "run"), "http://127.0.0.1", slow.server_address[1],
                          tmp_path / "run.visdom", request_timeout=1.0, close_timeout=1.0)
        for it in range(1, 41):
            sink.record(search_row(it))
        start = time.perf_counter()
        sink.close()
        closed = time.perf_counter() - start
        slow.shutdown()
    assert closed < 1.0 + 1.0 + SLACK and not sink._thread.is_alive()  # 40 requests would take 12 s
    (warning,) = sink.warnings
    assert "took longer than 1 s for the last plots" in warning
    assert len(slow.posted) < 12  # the env, then a few requests until the deadline
    replay_log = [json.loads(line) for line in (tmp_path / "run.visdom").read_text().splitlines()]
    assert sum(endpoint == "events" for endpoint, _ in replay_log) == 40  # all of them in the log all the same


def test_rows_that_queued_up_go_in_one_request_per_trace():
    fresh = Dashboard("env", "run", "run")
    messages = merged([m for row in [run_row(False)] + [step_row(0, s) for s in (1, 2, 3)] for m in fresh.updates(row)])
    loss = [msg for _, msg in messages if msg["win"] == "env:loss"]
    assert [(msg["append"], msg["data"][0]["x"]) for msg in loss] == [(True, []), (False, [1, 2, 3])]  # clear, set
    assert len(messages) == 2 * 4
    resumed = Dashboard("env", "run", "run")
    messages = merged([m for row in [run_row(True), step_row(0, 1), step_row(0, 2)] for m in resumed.updates(row)])
    assert [(msg["append"], msg["data"][0]["x"]) for _, msg in messages] == [(True, [1, 2])] * 4
    assert all(msg["layout"]["xaxis"]["title"] == "step" for _, msg in messages)  # the first carries the layout
