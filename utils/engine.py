"""Training and evaluation loops shared by ``meta_trainer_exp.py`` and ``trainer_exp.py``.

Resuming is exact: the data order is a function of (seed, epoch), augmentation is seeded per batch
(see ``data``), the PruningNet's gene is a function of (seed, step), and checkpoints carry the RNG
states, so a run killed at any point and resumed from its last checkpoint ends where an
uninterrupted run would (bit for bit with ``--deterministic`` on the same machine).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import signal
import time
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from models import Gene, GeneLayout

from . import checkpoint
from .config import CHECKPOINT_DIR, TrainingStopped, UserError, log_path, run_name
from .distributed import Dist, all_gather, all_reduce_sum, any_process, barrier, cleanup
from .logger import RunLogger, progress
from .meters import correct_topk


def build_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """SGD with momentum; weight decay on weights only (not on BN, biases or generator input layers)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=args.nesterov)


def lr_factor(args: argparse.Namespace, progress_: float) -> float:
    """Learning-rate multiplier at a fractional epoch: linear warmup, then linear (MetaPruning's) or cosine decay."""
    if progress_ < args.warmup_epochs:
        return progress_ / args.warmup_epochs
    t = min(1.0, (progress_ - args.warmup_epochs) / max(1e-9, args.epochs - args.warmup_epochs))
    return 0.5 * (1 + math.cos(math.pi * t)) if args.lr_scheduler == "cosine" else 1 - t


def build_scheduler(optimizer: torch.optim.Optimizer, args: argparse.Namespace,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step schedule defined on fractional epochs, so resuming with another world size (other
    steps per epoch) keeps the same learning rate at the same point of training."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(args, (step + 1) / steps_per_epoch))


def gene_for_step(layout: GeneLayout, seed: int, step: int) -> Gene:
    """The PruningNet's training gene of a global step: a pure function of (seed, step), so every
    process of a distributed run, and a resumed run, draws the same gene."""
    return layout.sample(random.Random(seed * 1_000_003 + step))


def autocast(args: argparse.Namespace, device: torch.device):
    """Mixed precision when ``--amp`` asks for it."""
    if not args.amp:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if args.amp == "bf16" else torch.float16)


def rng_state() -> dict[str, torch.Tensor | list]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def to_channels_last(model: nn.Module) -> nn.Module:
    """NHWC weights for the model's ``nn.Conv2d`` layers. A PruningNet has none: its generated
    weights follow the channels-last input, and its 4-D generator tensors must stay as they are."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.to(memory_format=torch.channels_last)
    return model


def check_resume(state: dict, record: dict, args: argparse.Namespace) -> None:
    """A ``--resume`` checkpoint must continue this very run: same model, dataset and input size,
    with its optimizer state. Checked before any output is written."""
    where = f"--resume {args.resume}"
    if state["arch"] != record["arch"] or state.get("gene") != record["gene"]:
        raise UserError(f"{where}: the checkpoint is for {state['arch']} gene {state.get('gene')}, "
                        f"this run is {record['arch']} gene {record['gene']}")
    if state.get("dataset") != args.dataset:
        raise UserError(f"{where}: the checkpoint was trained on {state.get('dataset')}, this run's --dataset is "
                        f"{args.dataset}")
    saved = state.get("model_args", {})
    diffs = [f"{k} {saved.get(k)} (this run: {v})" for k, v in record["model_args"].items() if saved.get(k) != v]
    if diffs:
        raise UserError(f"{where}: the checkpoint's model has {', '.join(diffs)}; resume with the flags it was "
                        f"trained with (--width-mult, --small-input, the same data)")
    size = state.get("config", {}).get("input_size")
    if size != args.input_size:
        raise UserError(f"{where}: the checkpoint was trained at --input-size {size}, not {args.input_size}")
    if "optimizer" not in state:
        raise UserError(f"{where}: holds finished weights only (no optimizer state); to start a new run from them, "
                        f"pass it as --inherit instead")


class StopRequests:
    """SIGINT/SIGTERM set a flag; the loop saves a resumable checkpoint at the next step and stops."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __enter__(self) -> "StopRequests":
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum: int, _frame) -> None:
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


@torch.inference_mode()
def evaluate(model: nn.Module, batches: Iterable, device: torch.device, args: argparse.Namespace | None = None,
             reduce: bool = False) -> dict[str, float]:
    """Top-1, top-5 (%) and cross-entropy of ``model`` in eval mode over ``(x, y)`` batches.

    ``reduce`` sums the counts over all processes (each evaluated its own shard of the data).
    """
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1 hits, top-5 hits, samples
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if args is not None and args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(args, device) if args is not None else contextlib.nullcontext():
            out = model(x)
        out = out.float()
        top1, top5 = correct_topk(out, y, (1, 5))
        sums += torch.stack([F.cross_entropy(out, y, reduction="sum").double(), top1.double(), top5.double(),
                             torch.tensor(float(len(y)), dtype=torch.float64, device=device)])
    loss, hits1, hits5, n = all_reduce_sum(sums.tolist(), device) if reduce else sums.tolist()
    n = max(n, 1.0)
    return {"top1": 100.0 * hits1 / n, "top5": 100.0 * hits5 / n, "loss": loss / n}


