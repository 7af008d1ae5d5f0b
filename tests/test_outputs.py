"""Every output has one owner: names carry every setting that changes a result, a run never replaces
another run's finished files unless told to, two live runs of one name cannot both write, and a
retraining inherits from the very PruningNet its search used."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from app import checkpoint
from conftest import ROOT
from helpers import TINY_DATA, TINY_TRAIN, assert_one_line_error, invoke, snapshot, train
from search import record

CKPT = "checkpoints/meta_prune"
PRUNINGNET = f"{CKPT}/imagenet_mobilenetv2_pruningnet_checkpoint.pth.tar"
SEARCH = ["--arch", "mobilenetv2_pruningnet", "--resume", PRUNINGNET, *TINY_DATA, "--population", "6",
          "--select-num", "2", "--mutation-num", "2", "--crossover-num", "2", "--recal-batches", "2", "--epochs", "1"]
FLOPS0 = f"{CKPT}/MetaPruneSearch_mobilenetv2_pruningnet_flops0_checkpoint.pth.tar"


def searched(work, *args: str):
    r = invoke("meta_search_exp.py", *SEARCH, *args, cwd=work)
    assert r.returncode == 0, r.stderr
    return r


@pytest.fixture
def pruned(trained):
    """``work`` with a trained PruningNet and a finished search of it (no budget: ``flops0``)."""
    searched(trained)
    return trained


def retrain(work, *args: str):
    return invoke("meta_trainer_exp.py", *TINY_TRAIN, "--arch", "mobilenetv2_prunednet", "--epochs", "1",
                  "--search-resume", FLOPS0, *args, cwd=work)


# --- --inherit takes the PruningNet the search used -------------------------------------------------

def conv_weights(state: dict) -> dict:
    return {k: v for k, v in state["model"].items() if k.endswith("conv.weight")}


def test_inherit_from_another_folder_takes_the_searchs_own_pruningnet(pruned, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(pruned / "img", other / "img")
    train(other, "--arch", "mobilenetv2_pruningnet", "--epochs", "1", "--seed", "7")  # the same relative path
    search_file = str(pruned / FLOPS0)
    r = invoke("meta_trainer_exp.py", *TINY_TRAIN, "--arch", "mobilenetv2_prunednet", "--epochs", "1", "--lr", "0",
               "--search-resume", search_file, "--inherit", cwd=other)
    assert r.returncode == 0, r.stderr
    got = conv_weights(checkpoint.load(other / f"{CKPT}/imagenet_mobilenetv2_prunednet_flops0_checkpoint.pth.tar"))
    gene = tuple(checkpoint.load(other / f"{CKPT}/imagenet_mobilenetv2_prunednet_flops0_checkpoint.pth.tar")["gene"])
    for folder, same in ((pruned, True), (other, False)):
        pruningnet = checkpoint.build_model(checkpoint.load(folder / PRUNINGNET))
        want = pruningnet.materialize(gene).state_dict()
        assert all(torch.equal(v, want[k]) for k, v in got.items()) is same, folder
    # named explicitly, the other folder's PruningNet (as far trained, another run) is refused
    r = invoke("meta_trainer_exp.py", *TINY_TRAIN, "--arch", "mobilenetv2_prunednet", "--epochs", "1",
               "--search-resume", search_file, "--inherit", str(other / PRUNINGNET), "--suffix", "_explicit", cwd=other)
    assert_one_line_error(r, "the search scored its candidates with", "this file holds another training run's weights")


def test_inherit_refuses_a_pruningnet_the_search_did_not_use(pruned):
    ckpt = pruned / PRUNINGNET
    kept = pruned / "searched_with.pth.tar"
    shutil.copy(ckpt, kept)
    train(pruned, "--arch", "mobilenetv2_pruningnet", "--epochs", "2", "--resume", PRUNINGNET)  # trained further
    before = snapshot(pruned)
    r = retrain(pruned, "--inherit")
    assert_one_line_error(r, "the search scored its candidates with", "at epoch 1 step 0",
                          "this file holds the weights of epoch 2 step 0")
    r = retrain(pruned, "--inherit", PRUNINGNET)
    assert_one_line_error(r, "the search scored its candidates with")
    assert snapshot(pruned) == before
    assert retrain(pruned, "--inherit", str(kept)).returncode == 0  # a copy of the very weights is fine
    os.remove(ckpt)
    r = retrain(pruned, "--inherit", "--suffix", "_gone")
    assert_one_line_error(r, "--inherit: the PruningNet the search used", "is gone")


# --- names carry every setting; nothing finished is replaced ------------------------------------------

def test_every_candidate_of_a_search_retrains_under_its_own_name(pruned):
    assert retrain(pruned).returncode == 0
    first = (pruned / f"{CKPT}/imagenet_mobilenetv2_prunednet_flops0_best.pth.tar").read_bytes()
    assert retrain(pruned, "--candidate", "1").returncode == 0
    assert (pruned / f"{CKPT}/imagenet_mobilenetv2_prunednet_flops0_candidate1_best.pth.tar").is_file()
    assert (pruned / f"{CKPT}/imagenet_mobilenetv2_prunednet_flops0_best.pth.tar").read_bytes() == first


def test_searches_under_other_budgets_keep_their_own_files(pruned):
    searched(pruned, "--params", "50")
    searched(pruned, "--params", "50", "--min-flops", "0.1")
    names = sorted(p.name for p in (pruned / CKPT).glob("MetaPruneSearch_*_checkpoint.pth.tar"))
    assert names == ["MetaPruneSearch_mobilenetv2_pruningnet_flops0_checkpoint.pth.tar",
                     "MetaPruneSearch_mobilenetv2_pruningnet_flops0_minflops0.1_params50_checkpoint.pth.tar",
                     "MetaPruneSearch_mobilenetv2_pruningnet_flops0_params50_checkpoint.pth.tar"]


@pytest.mark.parametrize("script", ["meta_trainer_exp.py", "meta_search_exp.py", "trainer_exp.py"])
def test_a_finished_run_is_not_replaced_by_a_run_of_the_same_name(pruned, script):
    if script == "meta_search_exp.py":
        argv, own, flag = SEARCH, FLOPS0, "--search-resume"
    elif script == "trainer_exp.py":
        argv = [*TINY_DATA, "--arch", "mobilenetv2_prunednet", "--epochs", "1", "--search-resume", FLOPS0]
        own, flag = f"{CKPT}/imagenet_mobilenetv2_prunednet_flops0_checkpoint.pth.tar", "--resume"
        assert invoke(script, *argv, cwd=pruned).returncode == 0  # the finished run
    else:
        argv, own, flag = [*TINY_TRAIN, "--arch", "mobilenetv2_pruningnet", "--epochs", "1"], PRUNINGNET, "--resume"
    before = snapshot(pruned)
    r = invoke(script, *argv, cwd=pruned)
    assert_one_line_error(r, f"{own} exists: a run of this name wrote it", f"{flag} {own}", "--suffix", "--overwrite")
    assert snapshot(pruned) == before
    r = invoke(script, *argv, "--overwrite", cwd=pruned)
    assert r.returncode == 0, r.stderr
    assert (pruned / own).read_bytes() != before[Path(own)]  # replaced, as asked


def test_resuming_another_runs_checkpoint_under_a_name_in_use_is_refused(pruned):
    train(pruned, "--arch", "mobilenetv2_pruningnet", "--epochs", "1", "--suffix", "_b")
    before = snapshot(pruned)
    r = invoke("meta_trainer_exp.py", *TINY_TRAIN, "--arch", "mobilenetv2_pruningnet", "--epochs", "2", "--suffix",
               "_b", "--resume", PRUNINGNET, cwd=pruned)
    assert_one_line_error(r, "imagenet_mobilenetv2_pruningnet_b_checkpoint.pth.tar exists")
    assert snapshot(pruned) == before


def test_a_second_live_run_of_one_name_stops_with_one_line(work):
    args = [*TINY_TRAIN, "--arch", "mobilenetv2_pruningnet", "--epochs", "50", "--save-every-steps", "1"]
    first = subprocess.Popen([sys.executable, str(ROOT / "meta_trainer_exp.py"), *args], cwd=work,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while not (work / PRUNINGNET).exists():
            assert first.poll() is None and time.time() < deadline, first.communicate()[1][-2000:]
            time.sleep(0.1)
        second = subprocess.run([sys.executable, str(ROOT / "meta_trainer_exp.py"), *args, "--overwrite"], cwd=work,
                                capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert second.returncode == 2, second.stderr
        assert "another run of imagenet_mobilenetv2_pruningnet is writing its files (pid" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=60)
    text = (work / "logs/imagenet_mobilenetv2_pruningnet.txt").read_text()
    assert text.count("config {") == 1  # the second run wrote nothing to the first run's log


# --- resume checks -------------------------------------------------------------------------------------

def test_resume_with_fewer_epochs_than_done_is_refused(work):
    train(work, "--arch", "mobilenetv2_pruningnet", "--epochs", "2")
    before = snapshot(work)
    r = invoke("meta_trainer_exp.py", *TINY_TRAIN, "--arch", "mobilenetv2_pruningnet", "--epochs", "1", "--resume",
               PRUNINGNET, cwd=work)
    assert_one_line_error(r, "has trained 2 epochs, more than --epochs 1", "give --epochs 2")
    assert snapshot(work) == before


def test_mid_epoch_resume_under_a_batch_size_that_cannot_reach_the_same_sample_is_refused(work, monkeypatch):
    from app.engine import Trainer

    original = Trainer.save

    def save_then_die(self, best=False):
        original(self, best)
        raise KeyboardInterrupt  # killed right after the checkpoint of step 1 (8 of 24 images)

    monkeypatch.setattr(Trainer, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(work, "--arch", "mobilenetv2_pruningnet", "--epochs", "1", "--save-every-steps", "1")
    monkeypatch.setattr(Trainer, "save", original)
    args = [a if a != "8" else "3" for a in TINY_TRAIN]  # --batch-size 3: 8 samples are no whole number of steps
    r = invoke("meta_trainer_exp.py", *args, "--arch", "mobilenetv2_pruningnet", "--epochs", "1", "--resume",
               PRUNINGNET, cwd=work)
    assert_one_line_error(r, "stopped 8 samples into epoch 1", "--batch-size 3 on 1 process(es) takes 3",
                          "e.g. the checkpoint's --batch-size 8 on 1 process(es)")


# --- a stop signal after the last iteration ---------------------------------------------------------

def test_a_signal_after_the_last_search_iteration_leaves_complete_outputs(pruned, monkeypatch):
    os.remove(pruned / FLOPS0)
    export = pruned / FLOPS0.replace("_checkpoint.pth.tar", "_best_prunednet.pth.tar")
    os.remove(export)
    original = record.export_best

    def signalled_then_export(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives after the last iteration, before the export
        return original(*args, **kwargs)

    monkeypatch.setattr(record, "export_best", signalled_then_export)
    r = invoke("meta_search_exp.py", *SEARCH, cwd=pruned)
    assert r.returncode == 128 + signal.SIGTERM
    assert export.is_file() and checkpoint.load(export, checkpoint.MODEL)["gene"]
    log = (pruned / "logs/MetaPruneSearch_mobilenetv2_pruningnet_flops0.txt").read_text()
    assert "stopped by signal 15 after the search had finished; its outputs are complete" in log
