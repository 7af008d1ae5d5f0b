"""python -m utils.plot: PNGs from JSONL run logs (no server), run selection, Pareto front, errors."""
from __future__ import annotations

import http.server
import json
import os
import random
import subprocess
import sys
import threading

import matplotlib.image
import pytest

from conftest import ROOT
from data.synthetic import make_image_folder
from helpers import TINY_DATA, assert_one_line_error, invoke, read_jsonl
from utils import plot
from utils.cli import UserError


def step(epoch: int, s: int, loss: float = 1.0) -> dict:
    return {"kind": "step", "epoch": epoch, "step": s, "loss": loss, "top1": 40.0 + s, "lr": 0.1 / s, "img_s": 100.0}


def epoch_row(epoch: int, **val: float) -> dict:
    return {"kind": "epoch", "epoch": epoch, "train_loss": 1.0, "train_top1": 50.0, "lr": 0.01, "seconds": 1.0,
            "img_s": 100.0, **val}


def search_rows(iterations: int = 3, per_iteration: int = 5, budget: int | None = 6_000_000) -> list[dict]:
    rng = random.Random(0)
    rows, best = [], (100.0, 0)
    for it in range(1, iterations + 1):
        cands = [{"gene": [rng.randrange(31) for _ in range(4)], "error": rng.uniform(20, 80),
                  "macs": rng.randrange(1_000_000, 6_000_000)} for _ in range(per_iteration)]
        best = min([best] + [(c["error"], c["macs"]) for c in cands])
        rows.append({"kind": "search", "iteration": it, "scored": it * per_iteration, "best_error": best[0],
                     "best_gene": [1, 2, 3, -1], "best_macs": best[1], "budget_macs": budget,
                     "best_table": "layer in mid out", "candidates": cands})
    return rows


def write_jsonl(path, rows: list[dict]):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_pareto_front_is_the_best_accuracy_for_a_given_cost():
    points = [(3, 70), (1, 50), (2, 40), (2, 60), (4, 65), (5, 80), (1, 45)]
    assert plot.pareto_front(points) == [(1, 50), (2, 60), (3, 70), (5, 80)]
    assert plot.pareto_front([]) == []


def run_row(resumed: bool) -> dict:
    return {"kind": "run", "resumed": resumed}


def test_last_run_is_the_last_fresh_start_with_its_resumes():
    first = [run_row(False), step(0, 2), step(0, 4), epoch_row(1, val_top1=10.0), step(1, 6), step(1, 8),
             epoch_row(2, val_top1=20.0)]
    second = [run_row(False), step(0, 2, loss=9.0), step(0, 4, loss=9.0)]  # from scratch again, stopped mid-epoch 0
    # resumed from step 1, before the first plotted step: its first step is the one a fresh run logs first
    resumed = [run_row(True), step(0, 2, loss=5.0), step(0, 4, loss=5.0), epoch_row(1, val_top1=30.0),
               step(1, 6, loss=5.0)]
    rows = first + second + resumed
    assert plot.last_run(rows) == second + resumed
    steps = plot.latest(plot.last_run(rows), "step", "step")
    assert [(r["step"], r["loss"]) for r in steps] == [(2, 5.0), (4, 5.0), (6, 5.0)]  # a re-logged step: last wins
    searches = search_rows(3)
    assert plot.last_run([run_row(False)] + searches + [run_row(False)] + searches[:2]) == [run_row(False)] + searches[:2]
    resumed_search = [run_row(False)] + searches[:2] + [run_row(True)] + searches[1:]  # iteration 2 again
    assert plot.last_run(resumed_search) == resumed_search
    assert plot.latest(resumed_search, "search", "iteration") == searches
    assert plot.last_run(first[1:] + second[1:]) == first[1:] + second[1:]  # runs that do not say: one run


