"""The options MetaPruning's official recipes need: step decay, PCA lighting, weight decay without the
depthwise convs, dropout as a flag, and a recalibration batch size of its own."""
import json

import pytest
import torch
from torch import nn

from app.engine import LRSchedule, Trainer, build_optimizer
from data import folder
from helpers import TINY_DATA, TINY_TRAIN, assert_one_line_error, dry_run, invoke, train
from models import create_model
from search.evaluator import CandidateEvaluator

TINY = dict(num_classes=5, width_mult=0.25, small_input=True)


def schedule(**kw) -> LRSchedule:
    return LRSchedule("step", epochs=10, milestones=(3, 6), gamma=0.1, **kw)


# the progress of a step is counted at its end: the last step of epoch 2 ends at 3.0
@pytest.mark.parametrize("progress, factor", [(0.01, 1.0), (3.0, 1.0), (3.001, 0.1), (6.0, 0.1), (6.5, 0.01),
                                              (10.0, 0.01)])
def test_step_decay_multiplies_by_gamma_at_each_milestone(progress, factor):
    assert schedule().factor(progress) == pytest.approx(factor)


def test_step_decay_after_warmup():
    args = schedule(warmup_epochs=2)
    assert args.factor(1.0) == pytest.approx(0.5) and args.factor(2.5) == 1.0
    assert args.factor(3.5) == pytest.approx(0.1)


def test_step_decay_in_a_run_starts_with_the_milestone_epoch(work, monkeypatch):
    used, step = [], Trainer.train_step
    monkeypatch.setattr(Trainer, "train_step", lambda self, *a: used.append(self.optimizer.param_groups[0]["lr"])
                        or step(self, *a))
    exp = work / "step.json"
    exp.write_text(json.dumps({"lr_scheduler": "step", "lr_milestones": [1], "lr_gamma": 0.5}))  # a JSON list
    train(work, "--arch", "resnet50_pruningnet", "--epochs", "2", "--json", str(exp), "--lr", "0.1")
    assert used == pytest.approx([0.1] * 3 + [0.05] * 3)  # 3 steps per epoch; epoch 1 is the first to decay


@pytest.mark.parametrize("args, words", [
    (["--lr-scheduler", "step"], "--lr-scheduler step needs --lr-milestones"),
    (["--lr-scheduler", "step", "--lr-milestones", "5", "3"], "--lr-milestones must be increasing epochs in 1..9"),
    (["--lr-scheduler", "step", "--lr-milestones", "10"], "--lr-milestones must be increasing epochs in 1..9"),
    (["--lr-gamma", "1.5"], "--lr-gamma must be a finite number in [0, 1)"),
    (["--lighting", "-1"], "--lighting must be a finite number >= 0"),
    (["--dropout", "1"], "--dropout must be a finite number in [0, 1)"),
    (["--lighting", "0.1", "--dataset", "fashionmnist"], "--lighting is noise on colour photos"),
])
def test_recipe_flags_out_of_range_are_one_line(work, args, words):
    r = invoke("meta_trainer_exp.py", *TINY_TRAIN, "--arch", "resnet50_pruningnet", "--epochs", "10", *args, cwd=work)
    assert_one_line_error(r, words)


def test_lighting_adds_the_imagenet_principal_components_scaled_by_a_normal_draw():
    image = torch.rand(3, 4, 5)
    torch.manual_seed(3)
    out = folder.Lighting(0.1)(image)
    torch.manual_seed(3)
    alpha = torch.randn(3) * 0.1
    eigval = [0.2175, 0.0188, 0.0045]
    eigvec = [[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]]
    for c in range(3):  # channel c moves by sum_j eigvec[c][j] * alpha_j * eigval_j, everywhere alike
        shift = sum(eigvec[c][j] * float(alpha[j]) * eigval[j] for j in range(3))
        torch.testing.assert_close(out[c] - image[c], torch.full((4, 5), shift), rtol=0, atol=1e-6)
    train_tf, _ = folder.transforms(16, lighting=0.1)
    assert any(isinstance(t, folder.Lighting) for t in train_tf.transforms)
    assert not any(isinstance(t, folder.Lighting) for t in folder.transforms(16)[0].transforms)


