"""Crop-aware PruningNet training (app/crop_sgd.py): the same SGD as the dense path, exactly."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from app.crop_sgd import CropGradScaler, CropSGD, step_map
from app.engine import gene_for_step
from conftest import ROOT
from crop_lockstep import build, expand_crop_gradients, lockstep
from models import create_model, get_family, list_families

FAMILIES = list_families()
TOLERANCE = 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_the_crop_backward_gives_autograds_gradients(family):
    torch.manual_seed(0)
    dense = create_model(f"{family}_pruningnet", num_classes=5, width_mult=0.125, small_input=True).eval()
    crop = copy.deepcopy(dense)
    for m in crop.convs.values():
        m.crop_grads = []
    gene = gene_for_step(get_family(family).layout, 0, 3)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    for net in (dense, crop):  # eval mode: no dropout draw, the two forwards are the same computation
        F.cross_entropy(net(x, gene), y).backward()
    for d, c in zip(dense.convs.values(), crop.convs.values()):
        assert c.weight2.grad is None and c.bias2.grad is None  # no full-size gradient exists
        assert len(c.crop_grads) == 1
    reference = copy.deepcopy(dense)
    expand_crop_gradients(reference, crop)
    for (name, p), q in zip(dense.named_parameters(), reference.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_crop_training_equals_dense_sgd(family, nesterov):
    # 40 steps: two flushes of the 16-step window and a part-window left in the lazy state at the end
    worst = lockstep(family, nesterov, steps=40)
    assert max(worst.values()) <= TOLERANCE, worst


@pytest.mark.parametrize("family", FAMILIES)
def test_crop_training_equals_dense_sgd_across_a_resume(family):
    worst = lockstep(family, nesterov=True, steps=30, resume_at=21)  # mid-window: state_dict brings it up to date
    assert max(worst.values()) <= TOLERANCE, worst


@pytest.mark.parametrize("nesterov", [False, True])
def test_crop_training_under_a_grad_scaler_equals_dense_sgd(nesterov):
    # the scaled path: PyTorch's fused kernel unscales the corner's gradient on the device
    worst = lockstep("resnet50", nesterov, steps=20, scaled=True)
    assert max(worst.values()) <= TOLERANCE, worst


def test_several_genes_per_step_accumulate_their_crops_exactly():
    # corners of different shapes in one step: the step catches up their union's bounding box
    worst = lockstep("mobilenetv2", nesterov=False, steps=20, genes_per_step=3)
    assert max(worst.values()) <= TOLERANCE, worst


def test_the_zero_gradient_map_is_pytorchs_step():
    for group in ({"lr": 0.3, "weight_decay": 0.1, "momentum": 0.9, "dampening": 0.0, "nesterov": False},
                  {"lr": 0.3, "weight_decay": 0.1, "momentum": 0.9, "dampening": 0.0, "nesterov": True},
                  {"lr": 0.3, "weight_decay": 0.1, "momentum": 0.8, "dampening": 0.25, "nesterov": False},
                  {"lr": 0.3, "weight_decay": 0.1, "momentum": 0.0, "dampening": 0.0, "nesterov": False}):
        w, m = torch.tensor([2.0], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64)
        opt = torch.optim.SGD([w], **{k: v for k, v in group.items()})
        w.grad = torch.zeros_like(w)
        if group["momentum"]:
            opt.state[w]["momentum_buffer"] = m.clone()
        a, b, c, d = step_map(group)
        before = (2.0, 0.5)
        opt.step()
        assert float(w) == pytest.approx(a * before[0] + b * before[1], rel=1e-12), group
        if group["momentum"]:
            assert float(opt.state[w]["momentum_buffer"]) == pytest.approx(c * before[0] + d * before[1], rel=1e-12)


def test_an_overflow_in_a_crop_gradient_alone_skips_the_step_and_lowers_the_scale():
    torch.manual_seed(0)
    model, opt, _ = build("mobilenetv2", nesterov=False, dense=False)
    scaler = CropGradScaler("cpu", init_scale=1024.0)
    gene = gene_for_step(model.spec.layout, 0, 0)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    for _ in range(2):  # a normal step first: the window holds a pending product
        opt.zero_grad()
        scaler.scale(F.cross_entropy(model(x, gene), y)).backward()
        scaler.step(opt)
        scaler.update()
    before = {k: v.detach().clone() for k, v in model.state_dict().items() if ".bns." not in k}  # up to date
    opt.zero_grad()
    scaler.scale(F.cross_entropy(model(x, gene), y)).backward()
    model.convs["stage2_0_expand"].crop_grads[0].dw[0, 0, 0] = float("inf")  # every .grad stays finite
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 512.0
    after = {k: v for k, v in model.state_dict().items() if ".bns." not in k}  # BN statistics move in any forward
    assert all(torch.equal(v, before[k]) for k, v in after.items()), "a skipped step moved weights"


def test_the_default_optimizer_of_a_pruningnet_is_crop_sgd_and_the_flag_keeps_the_dense_path():
    _, crop_opt, _ = build("resnet50", nesterov=False, dense=False)
    _, dense_opt, _ = build("resnet50", nesterov=False, dense=True)
    assert isinstance(crop_opt, CropSGD) and type(dense_opt) is torch.optim.SGD
    # the state dicts are the same format: each loads into the other
    crop_opt.load_state_dict(dense_opt.state_dict())
    dense_opt.load_state_dict(crop_opt.state_dict())


def test_two_processes_reduce_by_crop_as_the_dense_all_reduce_does(tmp_path):
    out = tmp_path / "lockstep.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(ROOT / "tests/crop_lockstep.py"), str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for family, worst in json.loads(out.read_text()).items():
        assert worst.pop("ranks_apart") == 0.0, family  # both processes hold the very same weights
        assert max(worst.values()) <= TOLERANCE, (family, worst)



def test_the_training_script_trains_the_same_weights_on_either_path(work):
    """``--dense-generator-update`` and the crop-aware default train the same network through the
    script: lazy updates flushed into the checkpoint, no step lost or doubled. Two steps, because
    separately trained tiny PruningNets part from the third step on whatever the optimizer (see
    crop_lockstep.py); the second step moves every element the first one touched by momentum alone."""
    from app import checkpoint
    from helpers import train

    args = ["--arch", "resnet50_pruningnet", "--epochs", "1", "--steps-per-epoch", "2", "--warmup-epochs", "0",
            "--deterministic", "--no-valuate"]
    for suffix, extra in (("_crop", []), ("_dense", ["--dense-generator-update"]), ("_start", ["--lr", "0"])):
        train(work, *args, "--suffix", suffix, *extra)
    crop, dense, start = (checkpoint.load(work / f"checkpoints/meta_prune/imagenet_resnet50_pruningnet{s}_checkpoint"
                                          ".pth.tar")["model"] for s in ("_crop", "_dense", "_start"))
    for name, d in dense.items():
        if name.endswith(("weight2", "bias2")):
            moved = torch.linalg.norm(d - start[name])
            assert moved > 0, name  # every generator trained
            apart = torch.linalg.norm(crop[name] - d)
            # the first step's gradients differ in rounding (factored vs autograd), nothing more: a missed
            # momentum or decay update would be a sizeable part of what the two steps moved
            assert apart <= TOLERANCE * torch.linalg.norm(d) and apart <= 1e-3 * moved, name
        elif d.is_floating_point():
            assert torch.linalg.norm(crop[name] - d) <= TOLERANCE * torch.linalg.norm(d).clamp_min(1e-12), name
        else:
            assert torch.equal(crop[name], d), name  # BN batch counters
