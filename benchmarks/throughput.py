"""Throughput suite: cost model, PruningNet training, candidate scoring — CPU always, CUDA when present.

Run: ``.venv/bin/python benchmarks/throughput.py [--quick] [--device cpu|cuda] [--out benchmarks/results]``.
Writes ``throughput_{device}.json`` and prints a Markdown table. Synthetic tensors stand in for
images (the data pipeline is not what is measured); every number is the median of repeated runs.

- cost model: genes costed per second, one core (target ≥ 20,000 for ResNet50);
- PruningNet training: images/s of the training scripts' own step (gene draw, weight generation,
  forward, backward, crop-aware SGD);
- candidate scoring: candidates per minute (materialize, BN recalibration on a fixed set, top-1 on a
  fixed evaluation set) and the share of that time spent outside the PrunedNet forward passes.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from app.engine import GeneSchedule, Trainer, evaluate, gene_for_step
from models import create_model, get_family, list_families, recalibrate_bn
from models.cost import cost_model
from utils.logger import RunLogger


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    return platform.processor() or platform.machine()


def save_result(folder: str, name: str, result: dict) -> None:
    """A benchmark's results as JSON in ``folder`` (made if missing)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(result, indent=1))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cost_rate(arch: str, n: int = 20000) -> float:
    layout, model, rng = get_family(arch).layout, cost_model(arch), random.Random(0)
    genes = [layout.sample(rng) for _ in range(n)]
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for g in genes:
            model(g)
        best = min(best, time.perf_counter() - t)
    return n / best


def training_step(arch: str, device: torch.device, size: int, width: float, amp: str | None = None,
                  channels_last: bool = False, dense_generator_update: bool = False) -> tuple[Trainer, torch.nn.Module]:
    """The training scripts' own step (``Trainer.train_step``: crop-aware or dense SGD, GradScaler,
    autocast, channels-last) around a full-size PruningNet, without data or logging."""
    torch.manual_seed(0)
    net = create_model(f"{arch}_pruningnet", num_classes=1000, width_mult=width, small_input=False).to(device)
    config = {"lr": 0.1, "momentum": 0.9, "nesterov": False, "weight_decay": 1e-4, "label_smoothing": 0.1,
              "lr_scheduler": "linear", "warmup_epochs": 0, "epochs": 1, "steps_per_epoch": 0, "amp": amp,
              "channels_last": channels_last, "sync_bn": False, "dataset": "imagenet", "arch": f"{arch}_pruningnet",
              "lr_milestones": None, "lr_gamma": 0.1, "depthwise_decay": True, "dropout": None,
              "suffix": "", "seed": 0, "input_size": size, "dense_generator_update": dense_generator_update,
              "output_dir": "."}
    trainer = Trainer(argparse.Namespace(**config), net, {}, range(10 ** 6), device, RunLogger(None, enabled=False),
                      validate=dict, schedule=GeneSchedule(net.spec.layout, 0))
    return trainer, net


def train_rate(arch: str, device: torch.device, size: int, batch: int, width: float, steps: int,
               amp: str | None = None, channels_last: bool = False) -> float:
    """Images/s of PruningNet training steps, each with a fresh gene (dense against crop-aware:
    ``benchmarks/crop_training.py``)."""
    trainer, net = training_step(arch, device, size, width, amp, channels_last)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    times = []
    for step in range(steps + 2):  # two warmup steps
        sync(device)
        t = time.perf_counter()
        trainer.train_step(x, y, (gene_for_step(net.spec.layout, 0, step),))
        sync(device)
        times.append(time.perf_counter() - t)
    return batch / statistics.median(times[2:])


def scoring_rate(arch: str, device: torch.device, size: int, batch: int, recal: int, evals: int,
                 candidates: int) -> tuple[float, float]:
    """Candidates/min of materialize + recalibrate + evaluate, and the share of time outside forwards."""
    torch.manual_seed(0)
    net = create_model(f"{arch}_pruningnet", num_classes=1000, small_input=False).to(device).eval()
    recal_set = [torch.randn(batch, 3, size, size, device=device) for _ in range(recal)]
    eval_set = [(torch.randn(batch, 3, size, size, device=device), torch.randint(0, 1000, (batch,), device=device))
                for _ in range(evals)]
    forward, began = 0.0, [0.0]

    def timed(module):
        """Count the wall time of every whole-network forward pass."""
        def pre(*_):
            sync(device)
            began[0] = time.perf_counter()

        def post(*_):
            nonlocal forward
            sync(device)
            forward += time.perf_counter() - began[0]
        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)
        return module

    rng = random.Random(0)
    genes = [net.spec.layout.sample(rng) for _ in range(candidates + 1)]
    with torch.no_grad():
        pruned = timed(net.materialize(genes[0]))  # warmup
        recalibrate_bn(pruned, recal_set)
        evaluate(pruned, eval_set, device)
    forward = 0.0
    sync(device)
    start = time.perf_counter()
    for g in genes[1:]:
        with torch.no_grad():
            pruned = timed(net.materialize(g))
            recalibrate_bn(pruned, recal_set)
        evaluate(pruned, eval_set, device)
    sync(device)
    total = time.perf_counter() - start
    return candidates / total * 60, 1 - forward / total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    device = torch.device(args.device)
    steps = 2 if args.quick else 5
    rows = []
    torch.set_num_threads(1)
    for arch in list_families():
        rows.append({"what": "cost model", "arch": arch, "setting": "224px, 1 core", "value": round(cost_rate(arch)),
                     "unit": "genes/s"})
    torch.set_num_threads(len(os.sched_getaffinity(0)))  # training and scoring use every core
    cpu = device.type == "cpu"
    for arch in list_families():
        settings = [(64, 16, None, False)] if cpu else [(224, 64, None, False), (224, 64, "bf16", False),
                                                        (224, 64, "bf16", True)]
        for size, batch, amp, cl in settings:
            rate = train_rate(arch, device, size, batch, 1.0, steps, amp, cl)
            rows.append({"what": "PruningNet training", "arch": arch,
                         "setting": f"full width, {size}px, batch {batch}" + (f", {amp}" if amp else "")
                         + (", channels_last" if cl else ""), "value": round(rate, 1), "unit": "img/s"})
        # Two evaluation sets: the time outside the forwards (mostly weight generation) is fixed
        # per candidate, so its share falls as the set grows.
        size, batch, recal = (64, 16, 4) if cpu else (224, 100, 20)
        for evals in ((16, 64) if cpu else (10, 50)):
            rate, outside = scoring_rate(arch, device, size, batch, recal, evals, candidates=3 if args.quick else 6)
            rows.append({"what": "candidate scoring", "arch": arch,
                         "setting": f"full width, {size}px, recal {recal}x{batch}, eval {evals * batch}",
                         "value": round(rate, 2), "unit": "candidates/min", "outside_forward": round(outside, 4)})
    result = {"device": device_name(device), "torch": torch.__version__, "command": " ".join(sys.argv), "rows": rows}
    save_result(args.out, f"throughput_{device.type}.json", result)
    print(f"device: {result['device']}, torch {torch.__version__}")
    print("| measure | arch | setting | value | outside forward |\n|---|---|---|---|---|")
    for r in rows:
        share = f"{100 * r['outside_forward']:.1f}%" if "outside_forward" in r else ""
        print(f"| {r['what']} | {r['arch']} | {r['setting']} | {r['value']:,} {r['unit']} | {share} |")


if __name__ == "__main__":
    main()