def test_training_figure_draws_train_lines_and_epoch_points():
    rows = [step(0, 2), step(0, 4), epoch_row(1, val_top1=30.0, val_top1_widest=35.0, val_top1_middle=31.0,
                                                 val_top1_narrowest=20.0),
            step(1, 6), step(1, 8), epoch_row(2, val_top1=40.0, val_top1_widest=45.0, val_top1_middle=41.0,
                                              val_top1_narrowest=25.0)]
    fig = plot.training_figure(rows, "run")
    loss_ax, top1_ax, lr_ax, img_ax = fig.axes
    assert len(fig.axes) == 4
    (train_loss,) = loss_ax.get_lines()  # a PruningNet reports no validation loss
    assert list(train_loss.get_xdata()) == [2, 4, 6, 8]
    lines = {line.get_label(): line for line in top1_ax.get_lines()}
    assert set(lines) == {"train", "val", "val widest", "val middle", "val narrowest"}
    assert list(lines["val"].get_xdata()) == [4, 8] and list(lines["val"].get_ydata()) == [30.0, 40.0]
    assert list(lr_ax.get_lines()[0].get_ydata()) == [0.1 / s for s in (2, 4, 6, 8)]
    assert img_ax.get_xlabel() == "step" and "2 epochs, 8 steps" in fig.get_suptitle()


def test_search_figure_scatter_front_and_budget():
    rows = search_rows(iterations=3, per_iteration=5)
    fig = plot.search_figure(rows, "search")
    scatter_ax, best_ax, colorbar_ax = fig.axes
    dots, star = scatter_ax.collections
    assert len(dots.get_offsets()) == 15 and list(dots.get_array()) == [1] * 5 + [2] * 5 + [3] * 5
    cands = [(c["macs"] / 1e6, 100 - c["error"]) for r in rows for c in r["candidates"]]
    front = plot.pareto_front(cands)
    lines = {line.get_label(): line for line in scatter_ax.get_lines()}
    assert list(lines["Pareto front"].get_xdata()) == [x for x, _ in front] + [max(x for x, _ in cands)]
    assert list(lines["budget 6.00 MMac"].get_xdata()) == [6.0, 6.0]
    assert tuple(star.get_offsets()[0]) == (rows[-1]["best_macs"] / 1e6, 100 - rows[-1]["best_error"])
    assert max(y for _, y in cands) == front[-1][1] == 100 - rows[-1]["best_error"]
    assert list(best_ax.get_lines()[0].get_xdata()) == [1, 2, 3]
    assert colorbar_ax.get_ylabel() == "iteration"
    no_budget = plot.search_figure(search_rows(budget=None), "search")
    assert not any(line.get_label().startswith("budget") for line in no_budget.axes[0].get_lines())


def test_cli_writes_one_png_per_kind(tmp_path, capsys):
    train = write_jsonl(tmp_path / "run.jsonl", [step(0, 1), step(0, 2), epoch_row(1, val_top1=50.0, val_loss=1.1)])
    search = write_jsonl(tmp_path / "MetaPruneSearch_x.jsonl", search_rows())
    written = plot.main([str(train), str(search), "--out", str(tmp_path / "png"), "--dpi", "50"])
    assert [p.name for p in written] == ["run_training.png", "MetaPruneSearch_x_search.png"]
    assert capsys.readouterr().out.split() == [str(p) for p in written]
    assert matplotlib.image.imread(written[0]).shape[:2] == (7 * 50, 11 * 50)
    assert matplotlib.image.imread(written[1]).shape[:2] == (5 * 50, 12 * 50)


def test_a_failed_render_keeps_the_earlier_png_and_no_temporary_file(tmp_path, monkeypatch):
    train = write_jsonl(tmp_path / "run.jsonl", [step(0, 1), step(0, 2)])
    png = plot.main([str(train), "--out", str(tmp_path), "--dpi", "20"])[0]
    before = png.read_bytes()

    def die_half_way(self, f, **kwargs):  # as a full disk or a kill in the middle of writing would
        f.write(before[:100])
        raise KeyboardInterrupt

    monkeypatch.setattr(plot.Figure, "savefig", die_half_way)
    with pytest.raises(KeyboardInterrupt):
        plot.main([str(train), "--out", str(tmp_path), "--dpi", "20"])
    assert png.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.jsonl", "run_training.png"]


