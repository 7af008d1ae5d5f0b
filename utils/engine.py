"""Training and evaluation loops shared by ``meta_trainer_exp.py`` and ``trainer_exp.py``."""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from models import Gene, GeneLayout, is_pruningnet

from . import checkpoint
from .config import CHECKPOINT_DIR, UserError, run_name
from .logger import RunLogger, progress
from .meters import AverageMeter, correct_topk


def build_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """SGD with momentum; weight decay on weights only (not on BN, biases or generator input layers)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=args.nesterov)


def build_scheduler(optimizer: torch.optim.Optimizer, args: argparse.Namespace,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule: linear warmup, then linear decay to zero (MetaPruning's) or cosine."""
    total, warmup = args.epochs * steps_per_epoch, args.warmup_epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress_ = (step - warmup) / max(1, total - warmup)
        if args.lr_scheduler == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress_)))
        return max(0.0, 1 - progress_)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def gene_for_step(layout: GeneLayout, seed: int, step: int) -> Gene:
    """The PruningNet's training gene of a global step: a pure function of (seed, step), so every
    process of a distributed run, and a resumed run, draws the same gene."""
    return layout.sample(random.Random(seed * 1_000_003 + step))


def train_one_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LambdaLR, criterion: nn.Module, device: torch.device,
                    epoch: int, logger: RunLogger, args: argparse.Namespace,
                    layout: GeneLayout | None = None) -> dict[str, float]:
    """One epoch; with ``layout`` the model is a PruningNet and every step draws a fresh gene."""
    model.train()
    loss_m, top1_m = AverageMeter(), AverageMeter()
    seen, start = 0, time.perf_counter()
    steps = len(loader)
    for i, (x, y) in enumerate(progress(loader, desc=f"epoch {epoch}", total=steps)):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        step = epoch * steps + i
        out = model(x, gene_for_step(layout, args.seed, step)) if layout is not None else model(x)
        loss = criterion(out, y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch} step {i}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        n = y.shape[0]
        seen += n
        loss_m.update(loss.item(), n)
        top1_m.update(100.0 * correct_topk(out.detach(), y)[0] / n, n)
        if (i + 1) % args.vis_interval == 0 or i + 1 == steps:
            logger.record("step", epoch=epoch, step=step + 1, loss=round(loss_m.avg, 5), top1=round(top1_m.avg, 3),
                          lr=optimizer.param_groups[0]["lr"], img_s=round(seen / (time.perf_counter() - start), 1))
    elapsed = time.perf_counter() - start
    return {"loss": loss_m.avg, "top1": top1_m.avg, "lr": optimizer.param_groups[0]["lr"], "time": elapsed,
            "img_s": seen / max(elapsed, 1e-9)}


@torch.inference_mode()
def evaluate(model: nn.Module, batches: Iterable, device: torch.device) -> dict[str, float]:
    """Top-1, top-5 (%) and cross-entropy of ``model`` in eval mode over ``(x, y)`` batches."""
    model.eval()
    loss_sum, hits, n = 0.0, [0, 0], 0
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        out = model(x)
        loss_sum += F.cross_entropy(out, y, reduction="sum").item()
        hits = [h + c for h, c in zip(hits, correct_topk(out, y, (1, 5)))]
        n += y.shape[0]
    n = max(n, 1)
    return {"top1": 100.0 * hits[0] / n, "top5": 100.0 * hits[1] / n, "loss": loss_sum / n}


def fit(args: argparse.Namespace, model: nn.Module, record: dict, loader, device: torch.device,
        logger: RunLogger, validate: Callable[[nn.Module], dict[str, float]],
        layout: GeneLayout | None = None) -> dict[str, float]:
    """The epoch loop: train, validate (each epoch with ``--valuate``, else after the last), save
    ``_checkpoint`` every epoch and ``_best`` when the validation top-1 improves; resumes from ``--resume``."""
    name = run_name(args)
    ckpt_path, best_path = CHECKPOINT_DIR / f"{name}_checkpoint.pth.tar", CHECKPOINT_DIR / f"{name}_best.pth.tar"
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    optimizer = build_optimizer(model, args)
    scheduler = build_scheduler(optimizer, args, len(loader))
    start_epoch, best, metrics = 0, -1.0, {}
    if args.resume:
        state = checkpoint.load(args.resume, checkpoint.MODEL, "--resume")
        if state["arch"] != record["arch"] or state.get("gene") != record["gene"]:
            raise UserError(f"--resume {args.resume}: the checkpoint is for {state['arch']} gene {state.get('gene')}, "
                            f"this run is {record['arch']} gene {record['gene']}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best, metrics = state["epoch"], state["best_top1"], state.get("metrics", {})
        logger.info(f"resumed {args.resume} at epoch {start_epoch} (best top-1 {best:.2f})")
    checkpoint.save_text(json.dumps(vars(args), indent=1, sort_keys=True), CHECKPOINT_DIR / f"{name}_config.json")
    for epoch in range(start_epoch, args.epochs):
        loader.sampler.set_epoch(epoch)
        stats = train_one_epoch(model, loader, optimizer, scheduler, criterion, device, epoch, logger, args, layout)
        metrics = validate(model) if args.valuate or epoch + 1 == args.epochs else {}
        top1 = metrics.get("top1", -1.0)
        is_best = bool(metrics) and top1 > best
        best = max(best, top1)
        logger.record("epoch", epoch=epoch + 1, train_loss=round(stats["loss"], 5), train_top1=round(stats["top1"], 3),
                      lr=stats["lr"], seconds=round(stats["time"], 2), img_s=round(stats["img_s"], 1),
                      **{f"val_{k}": round(v, 4) for k, v in metrics.items()})
        logger.info(f"epoch {epoch + 1}/{args.epochs} loss {stats['loss']:.4f} train top-1 {stats['top1']:.2f} "
                    f"lr {stats['lr']:.4g} {stats['img_s']:.0f} img/s"
                    + (f" | val top-1 {top1:.2f} (best {best:.2f})" if metrics else ""))
        state = {"format": checkpoint.FORMAT, "kind": checkpoint.MODEL, **record, "dataset": args.dataset,
                 "model": checkpoint.model_state(model), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "best_top1": best, "metrics": metrics,
                 "config": vars(args)}
        checkpoint.save(state, ckpt_path)
        if is_best:
            checkpoint.copy(ckpt_path, best_path)
    return metrics
