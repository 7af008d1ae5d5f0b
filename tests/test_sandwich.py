"""PruningNet training options --sandwich N and --distill (app/engine.py GeneSchedule, Trainer.train_step)."""
import argparse
import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import app.engine
from app import checkpoint
from app.distributed import Dist
from app.engine import GeneSchedule, Trainer, gene_for_step
from conftest import ROOT
from data.synthetic import make_image_folder
from helpers import TINY_TRAIN, assert_one_line_error, invoke, read_jsonl, train
from models import create_model, get_family, list_families
from utils.logger import RunLogger

CKPT = "checkpoints/meta_prune"
PN = f"{CKPT}/imagenet_mobilenetv2_pruningnet_checkpoint.pth.tar"


@pytest.mark.parametrize("family", list_families())
def test_the_sandwich_schedule_is_widest_narrowest_then_random_genes_of_seed_and_step(family):
    layout = get_family(family).layout
    plain, sandwich = GeneSchedule(layout, 3), GeneSchedule(layout, 3, sandwich=2)
    assert [plain.genes(s) for s in range(5)] == [(gene_for_step(layout, 3, s),) for s in range(5)]
    steps = [sandwich.genes(s) for s in range(40)]
    assert all(len(g) == 4 and g[0] == layout.full() and g[1] == layout.narrowest() for g in steps)
    randoms = [g for step in steps for g in step[2:]]
    assert len(set(randoms)) == len(randoms)  # fresh random genes at every step, none repeated
    assert steps == [GeneSchedule(layout, 3, sandwich=2).genes(s) for s in range(40)]  # a function of (seed, step)
    assert GeneSchedule(layout, 4, sandwich=2).genes(7)[2:] != steps[7][2:]
    assert GeneSchedule(layout, 3, sandwich=0).genes(7) == steps[7][:2]


def tiny_trainer(schedule_kw: dict) -> Trainer:
    """A Trainer around a tiny ResNet50 PruningNet (no dropout: two forwards of one gene agree)."""
    torch.manual_seed(0)
    net = create_model("resnet50_pruningnet", num_classes=4, width_mult=0.125, small_input=True)
    config = {"lr": 0.1, "momentum": 0.9, "nesterov": False, "weight_decay": 1e-4, "label_smoothing": 0.0,
              "lr_scheduler": "linear", "warmup_epochs": 0, "epochs": 1, "steps_per_epoch": 0, "amp": None,
              "channels_last": False, "sync_bn": False, "dataset": "imagenet", "arch": "resnet50_pruningnet",
              "lr_milestones": None, "lr_gamma": 0.1, "depthwise_decay": True, "dropout": None, "suffix": "",
              "seed": 0, "input_size": 16, "dense_generator_update": False, "output_dir": "."}
    return Trainer(argparse.Namespace(**config), net, {}, range(100), torch.device("cpu"), RunLogger(None, enabled=False),
                   validate=dict, schedule=GeneSchedule(net.spec.layout, 0, **schedule_kw))


@pytest.mark.parametrize("distill", [False, True])
def test_distillation_teaches_every_gene_but_the_widest_with_the_widests_predictions(distill, monkeypatch):
    trainer = tiny_trainer({"sandwich": 1, "distill": distill})
    before = copy.deepcopy(trainer.model)
    x, y = torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 3, 0, 1])
    genes = trainer.schedule.genes(0)
    soft, hard = [], []
    monkeypatch.setattr(app.engine, "soft_cross_entropy",
                        lambda out, teacher: soft.append((out.detach(), teacher)) or -(teacher * out.log_softmax(1)).sum(1).mean())
    criterion = trainer.criterion
    trainer.criterion = lambda out, target: hard.append((out.detach(), target)) or criterion(out, target)
    trainer.train_step(x, y, genes)
    with torch.no_grad():  # the same forwards (training-mode BN, no dropout) with the weights before the step
        outputs = [before(x, g) for g in genes]
    if distill:
        assert len(hard) == 1 and torch.equal(hard[0][1], y)  # only the widest gene learns from the labels
        torch.testing.assert_close(hard[0][0], outputs[0])
        assert len(soft) == 2
        for (out, teacher), want in zip(soft, outputs[1:]):
            torch.testing.assert_close(teacher, outputs[0].softmax(1))  # the widest gene's soft predictions
            torch.testing.assert_close(out, want)
    else:
        assert soft == [] and len(hard) == 3
        for (out, target), want in zip(hard, outputs):
            torch.testing.assert_close(out, want)
            assert torch.equal(target, y)


