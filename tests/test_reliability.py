"""Crash safety: SIGKILL/SIGTERM and resume, safe loading, NaN stops, bad input, full disks."""
import errno
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from app import checkpoint
from conftest import ROOT
from data.synthetic import make_image_folder
from helpers import TINY_DATA, TINY_TRAIN, assert_one_line_error, invoke

CKPT = "checkpoints/meta_prune"
RUN = ["--arch", "mobilenetv2_pruningnet", "--epochs", "2", "--lr", "0.05", "--deterministic",
       "--save-every-steps", "1", *TINY_TRAIN]


@pytest.fixture
def work(tmp_path):
    make_image_folder(tmp_path / "img", num_classes=3, train_per_class=20, val_per_class=3, size=24)
    return tmp_path


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict:
    """The final checkpoint of an uninterrupted run of RUN, which killed and resumed runs must equal."""
    work = tmp_path_factory.mktemp("straight")
    make_image_folder(work / "img", num_classes=3, train_per_class=20, val_per_class=3, size=24)
    assert invoke("meta_trainer_exp.py", *RUN, cwd=work).returncode == 0
    return checkpoint.load(work / CKPT / "imagenet_mobilenetv2_pruningnet_checkpoint.pth.tar")


def start(script: str, *args: str, cwd) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / script), *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def wait_for(path, proc: subprocess.Popen, reached=lambda state: True, timeout: float = 120) -> None:
    """Wait until checkpoint ``path`` exists and its state satisfies ``reached``, with ``proc`` running."""
    end = time.time() + timeout
    while not (path.exists() and reached(torch.load(path, weights_only=True))):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < end, f"{path} never reached the awaited point"
        time.sleep(0.05)


