"""Real (tiny) training runs of meta_trainer_exp.py and trainer_exp.py on generated JPEG data."""
import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios

import pytest
import torch

from app import checkpoint
from app.engine import Trainer
from conftest import ROOT
from data import fixed_batches, get_data, make_loader
from helpers import SPLITS, TINY_DATA, TINY_TRAIN, invoke, read_jsonl, run_script, train
from models import get_family, list_families
from search.evaluator import CandidateEvaluator

CKPT = "checkpoints/meta_prune"


@pytest.mark.parametrize("family", list_families())
def test_pruningnet_epoch_checkpoint_rebuilds_model(work, family, monkeypatch):
    live = []  # the model the run trained, to compare the one rebuilt from its checkpoint with
    step = Trainer.train_step
    monkeypatch.setattr(Trainer, "train_step", lambda self, *a: live.append(self.model) or step(self, *a))
    train(work, "--arch", f"{family}_pruningnet", "--epochs", "1", "--valuate")
    state = checkpoint.load(work / CKPT / f"imagenet_{family}_pruningnet_checkpoint.pth.tar", checkpoint.MODEL)
    trained, rebuilt = live[-1].state_dict(), checkpoint.build_model(state).state_dict()
    assert trained.keys() == rebuilt.keys() and all(torch.equal(trained[k], rebuilt[k]) for k in trained)
    assert state["epoch"] == 1 and state["gene"] is None and state["arch"] == f"{family}_pruningnet"
    assert {"model", "optimizer", "scheduler", "best_top1", "config", "metrics"} <= set(state)
    assert set(state["metrics"]) == {"top1", "top1_widest", "top1_middle", "top1_narrowest"}
    # --valuate scores the probe genes exactly as the search scores a candidate: recalibrated BN, sub-val split
    monkeypatch.chdir(work)
    data = get_data("imagenet", "img", 24, val_per_class=4, split_dir=SPLITS)
    evaluator = CandidateEvaluator(checkpoint.build_model(state), fixed_batches(data.train_eval, 2, 8, 0),
                                   make_loader(data.subval, 8, False, 0), torch.device("cpu"))
    layout = get_family(family).layout
    assert state["metrics"]["top1_widest"] == evaluator.top1(layout.full())
    assert state["metrics"]["top1_narrowest"] == evaluator.top1(layout.narrowest())
    assert state["config"]["width_mult"] == 0.125
    best = torch.load(work / CKPT / f"imagenet_{family}_pruningnet_best.pth.tar", weights_only=True)
    assert best["epoch"] == 1
    config = json.loads((work / CKPT / f"imagenet_{family}_pruningnet_config.json").read_text())
    assert config["arch"] == f"{family}_pruningnet" and config["batch_size"] == 8
    rows = read_jsonl(work / "logs" / f"imagenet_{family}_pruningnet.jsonl")
    epoch_rows = [r for r in rows if r["kind"] == "epoch"]
    assert len(epoch_rows) == 1 and "val_top1_middle" in epoch_rows[0] and epoch_rows[0]["img_s"] > 0
    assert any(r["kind"] == "step" for r in rows)


def test_pruningnet_draws_a_new_gene_every_step(work, monkeypatch):
    from models import PruningNet

    seen = []
    original = PruningNet.forward
    monkeypatch.setattr(PruningNet, "forward", lambda self, x, gene: seen.append(gene) or original(self, x, gene))
    train(work, "--arch", "resnet50_pruningnet", "--epochs", "1")
    assert len(seen) == 3 and len(set(seen)) == 3  # 24 training images / batch 8
    layout = get_family("resnet50").layout
    assert all(g[4] == 30 and len(g) == len(layout) for g in seen)


def test_prunednet_from_gene_and_inherit(trained):
    work = trained
    gene = [7, 4, 5, 7, 6, 3, 9, 11, -1, 19, 4, 9, 11, 9, 9, 6, 10, 3, 6, 3, 7, 5, 17, 8, 8, 11]
    pruning_ckpt = f"{CKPT}/imagenet_mobilenetv2_pruningnet_checkpoint.pth.tar"
    train(work, "--arch", "mobilenetv2_prunednet", "--gene", str(gene), "--epochs", "1", "--lr", "0",
          "--inherit", pruning_ckpt, "--suffix", "_ft")
    state = checkpoint.load(work / CKPT / "imagenet_mobilenetv2_prunednet_ft_checkpoint.pth.tar", checkpoint.MODEL)
    assert state["gene"] == list(get_family("mobilenetv2").layout.parse(gene))
    pruning = checkpoint.build_model(checkpoint.load(work / pruning_ckpt))
    expected = pruning.materialize(tuple(state["gene"])).state_dict()
    convs = [k for k in expected if k.endswith("conv.weight")]
    assert convs and all(torch.equal(state["model"][k], expected[k]) for k in convs)  # lr 0 keeps inherited weights
    rebuilt = checkpoint.build_model(state)
    assert [m.conv.out_channels for m in rebuilt.conv_bns().values()] == [m.conv.out_channels for m in pruning.materialize(
        tuple(state["gene"])).conv_bns().values()]