@pytest.mark.parametrize("arch", ["mobilenetv2_prunednet", "mobilenetv2_pruningnet"])
def test_no_depthwise_decay_spares_exactly_the_depthwise_weights(arch):
    model = create_model(arch, **TINY)
    decayed = {id(p) for p in build_optimizer(model, lr=0.1, momentum=0.9, weight_decay=4e-5, depthwise_decay=False)
               .param_groups[0]["params"]}
    if arch.endswith("prunednet"):
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                assert (id(m.weight) in decayed) == (m.groups == 1), m  # full and 1x1 convs only
        assert id(model.classifier.weight) in decayed
    else:
        for m in model.convs.values():
            assert (id(m.weight2) in decayed) == (not m.spec.depthwise), m.spec.name
    all_in = {id(p) for p in build_optimizer(model, lr=0.1, momentum=0.9, weight_decay=4e-5).param_groups[0]["params"]}
    assert decayed < all_in  # by default the depthwise weights decay too


def test_resume_under_other_weight_decay_groups_is_one_line(work):
    train(work, "--arch", "mobilenetv2_pruningnet", "--epochs", "1", "--no-depthwise-decay")
    r = invoke("meta_trainer_exp.py", *TINY_TRAIN, "--arch", "mobilenetv2_pruningnet", "--epochs", "2", "--resume",
               "checkpoints/meta_prune/imagenet_mobilenetv2_pruningnet_checkpoint.pth.tar", cwd=work)
    assert_one_line_error(r, "built with --no-depthwise-decay", "resume with --no-depthwise-decay")
    train(work, "--arch", "mobilenetv2_pruningnet", "--epochs", "2", "--no-depthwise-decay", "--resume",
          "checkpoints/meta_prune/imagenet_mobilenetv2_pruningnet_checkpoint.pth.tar")


@pytest.mark.parametrize("arch, flag, expected", [
    ("mobilenetv2_prunednet", [], 0.2), ("mobilenetv2_prunednet", ["--dropout", "0"], None),
    ("resnet50_prunednet", [], None), ("resnet50_prunednet", ["--dropout", "0.3"], 0.3),
])
def test_dropout_is_a_training_flag(work, monkeypatch, arch, flag, expected):
    seen, fit = [], Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self, state=None: seen.append(self.model.dropout) or fit(self, state))
    train(work, "--arch", arch, "--epochs", "1", *flag)
    assert (seen[0].p if isinstance(seen[0], nn.Dropout) else None) == expected


def test_recalibration_batches_have_their_own_size(work, monkeypatch):
    sizes, original = [], CandidateEvaluator.__init__

    def record(self, net, recal, *args, **kwargs):
        sizes.extend(len(x) for x in recal)
        original(self, net, recal, *args, **kwargs)

    monkeypatch.setattr(CandidateEvaluator, "__init__", record)
    train(work, "--arch", "resnet50_pruningnet", "--epochs", "1", "--recal-batch-size", "5", "--recal-batches", "3")
    assert sizes == [5, 5, 5]
    cfg = dry_run("meta_search_exp.py", "--arch", "resnet50_pruningnet", *TINY_DATA, "--recal-batch-size", "1000",
                  cwd=work)
    assert cfg["recal_batch_size"] == 1000 and cfg["batch_size"] == 8


@pytest.mark.parametrize("script, args, words", [
    ("trainer_exp.py", ["--arch", "resnet50_prunednet", "--dataset", "fashionmnist", "--lighting", "0.1"],
     "--lighting is noise on colour photos"),
    ("meta_search_exp.py", ["--arch", "mobilenetv2_pruningnet", "--recal-batch-size", "0"],
     "--recal-batch-size must be a positive integer, got 0"),
])
def test_recipe_flags_are_checked_before_any_work_also_in_a_dry_run(tmp_path, script, args, words):
    assert_one_line_error(invoke(script, *args, "--dry-run", cwd=tmp_path), words)