def test_a_real_training_log_renders(tmp_path):
    make_image_folder(tmp_path / "img", num_classes=3, train_per_class=8, val_per_class=2, size=24)
    r = invoke("trainer_exp.py", "--arch", "mobilenetv2_prunednet", "--epochs", "2", "--valuate", *TINY_DATA,
               "--vis-interval", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    log = tmp_path / "logs" / "imagenet_mobilenetv2_prunednet.jsonl"
    rows = read_jsonl(log)
    fig = plot.training_figure(rows, log.stem)
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert len(lines["train"].get_xdata()) == sum(r["kind"] == "step" for r in rows)
    assert list(lines["val"].get_ydata()) == [r["val_loss"] for r in rows if r["kind"] == "epoch"]
    (png,) = plot.render(log, tmp_path / "out")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_partial_last_line_of_a_killed_run_is_skipped(tmp_path):
    log = write_jsonl(tmp_path / "killed.jsonl", [step(0, 1), step(0, 2)])
    log.write_text(log.read_text() + '{"kind": "step", "epo')  # killed while appending: no newline
    assert [r["step"] for r in plot.read_log(log)] == [1, 2]


def test_errors_name_the_bad_input(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kind": "step", "epoch": 0, "step": 1}\nnot json\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: not a JSON line"):
        plot.main([str(bad)])
    no_loss = write_jsonl(tmp_path / "no_loss.jsonl", [{"kind": "step", "epoch": 0, "step": 1}])
    with pytest.raises(UserError, match=r"no_loss.jsonl:1: a step record without loss, top1, lr, img_s; expected a "
                                        r"JSONL log"):
        plot.main([str(no_loss)])
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"kind": "note"}])
    with pytest.raises(UserError, match=r"empty.jsonl: no step or search records"):
        plot.main([str(empty)])
    with pytest.raises(UserError, match="nothing to do"):
        plot.main([])
    with pytest.raises(UserError, match=r"missing.jsonl: no such file"):
        plot.main([str(tmp_path / "missing.jsonl")])
    replay_log = tmp_path / "run.visdom"
    replay_log.write_text('["update", {"eid": "e", "win": "w"}]\n')
    with pytest.raises(UserError, match=r"--replay .*run.visdom: no visdom server at http://127.0.0.1:1 "
                                        r"\(connection refused\)"):
        plot.main(["--replay", str(replay_log), "--vis-port", "1"])
    replay_log.write_text("[1]\n")
    with pytest.raises(UserError, match=r"run.visdom:1: not a visdom log line"):
        plot.main(["--replay", str(replay_log)])


def test_a_search_without_new_candidates_plots_what_it_has():
    rows = [{**r, "candidates": []} for r in search_rows(3)]  # e.g. iterations that only met known genes
    fig = plot.search_figure(rows, "search")
    scatter_ax, best_ax = fig.axes  # no candidates: no colorbar
    (star,) = scatter_ax.collections
    assert tuple(star.get_offsets()[0]) == (rows[-1]["best_macs"] / 1e6, 100 - rows[-1]["best_error"])
    assert [line.get_label() for line in scatter_ax.get_lines()] == ["budget 6.00 MMac"]  # no Pareto front
    assert list(best_ax.get_lines()[0].get_xdata()) == [1, 2, 3]