def test_interrupted_run_resumes_exactly(work, monkeypatch):
    args = ["--arch", "resnet50_pruningnet", "--epochs", "3", "--valuate", "--lr", "0.05", "--warmup-epochs", "1"]
    train(work, *args, "--suffix", "_straight")
    from app.engine import Trainer

    original, calls = Trainer.train_one_epoch, []

    def interrupted(self, stop):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the run dies during its second epoch
        return original(self, stop)

    monkeypatch.setattr(Trainer, "train_one_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(work, *args, "--suffix", "_cut")
    monkeypatch.setattr(Trainer, "train_one_epoch", original)
    ckpt = f"{CKPT}/imagenet_resnet50_pruningnet_cut_checkpoint.pth.tar"
    assert checkpoint.load(work / ckpt)["epoch"] == 1
    train(work, *args, "--suffix", "_cut", "--resume", ckpt)
    straight = [r for r in read_jsonl(work / "logs/imagenet_resnet50_pruningnet_straight.jsonl") if r["kind"] == "epoch"]
    cut = [r for r in read_jsonl(work / "logs/imagenet_resnet50_pruningnet_cut.jsonl") if r["kind"] == "epoch"]
    assert [r["epoch"] for r in cut] == [r["epoch"] for r in straight] == [1, 2, 3]
    assert [r["lr"] for r in cut] == [r["lr"] for r in straight]
    a = checkpoint.load(work / f"{CKPT}/imagenet_resnet50_pruningnet_straight_checkpoint.pth.tar")
    b = checkpoint.load(work / ckpt)
    assert b["scheduler"]["last_epoch"] == a["scheduler"]["last_epoch"] == 9  # 3 epochs x (24 images / batch 8)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k  # same data order, augmentation, genes and RNG: same weights


def test_trainer_exp_from_json(work):
    exp = work / "baseline.json"
    exp.write_text(json.dumps({"arch": "resnet50_prunednet", "dataset": "imagenet", "epochs": 1, "lr": 0.05}))
    r = invoke("trainer_exp.py", "--json", str(exp), *TINY_DATA[2:], cwd=work)
    assert r.returncode == 0, r.stderr
    state = checkpoint.load(work / CKPT / "imagenet_resnet50_prunednet_best.pth.tar", checkpoint.MODEL)
    assert state["gene"] is None and state["config"]["json"] == str(exp)
    net = checkpoint.build_model(state)
    assert net.gene == get_family("resnet50").layout.full()
    assert "final top1" in r.stdout
    gene = [9] * 4 + [-1] + [9] * 16
    r = invoke("trainer_exp.py", "--json", str(exp), *TINY_DATA[2:], "--gene", str(gene), "--suffix", "_g", cwd=work)
    assert r.returncode == 0, r.stderr
    state = checkpoint.load(work / CKPT / "imagenet_resnet50_prunednet_g_best.pth.tar", checkpoint.MODEL)
    assert get_family("resnet50").layout.format(checkpoint.build_model(state).gene) == gene


@pytest.mark.parametrize("arch", ["mobilenetv2_pruningnet", "resnet50_prunednet"])
def test_channels_last_trains_both_kinds_of_network(work, arch):
    extra = ["--gene", str([5] * 4 + [-1] + [5] * 16)] if "prunednet" in arch else []
    train(work, "--arch", arch, "--epochs", "1", "--channels-last", "--lr", "0.05", *extra)
    state = checkpoint.load(work / CKPT / f"imagenet_{arch}_checkpoint.pth.tar", checkpoint.MODEL)
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_resume_that_does_not_fit_the_run_is_one_line_and_writes_nothing(work):
    train(work, "--arch", "mobilenetv2_pruningnet", "--epochs", "1", "--suffix", "_a")
    ckpt = f"{CKPT}/imagenet_mobilenetv2_pruningnet_a_checkpoint.pth.tar"
    (work / "bad.pth.tar").write_bytes(b"garbage")
    before = sorted(p.relative_to(work) for p in work.rglob("*"))
    cases = [(["--width-mult", "0.25", "--resume", ckpt], "width_mult 0.125 (this run: 0.25)"),
             (["--input-size", "32", "--resume", ckpt], "--input-size 24, not 32"),
             (["--resume", "bad.pth.tar"], "not a PyTorch checkpoint file")]
    for extra, words in cases:
        r = invoke("meta_trainer_exp.py", *TINY_TRAIN, "--arch", "mobilenetv2_pruningnet", "--epochs", "2",
                   "--suffix", "_b", *extra, cwd=work)
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert sorted(p.relative_to(work) for p in work.rglob("*")) == before  # no split, log or checkpoint


def test_mid_epoch_checkpoint_resumes_after_the_same_samples_with_another_batch_size(work, monkeypatch):
    from app.engine import Trainer

    original, saves = Trainer.save, []

    def save_then_die(self, best=False):
        original(self, best)
        saves.append(self.step_in_epoch)
        if len(saves) == 2:
            raise KeyboardInterrupt  # killed right after the checkpoint of step 2 (16 of 24 images)

    monkeypatch.setattr(Trainer, "save", save_then_die)
    args = ["--arch", "resnet50_pruningnet", "--epochs", "1", "--save-every-steps", "1", "--vis-interval", "1"]
    with pytest.raises(KeyboardInterrupt):
        train(work, *args)
    monkeypatch.setattr(Trainer, "save", original)
    ckpt = f"{CKPT}/imagenet_resnet50_pruningnet_checkpoint.pth.tar"
    assert checkpoint.load(work / ckpt)["samples_in_epoch"] == 16
    small = list(TINY_TRAIN)
    small[small.index("--batch-size") + 1] = "4"
    r = invoke("meta_trainer_exp.py", *small, *args, "--resume", ckpt, cwd=work)
    assert r.returncode == 0, r.stderr
    assert "at epoch 0 step 4" in r.stdout  # 16 images = 4 steps of 4
    steps = [row["step"] for row in read_jsonl(work / "logs/imagenet_resnet50_pruningnet.jsonl")
             if row["kind"] == "step"]
    assert steps == [1, 2, 5, 6]  # 2 steps of 8, then the last 8 images in 2 steps of 4
    assert checkpoint.load(work / ckpt)["scheduler"]["last_epoch"] == 6


def test_inherit_from_an_exported_prunednet_of_the_same_gene(work):
    gene = str([9] * 4 + [-1] + [9] * 16)
    train(work, "--arch", "resnet50_prunednet", "--gene", gene, "--epochs", "1", "--suffix", "_src")
    src = f"{CKPT}/imagenet_resnet50_prunednet_src_checkpoint.pth.tar"
    r = invoke("meta_trainer_exp.py", *TINY_TRAIN, "--arch", "resnet50_prunednet", "--gene", gene, "--resume", src,
               "--epochs", "3", "--suffix", "_src", cwd=work)
    assert r.returncode == 0, r.stderr  # a checkpoint with its optimizer resumes
    train(work, "--arch", "resnet50_prunednet", "--gene", gene, "--epochs", "1", "--lr", "0", "--inherit", src,
          "--suffix", "_ft")
    a = checkpoint.load(work / src)["model"]
    b = checkpoint.load(work / f"{CKPT}/imagenet_resnet50_prunednet_ft_checkpoint.pth.tar")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a if k.endswith("conv.weight"))  # lr 0: the inherited weights
    other = str([8] * 4 + [-1] + [8] * 16)
    r = invoke("meta_trainer_exp.py", *TINY_TRAIN, "--arch", "resnet50_prunednet", "--gene", other, "--inherit", src,
               cwd=work)
    assert r.returncode == 2 and "a PrunedNet of gene [9, 9" in r.stderr, r.stderr