def kill_mid_run(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc``, which must still be running: stopped first, so that it cannot finish meanwhile."""
    proc.send_signal(signal.SIGSTOP)
    assert proc.poll() is None, "the run ended before the kill; the test needs a longer run"
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


STEPS = 6  # per epoch: 60 images less 12 held out for validation, batch 8


def test_sigkill_mid_run_then_resume_equals_uninterrupted(work, straight):
    after_step = 4  # the kill lands wherever the run is once it has saved step 4: in a step, a save, or validation
    ckpt = work / CKPT / "imagenet_mobilenetv2_pruningnet_killed_checkpoint.pth.tar"
    proc = start("meta_trainer_exp.py", *RUN, "--suffix", "_killed", cwd=work)
    wait_for(ckpt, proc, lambda s: s["epoch"] * STEPS + s["step_in_epoch"] >= after_step)
    kill_mid_run(proc)
    state = checkpoint.load(ckpt)  # whatever moment the kill hit, the last checkpoint is complete
    assert after_step <= state["epoch"] * STEPS + state["step_in_epoch"] < 2 * STEPS
    r = invoke("meta_trainer_exp.py", *RUN, "--suffix", "_killed", "--resume", str(ckpt), cwd=work)
    assert r.returncode == 0, r.stderr
    resumed = checkpoint.load(ckpt)
    for k, v in straight["model"].items():
        assert torch.equal(v, resumed["model"][k]), k
    assert straight["best_top1"] == resumed["best_top1"]
    assert not list((work / CKPT).glob(".*.tmp"))  # no temporary file left behind


def test_sigterm_saves_a_resumable_checkpoint(work):
    ckpt = work / CKPT / "imagenet_mobilenetv2_pruningnet_term_checkpoint.pth.tar"
    proc = start("meta_trainer_exp.py", *RUN, "--epochs", "50", "--suffix", "_term", cwd=work)
    wait_for(ckpt, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and "resume with --resume" in out
    state = checkpoint.load(ckpt)
    assert state["epoch"] < 50
    r = invoke("meta_trainer_exp.py", *RUN, "--epochs", str(state["epoch"] + 1), "--suffix", "_term",
               "--resume", str(ckpt), cwd=work)
    assert r.returncode == 0, r.stderr
    assert checkpoint.load(ckpt)["epoch"] == state["epoch"] + 1


def test_sigkill_during_search_then_resume_gives_the_same_candidates(work):
    assert invoke("meta_trainer_exp.py", *RUN[:2], "--epochs", "1", *TINY_TRAIN, cwd=work).returncode == 0
    search = ["--arch", "mobilenetv2_pruningnet", "--resume", f"{CKPT}/imagenet_mobilenetv2_pruningnet_checkpoint.pth.tar",
              *TINY_DATA, "--population", "6", "--select-num", "2", "--mutation-num", "2", "--crossover-num", "2",
              "--recal-batches", "2", "--epochs", "4"]
    assert invoke("meta_search_exp.py", *search, "--flops", "2", cwd=work).returncode == 0
    ckpt = work / CKPT / "MetaPruneSearch_mobilenetv2_pruningnet_flops2.0_checkpoint.pth.tar"
    proc = start("meta_search_exp.py", *search, "--flops", "2.0", cwd=work)
    wait_for(ckpt, proc, lambda s: s["iter"] >= 1)
    kill_mid_run(proc)
    assert 1 <= torch.load(ckpt, weights_only=True)["iter"] < 4
    r = invoke("meta_search_exp.py", *search, "--flops", "2.0", "--search-resume", str(ckpt), cwd=work)
    assert r.returncode == 0, r.stderr
    straight = torch.load(work / CKPT / "MetaPruneSearch_mobilenetv2_pruningnet_flops2_checkpoint.pth.tar",
                          weights_only=True)
    assert torch.load(ckpt, weights_only=True)["candidates"] == straight["candidates"]


def test_non_finite_loss_stops_cleanly_and_keeps_the_last_good_checkpoint(work):
    r = invoke("meta_trainer_exp.py", *RUN, "--lr", "1e30", "--suffix", "_nan", cwd=work)
    assert r.returncode == 1 and "loss became" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    log = (work / "logs/imagenet_mobilenetv2_pruningnet_nan.txt").read_text()
    epoch, step = map(int, re.search(r"non-finite loss at epoch (\d+) step (\d+) gene \[", log).groups())
    assert (epoch, step) > (0, 0)  # lr 1e30: the first step still starts from finite weights
    # saved every step: the checkpoint is the one of the step before, and holds only finite numbers
    state = checkpoint.load(work / CKPT / "imagenet_mobilenetv2_pruningnet_nan_checkpoint.pth.tar")
    assert (state["epoch"], state["step_in_epoch"]) == (epoch, step)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


class Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickled_code_payload_is_refused_and_not_run(work):
    evil = work / "evil.pth.tar"
    torch.save({"format": "metaprune", "kind": "model", "x": Payload()}, evil)
    r = invoke("meta_search_exp.py", "--arch", "resnet50_pruningnet", "--resume", str(evil), *TINY_DATA, cwd=work)
    assert_one_line_error(r, "refused to load", "possibly code")
    assert not (work / "pwned").exists()


def test_truncated_and_foreign_files_are_clear_errors(work):
    assert invoke("meta_trainer_exp.py", *RUN[:2], "--epochs", "1", *TINY_TRAIN, cwd=work).returncode == 0
    good = work / CKPT / "imagenet_mobilenetv2_pruningnet_checkpoint.pth.tar"
    cut = work / "cut.pth.tar"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    r = invoke("meta_trainer_exp.py", *RUN[:2], *TINY_TRAIN, "--resume", str(cut), cwd=work)
    assert_one_line_error(r, "truncated or corrupt")
    (work / "other.pth.tar").write_bytes(b"not a checkpoint at all")
    r = invoke("meta_trainer_exp.py", *RUN[:2], *TINY_TRAIN, "--resume", "other.pth.tar", cwd=work)
    assert_one_line_error(r, "other.pth.tar", "not a PyTorch checkpoint file")
    torch.save({"weights": torch.zeros(2)}, work / "plain.pth")
    r = invoke("meta_trainer_exp.py", *RUN[:2], *TINY_TRAIN, "--resume", "plain.pth", cwd=work)
    assert_one_line_error(r, "not a MetaPrune checkpoint")
    r = invoke("meta_trainer_exp.py", "--arch", "resnet50_pruningnet", *TINY_TRAIN, "--resume", str(good), cwd=work)
    assert_one_line_error(r, "mobilenetv2_pruningnet")
    r = invoke("meta_search_exp.py", "--arch", "mobilenetv2_pruningnet", "--resume", str(good), "--dataset",
               "fashionmnist", "--data-root", "img", cwd=work)
    assert_one_line_error(r, "trained on imagenet", "--dataset is fashionmnist")


def test_disk_full_while_saving_keeps_the_previous_checkpoint(work, monkeypatch):
    path = work / "state.pth.tar"
    record = checkpoint.model_record("resnet50_prunednet", None, 3, 0.125, True)
    checkpoint.save({"format": "metaprune", "kind": "model", **record, "model": {"value": torch.ones(3)}}, path)
    real_save = torch.save

    def full_disk(obj, f):
        real_save(obj, f)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(checkpoint.UserError, match="No space left on device.*previous file is kept"):
        checkpoint.save({"format": "metaprune", "kind": "model", **record, "model": {"value": torch.zeros(3)}}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(checkpoint.load(path)["model"]["value"], torch.ones(3))
    assert [p.name for p in work.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize("setup, args, words", [
    ("checkpoints_is_a_file", [], ["cannot write", "checkpoints"]),
    ("no_data", ["--data-root", "missing"], ["--data-root missing", "no train/"]),
    ("empty_data", ["--data-root", "empty"], ["--data-root empty"]),
    ("few_images", ["--val-per-class", "30"], ["class 'class_000' has 20 training images"]),
])
def test_bad_environment_is_one_line_and_writes_nothing(work, setup, args, words):
    if setup == "checkpoints_is_a_file":
        (work / "checkpoints").write_text("in the way")
    (work / "empty" / "train").mkdir(parents=True)
    before = sorted(p.relative_to(work) for p in work.rglob("*"))
    r = invoke("meta_trainer_exp.py", *RUN[:2], *TINY_TRAIN, *args, cwd=work)
    assert_one_line_error(r, *words)
    assert sorted(p.relative_to(work) for p in work.rglob("*")) == before