def test_a_sandwich_step_adds_up_the_gradients_of_its_genes():
    trainer = tiny_trainer({"sandwich": 1})
    reference = copy.deepcopy(trainer.model)
    a = trainer.args
    opt = app.engine.build_optimizer(reference, a.lr, a.momentum, a.weight_decay, a.nesterov, by_crop=False)
    x, y = torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 3, 0, 1])
    genes = trainer.schedule.genes(0)
    for g in genes:  # the dense reference: one backward per gene into the same .grad
        F.cross_entropy(reference(x, g), y).backward()
    for group in opt.param_groups:
        group["lr"] = trainer.optimizer.param_groups[0]["lr"]  # the schedule's first step
    opt.step()
    trainer.train_step(x, y, genes)
    trainer.optimizer.flush()
    for (name, a), b in zip(trainer.model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


def test_every_process_flushes_the_crop_updates_when_a_checkpoint_is_saved():
    trainer = tiny_trainer({})
    x, y = torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 3, 0, 1])
    trainer.train_step(x, y, trainer.schedule.genes(0))
    assert trainer.optimizer.pending_steps == 1
    trainer.dist = Dist(1, 2, 1)  # a process that does not write the checkpoint
    trainer.save()
    assert trainer.optimizer.pending_steps == 0


@pytest.fixture
def work(tmp_path):
    make_image_folder(tmp_path / "img", num_classes=3, train_per_class=20, val_per_class=3, size=24)
    return tmp_path


RUN = ["--arch", "mobilenetv2_pruningnet", "--lr", "0.05", "--deterministic", "--sandwich", "1", "--distill"]


def test_a_sandwich_run_resumes_exactly_and_its_pruningnet_searches_and_retrains(work, monkeypatch):
    run = [*RUN, "--epochs", "2", "--save-every-steps", "4"]
    train(work, *run, "--suffix", "_straight")
    original = Trainer.save

    def save_then_die(self, best=False):
        original(self, best)
        if self.epoch == 0 and self.step_in_epoch == 4:
            raise KeyboardInterrupt  # stopped mid-epoch, mid-window of the lazy updates

    monkeypatch.setattr(Trainer, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(work, *run)
    monkeypatch.setattr(Trainer, "save", original)
    train(work, *run, "--resume", PN)
    straight = checkpoint.load(work / f"{CKPT}/imagenet_mobilenetv2_pruningnet_straight_checkpoint.pth.tar")
    resumed = checkpoint.load(work / PN)
    assert all(torch.equal(v, resumed["model"][k]) for k, v in straight["model"].items())
    steps = [r for r in read_jsonl(work / "logs/imagenet_mobilenetv2_pruningnet.jsonl") if r["kind"] == "step"]
    schedule = GeneSchedule(get_family("mobilenetv2").layout, 0, sandwich=1)
    assert [r["gene"] for r in steps] == [schedule.format(schedule.genes(r["step"] - 1)) for r in steps]
    r = invoke("meta_trainer_exp.py", *TINY_TRAIN, *RUN[:-3], "--epochs", "3", "--resume", PN, cwd=work)
    assert_one_line_error(r, "the checkpoint was trained --sandwich 1", "resume --sandwich 1")
    r = invoke("meta_search_exp.py", *TINY_TRAIN[:-2], "--arch", "mobilenetv2_pruningnet", "--resume", PN,
               "--epochs", "1", "--population", "4", "--select-num", "2", "--mutation-num", "1", "--crossover-num", "1",
               "--recal-batches", "2", cwd=work)
    assert r.returncode == 0, r.stderr
    search = f"{CKPT}/MetaPruneSearch_mobilenetv2_pruningnet_flops0_checkpoint.pth.tar"
    train(work, "--arch", "mobilenetv2_prunednet", "--epochs", "1", "--search-resume", search, "--inherit")


@pytest.mark.parametrize("argv, words", [
    (["--arch", "mobilenetv2_prunednet", "--sandwich", "1"], "--sandwich and --distill train a PruningNet"),
    (["--arch", "mobilenetv2_pruningnet", "--distill"], "--distill needs --sandwich N"),
    (["--arch", "mobilenetv2_pruningnet", "--sandwich", "-1"], "--sandwich N takes 0 to 64 random genes"),
    (["--arch", "mobilenetv2_pruningnet", "--zero-init-residual"], "--zero-init-residual initialises a PrunedNet"),
    (["--arch", "mobilenetv2_prunednet", "--zero-init-residual", "--inherit", "x.pth.tar"],
     "--zero-init-residual initialises a PrunedNet"),
])
def test_bad_sandwich_flags_are_one_line(work, argv, words):
    r = invoke("meta_trainer_exp.py", *TINY_TRAIN, *argv, "--dry-run", cwd=work)
    assert_one_line_error(r, words)


def test_two_processes_train_the_same_sandwich_genes(work):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(ROOT / "meta_trainer_exp.py"), *TINY_TRAIN, *RUN, "--epochs", "1", "--vis-interval", "1",
           "--batch-size", "4"]
    r = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    steps = [r for r in read_jsonl(work / "logs/imagenet_mobilenetv2_pruningnet.jsonl") if r["kind"] == "step"]
    assert len(steps) == 6  # every step checked that both processes drew these genes (log_step)
    schedule = GeneSchedule(get_family("mobilenetv2").layout, 0, sandwich=1)
    assert [r["gene"] for r in steps] == [schedule.format(schedule.genes(r["step"] - 1)) for r in steps]