def cli(tmp_path, *args: str):
    """``python -m utils.plot args`` in ``tmp_path``, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "utils.plot", *args], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120, check=False)


def test_bad_input_is_one_line_and_exit_2_with_nothing_written(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [step(0, 1), step(0, 2)])
    bad_step = write_jsonl(tmp_path / "bad_step.jsonl", [{"kind": "step", "loss": 1.0}])
    (tmp_path / "a_file").write_text("")
    (tmp_path / "latin1.jsonl").write_bytes('{"kind": "step", "note": "caf\u00e9"}\n'.encode("latin-1"))
    (tmp_path / "a_folder.jsonl").mkdir()
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "good.jsonl").write_text(good.read_text())
    replay_log = tmp_path / "run.visdom"
    replay_log.write_text('["update", [1]]\n')
    cases = [
        (["good.jsonl", "sub/good.jsonl"], ["good.jsonl and sub/good.jsonl would both be plotted to plots/good_training"]),
        (["good.jsonl", "--dpi", "0"], ["--dpi must be from 1 to 1000", "got 0"]),
        (["good.jsonl", "--dpi", "-5"], ["--dpi must be from 1 to 1000", "got -5"]),
        (["good.jsonl", "--out", "a_file"], ["--out a_file: is a file; give a folder"]),
        (["good.jsonl", "--out", "a_file/sub"], ["--out a_file/sub: cannot be made: a_file is a file"]),
        (["a_folder.jsonl"], ["a_folder.jsonl: is a folder; expected a JSONL log"]),
        (["latin1.jsonl"], ["latin1.jsonl: not UTF-8 text", "expected a JSONL log"]),
        (["good.jsonl", "bad_step.jsonl"], ["bad_step.jsonl:1: a step record without epoch, step, top1, lr, img_s"]),
        (["good.jsonl", "--replay", "run.visdom"], ["--replay run.visdom:1: not a visdom log line", "[1]"]),
        (["--replay", "run.visdom", "--vis-port", "70000"], ["--vis-port must be a TCP port in 1..65535, got 70000"]),
    ]
    for i, (args, words) in enumerate(cases):  # the first as a process, as a user runs it; the rest in this one
        r = cli(tmp_path, *args) if i == 0 else invoke("utils/plot.py", *args, cwd=tmp_path)
        assert_one_line_error(r, *words)
        assert not (tmp_path / "plots").exists(), args  # not even the good log's PNG
    assert good.is_file() and bad_step.is_file()


def test_unusable_records_name_their_line(tmp_path):
    def error(rows: list) -> str:
        log = tmp_path / "log.jsonl"
        log.write_text("".join(json.dumps(r) + "\n" for r in rows))
        with pytest.raises(UserError) as e:
            plot.read_log(log)
        return str(e.value)

    search = search_rows(1)[0]
    no_candidates = {k: v for k, v in search.items() if k != "candidates"}
    assert "log.jsonl:2: a search record without candidates" in error([step(0, 1), no_candidates])
    assert "log.jsonl:1: the step record's step is \"2\"" in error([{**step(0, 1), "step": "2"}])
    assert "the step record's loss is true" in error([{**step(0, 1), "loss": True}])
    assert "a search candidate without a numeric error and macs" in error([{**search, "candidates": [{"macs": 1}]}])
    assert "the epoch record's val_top1 is \"x\"" in error([epoch_row(1, val_top1="x")])
    assert "log.jsonl:1: expected a RunLogger record with a 'kind'" in error([{"kind": [1]}])
    assert "a run record without resumed" in error([{"kind": "run"}])


class Refusing(http.server.BaseHTTPRequestHandler):
    """Opens environments and refuses every plot (HTTP 400), as visdom does a message it cannot take."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200 if self.path.startswith("/env/") else 400)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_replay_refused_by_the_server_names_the_line(tmp_path):
    """A server that answers but refuses a message is not a missing server."""
    replay_log = tmp_path / "run.visdom"
    replay_log.write_text('["update", {"eid": "e", "win": "w", "data": []}]\n' * 2)
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refusing) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.server_address[1]
        with pytest.raises(UserError, match=rf"--replay .*run.visdom:1: the visdom server at http://127.0.0.1:{port} "
                                            r"refused this message \(HTTP 400\)"):
            plot.main(["--replay", str(replay_log), "--vis-port", str(port)])
        server.shutdown()