class Trainer:
    """The epoch loop: train, validate, save ``_checkpoint`` (every epoch, every ``--save-every-steps``
    steps, and on SIGINT/SIGTERM) and ``_best``; resume from ``--resume``."""

    def __init__(self, args: argparse.Namespace, model: nn.Module, record: dict, loader, device: torch.device,
                 logger: RunLogger, validate: Callable[[nn.Module], dict[str, float]],
                 layout: GeneLayout | None = None, dist_info: Dist = Dist()) -> None:
        self.args, self.record, self.loader, self.device, self.logger = args, record, loader, device, logger
        self.validate, self.layout, self.dist = validate, layout, dist_info
        if args.channels_last:
            model = to_channels_last(model)
        if args.sync_bn and dist_info.enabled:
            if device.type != "cuda":
                raise UserError("--sync-bn needs CUDA devices (PyTorch's SyncBatchNorm has no CPU kernel)")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model
        self.ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
            if dist_info.enabled else model
        self.criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
        self.optimizer = build_optimizer(model, args)
        self.steps = min(len(loader), args.steps_per_epoch or len(loader))
        self.scheduler = build_scheduler(self.optimizer, args, self.steps)
        self.scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
        name = run_name(args)
        self.ckpt_path = CHECKPOINT_DIR / f"{name}_checkpoint.pth.tar"
        self.best_path = CHECKPOINT_DIR / f"{name}_best.pth.tar"
        self.epoch, self.step_in_epoch, self.best, self.metrics = 0, 0, -1.0, {}
        self.stopping = False  # a stop signal reached some process

    def resume(self, state: dict) -> None:
        """Continue from a checkpoint that ``check_resume`` accepted."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state.get("scaler", {}))
        self.epoch, self.best, self.metrics = state["epoch"], state["best_top1"], state.get("metrics", {})
        # mid-epoch: go on after the same number of samples, whatever the batch size and world size
        self.step_in_epoch = state["samples_in_epoch"] // (self.args.batch_size * self.dist.world_size)
        self.scheduler.last_epoch = self.epoch * self.steps + self.step_in_epoch  # steps taken
        factor = lr_factor(self.args, (self.scheduler.last_epoch + 1) / self.steps)
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * factor
        set_rng_state(state["rng"])
        self.logger.info(f"resumed {self.args.resume} at epoch {self.epoch} step {self.step_in_epoch} "
                         f"(best top-1 {self.best:.2f})")

    def state(self) -> dict:
        """Everything a resumed run needs, in plain types and tensors (safe to load)."""
        return {"format": checkpoint.FORMAT, "kind": checkpoint.MODEL, **self.record, "dataset": self.args.dataset,
                "model": checkpoint.model_state(self.model), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch, "world_size": self.dist.world_size,
                "samples_in_epoch": self.step_in_epoch * self.args.batch_size * self.dist.world_size,
                "best_top1": self.best,
                "metrics": self.metrics, "rng": rng_state(), "config": vars(self.args)}

    def save(self, best: bool = False) -> None:
        if self.dist.main:
            checkpoint.save(self.state(), self.ckpt_path)
            if best:
                checkpoint.copy(self.ckpt_path, self.best_path)
        barrier()

    def fit(self, resume_state: dict | None = None) -> dict[str, float]:
        """Train to ``--epochs`` (from ``resume_state`` when given); the last validation metrics."""
        args = self.args
        if resume_state is not None:
            self.resume(resume_state)
        if self.dist.main:
            checkpoint.save_text(json.dumps(vars(args), indent=1, sort_keys=True),
                                 CHECKPOINT_DIR / f"{run_name(args)}_config.json")
        with StopRequests() as stop:
            while self.epoch < args.epochs:
                stats = self.train_one_epoch(stop)
                if self.stopping:
                    self.save()
                    signum = stop.signal or signal.SIGTERM  # another process was signalled
                    self.logger.info(f"stopped by signal {signum} at epoch {self.epoch} step "
                                     f"{self.step_in_epoch}; resume with --resume {self.ckpt_path}")
                    raise SystemExit(128 + signum)
                self.end_epoch(stats)
        return self.metrics

    def end_epoch(self, stats: dict[str, float]) -> None:
        args = self.args
        self.epoch, self.step_in_epoch = self.epoch + 1, 0
        metrics = self.validate(self.model) if args.valuate or self.epoch == args.epochs else {}
        top1 = metrics.get("top1", -1.0)
        is_best = bool(metrics) and top1 > self.best
        self.best, self.metrics = max(self.best, top1), metrics or self.metrics
        self.logger.record("epoch", epoch=self.epoch, train_loss=round(stats["loss"], 5),
                           train_top1=round(stats["top1"], 3), lr=stats["lr"], seconds=round(stats["time"], 2),
                           img_s=round(stats["img_s"], 1), **{f"val_{k}": round(v, 4) for k, v in metrics.items()})
        self.logger.info(f"epoch {self.epoch}/{args.epochs} loss {stats['loss']:.4f} train top-1 {stats['top1']:.2f} "
                         f"lr {stats['lr']:.4g} {stats['img_s']:.0f} img/s"
                         + (f" | val top-1 {top1:.2f} (best {self.best:.2f})" if metrics else ""))
        self.save(best=is_best)

    def train_one_epoch(self, stop: StopRequests) -> dict[str, float]:
        """Train from ``step_in_epoch`` to the end of the epoch (or until a stop signal)."""
        args, device = self.args, self.device
        self.loader.sampler.set_epoch(self.epoch)
        self.loader.sampler.set_start(self.step_in_epoch * self.loader.batch_size)
        self.loader.dataset.set_epoch(self.epoch)
        self.ddp.train()
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss * n, top-1 hits, samples
        start, seen = time.perf_counter(), 0
        for x, y in progress(self.loader, desc=f"epoch {self.epoch + 1}/{args.epochs}", initial=self.step_in_epoch,
                             total=self.steps):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            step = self.epoch * self.steps + self.step_in_epoch
            gene = gene_for_step(self.layout, args.seed, step) if self.layout is not None else None
            with autocast(args, device):
                out = self.ddp(x, gene) if gene is not None else self.ddp(x)
                loss = self.criterion(out.float(), y)
            # one exchange per step decides for every process: all stop at the same step, or none
            bad_loss, self.stopping = any_process([not torch.isfinite(loss).item(), stop.signal is not None], device)
            if bad_loss:
                what = (f"loss became {loss.item()}" if not torch.isfinite(loss)
                        else "another process's loss became non-finite")
                self.logger.info(f"non-finite loss: {what} at epoch {self.epoch} step {self.step_in_epoch}"
                                 + (f" gene {self.layout.format(gene)}" if gene is not None else ""))
                raise TrainingStopped(f"{what} at epoch {self.epoch} step {self.step_in_epoch}; the last good "
                                      f"checkpoint {self.ckpt_path} is kept (lower --lr or add --warmup-epochs, then "
                                      f"--resume it)")
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            n = len(y)
            sums += torch.stack([loss.detach().double() * n, correct_topk(out.detach(), y)[0].double(),
                                 torch.tensor(float(n), dtype=torch.float64, device=device)])
            seen += n
            self.step_in_epoch += 1
            if self.step_in_epoch % args.vis_interval == 0 or self.step_in_epoch == self.steps:
                # one device sync (and one all-reduce) per logging interval, not per step
                loss_sum, hits, count = all_reduce_sum(sums.tolist(), device)
                extra = {}
                if gene is not None:
                    if len(set(map(tuple, all_gather(gene)))) > 1:  # DDP would average different structures
                        raise TrainingStopped(f"processes disagree on the gene of step {step}; all must run the same "
                                              f"code and --seed")
                    extra["gene"] = self.layout.format(gene)
                self.logger.record("step", epoch=self.epoch, step=step + 1, loss=round(loss_sum / count, 5),
                                   top1=round(100 * hits / count, 3), lr=self.optimizer.param_groups[0]["lr"],
                                   img_s=round(seen * self.dist.world_size / (time.perf_counter() - start), 1),
                                   **extra)
            if args.save_every_steps and self.step_in_epoch % args.save_every_steps == 0 \
                    and self.step_in_epoch < self.steps:
                self.save()
            if self.stopping or self.step_in_epoch == self.steps:
                break
        elapsed = time.perf_counter() - start
        loss_sum, hits, count = all_reduce_sum(sums.tolist(), device)
        count = max(count, 1.0)
        return {"loss": loss_sum / count, "top1": 100 * hits / count, "lr": self.optimizer.param_groups[0]["lr"],
                "time": elapsed, "img_s": seen * self.dist.world_size / max(elapsed, 1e-9)}


def run_training(args: argparse.Namespace, model: nn.Module, record: dict, data, device: torch.device,
                 dist_info: Dist, validate: Callable[[nn.Module], dict[str, float]], summary: str,
                 layout: GeneLayout | None = None, resume_state: dict | None = None) -> dict[str, float]:
    """What both training scripts do once model and data exist and the input is checked: the
    loader, the split file and the logger (rank 0), the epoch loop, and leaving the process group."""
    from data import make_loader

    from .visdom_sink import make_sink

    loader = make_loader(data.train, args.batch_size, True, args.workers, args.seed, dist_info.rank,
                         dist_info.world_size, pin_memory=device.type == "cuda")
    if len(loader) == 0:
        raise UserError(f"--batch-size {args.batch_size} is larger than the {len(data.train)} training images")
    path = log_path(args)
    checkpoint.check_writable(CHECKPOINT_DIR, path.parent)
    if dist_info.main:
        data.save_split()
    logger = RunLogger(path, enabled=dist_info.main, sink=make_sink(args, path.stem, path) if dist_info.main else None)
    logger.info(f"config {json.dumps(vars(args), sort_keys=True)}")
    logger.info(summary)
    try:
        metrics = Trainer(args, model, record, loader, device, logger, validate, layout, dist_info).fit(resume_state)
        logger.info("final " + " ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
    finally:
        logger.close()
    del model
    cleanup()
    return metrics