def test_progress_bar_on_a_terminal_only(work):
    args = [*TINY_TRAIN, "--arch", "resnet50_prunednet", "--epochs", "2"]
    master, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a new pty is 0 columns wide
    proc = subprocess.Popen([sys.executable, str(ROOT / "meta_trainer_exp.py"), *args], cwd=work,
                            stdout=subprocess.DEVNULL, stderr=terminal, env={**os.environ, "OMP_NUM_THREADS": "1"})
    os.close(terminal)
    shown = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(master)
    assert proc.wait(timeout=120) == 0
    assert b"epoch 1/2" in shown and b"epoch 2/2" in shown and b"it/s" in shown
    piped = run_script("meta_trainer_exp.py", *args, "--suffix", "_piped", cwd=work)
    assert "epoch 1/2" not in piped.stderr and "it/s" not in piped.stderr


def test_data_loader_workers_give_the_batches_of_the_main_process(work):
    """Augmentation is seeded per sample, so worker processes draw exactly what the main process draws."""
    gene = str([7, 4, 5, 7, 6, 3, 9, 11, -1, 19, 4, 9, 11, 9, 9, 6, 10, 3, 6, 3, 7, 5, 17, 8, 8, 11])
    for workers in ("0", "2"):
        train(work, "--arch", "mobilenetv2_prunednet", "--gene", gene, "--epochs", "1", "--workers", workers,
              "--suffix", f"_w{workers}")
    one, two = (checkpoint.load(work / CKPT / f"imagenet_mobilenetv2_prunednet_w{w}_checkpoint.pth.tar")["model"]
                for w in "02")
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


def test_zero_init_residual_reaches_the_prunednet_trained_from_scratch(work):
    """One step at a vanishing lr: the last BN of each residual body keeps the scale it started with."""
    for flag, suffix in (["--zero-init-residual"], "_zero"), ([], "_plain"):
        train(work, "--arch", "mobilenetv2_prunednet", "--epochs", "1", "--steps-per-epoch", "1", "--lr", "1e-12",
              "--suffix", suffix, *flag)
    for suffix, scale in (("_zero", 0.0), ("_plain", 1.0)):
        net = checkpoint.build_model(checkpoint.load(work / CKPT / f"imagenet_mobilenetv2_prunednet{suffix}_checkpoint.pth.tar"))
        scales = [blk.body[-1].bn.weight for blk in net.blocks if blk.identity]
        assert scales and all(torch.allclose(w, torch.full_like(w, scale), atol=1e-6) for w in scales)
