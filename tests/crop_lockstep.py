"""Crop-aware PruningNet training against dense SGD, in lockstep (tests/test_crop_sgd.py).

Trajectories of two separately trained tiny PruningNets part within a few steps whatever the optimizer:
a relative change of 1e-7 in the weights changes some gradients by percents here (narrow BatchNorms over
a few samples). So the dense reference is driven by the crop run's own gradients, expanded to full
size, and the two are compared where each part of the crop path acts: the weights every forward
generates (the catch-up before a corner is read), and every parameter and momentum buffer after N
steps (the lazy updates, the flushes, the fused corner steps). Under torchrun (``python -m
torch.distributed.run --nproc-per-node=2 tests/crop_lockstep.py OUT``) the dense reference is reduced
the dense way, every full-size gradient all-reduced, and the crop run by its crops.
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
from app.crop_sgd import CropGradScaler, CropSGD
from app.engine import build_optimizer, gene_for_step, wrap_ddp
from models import create_model, get_family, list_families


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm().clamp_min(1e-30))


def build(family: str, nesterov: bool, dense: bool, model: torch.nn.Module | None = None,
          device: torch.device = torch.device("cpu")):
    model = model or create_model(f"{family}_pruningnet", num_classes=5, width_mult=0.125, small_input=True).to(device)
    optimizer = build_optimizer(model, lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=nesterov, by_crop=not dense)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / 100)
    return model, optimizer, schedule


def expand_crop_gradients(dense: torch.nn.Module, crop: torch.nn.Module) -> None:
    """Give ``dense`` the gradients ``crop`` just computed: its ``.grad``s, and every generator's crop
    gradients as the full-size, zero-filled ``.grad`` autograd would have made."""
    for p, q in zip(dense.parameters(), crop.parameters()):
        p.grad = None if q.grad is None else q.grad.clone()
    for d, c in zip(dense.convs.values(), crop.convs.values()):
        d.weight2.grad, d.bias2.grad = torch.zeros_like(d.weight2), torch.zeros_like(d.bias2)
        for g in c.crop_grads:
            d.weight2.grad[:g.cout, :g.cin] += g.dw.unsqueeze(-1) * g.hidden
            d.bias2.grad[:g.cout, :g.cin] += g.dw


def lockstep(family: str, nesterov: bool, steps: int, resume_at: int | None = None, genes_per_step: int = 1,
             seed: int = 0, scaled: bool = False, device: torch.device = torch.device("cpu")) -> dict[str, float]:
    """Train ``steps`` steps both ways (optionally moving the crop run through a state dict at step
    ``resume_at``, or with a GradScaler's scaled losses); the largest relative differences of the
    generated weights, parameters and momentum. Under torchrun each process trains its own batches;
    the crop run reduces by crop, the dense one all-reduces every full-size gradient."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.manual_seed(seed)
    crop, crop_opt, crop_schedule = build(family, nesterov, dense=False, device=device)
    dense, dense_opt, dense_schedule = build(family, nesterov, dense=True, model=copy.deepcopy(crop))
    assert isinstance(crop_opt, CropSGD) and not isinstance(dense_opt, CropSGD)
    ddp = wrap_ddp(crop, device, pruningnet=True, by_crop=True) if world > 1 else crop
    scalers = [CropGradScaler(device.type, init_scale=256.0, enabled=scaled),
               torch.amp.GradScaler(device.type, init_scale=256.0, enabled=scaled)]
    layout = get_family(family).layout
    data = torch.Generator().manual_seed(1000 * seed + rank)
    worst = {"generated": 0.0, "params": 0.0, "momentum": 0.0}
    for step in range(steps):
        if step == resume_at and world == 1:  # the crop run goes on from its state dicts in a new model and optimizer
            state = {"model": copy.deepcopy(crop.state_dict()), "optimizer": copy.deepcopy(crop_opt.state_dict()),
                     "schedule": crop_schedule.state_dict()}
            crop, crop_opt, crop_schedule = build(family, nesterov, dense=False, device=device)
            crop.load_state_dict(state["model"])
            crop_opt.load_state_dict(state["optimizer"])
            crop_schedule.load_state_dict(state["schedule"])
            ddp = crop
        genes = [gene_for_step(layout, seed, genes_per_step * step + k) for k in range(genes_per_step)]
        crop_opt.zero_grad()
        for gene in genes:
            x = torch.randn(4, 3, 16, 16, generator=data).to(device)
            y = torch.randint(0, 5, (4,), generator=data).to(device)
            with torch.no_grad():
                want = dense.generate(gene)
            loss = F.cross_entropy(ddp(x, gene), y)
            scalers[1].scale(loss.detach())  # the dense run's scaler sets up its scale at its first scale()
            scalers[0].scale(loss).backward()
            with torch.no_grad():  # what the forward generated: nothing has moved the weights since
                got = crop.generate(gene)
            worst["generated"] = max(worst["generated"], *(relative(w, got[name]) for name, w in want.items()))
        expand_crop_gradients(dense, crop)
        if world > 1:
            for d in dense.convs.values():  # the dense reduction of the generators; the rest DDP reduced already
                for g in (d.weight2.grad, d.bias2.grad):
                    dist.all_reduce(g)
                    g.div_(world)
            crop_opt.all_reduce_crop_gradients()
        for scaler, opt in zip(scalers, (crop_opt, dense_opt)):
            scaler.step(opt)
            scaler.update()
        dense_schedule.step()
        crop_schedule.step()
    crop_opt.state_dict()  # what a checkpoint reads: it brings the crop run up to date
    with torch.no_grad():
        for p, q in zip(dense.parameters(), crop.parameters()):
            worst["params"] = max(worst["params"], relative(p, q))
            buffers = dense_opt.state[p]["momentum_buffer"], crop_opt.state[q]["momentum_buffer"]
            worst["momentum"] = max(worst["momentum"], relative(*buffers))
    if world > 1:
        mine = torch.cat([p.detach().reshape(-1) for p in crop.parameters()])
        theirs = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(theirs, mine)
        worst["ranks_apart"] = max(float((t - mine).abs().max()) for t in theirs)
    return worst


if __name__ == "__main__":
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    result = {family: lockstep(family, nesterov=family == "resnet50", steps=20) for family in list_families()}
    if dist.get_rank() == 0:
        Path(sys.argv[1]).write_text(json.dumps(result))
    dist.destroy_process_group()
