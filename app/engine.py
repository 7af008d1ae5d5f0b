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
import uuid
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from data import make_loader
from models import Gene, GeneLayout
from models.pruningnet import GeneratedConv
from utils.files import save_text
from utils.logger import RunLogger, progress
from utils.meters import correct_topk
from utils.visdom_sink import make_sink

from . import checkpoint
from .config import TrainingStopped, UserError, checkpoint_dir, log_path, run_files, run_name
from .crop_sgd import CropGradScaler, CropSGD
from .distributed import Dist, all_gather, barrier, cleanup, sum_over_processes

# fp16 steps in a row with a non-finite loss after which training stops: each was skipped and halved
# the loss scale, so by then the overflow is in the forward pass, where the scale cannot help.
FP16_OVERFLOW_STEPS = 50


def build_optimizer(model: nn.Module, lr: float, momentum: float, weight_decay: float, nesterov: bool = False,
                    depthwise_decay: bool = True, by_crop: bool = True) -> torch.optim.Optimizer:
    """SGD with momentum; weight decay on every parameter of more than one dimension (conv and linear
    weights, the generators' matrices), none on BN parameters and biases, and without
    ``depthwise_decay`` none on depthwise convs (or their generators).

    The fused kernel updates every parameter in a few launches and takes GradScaler's inf check as
    a device tensor, so an fp16 step does not wait for the device to learn whether to skip. A
    PruningNet's generators are updated ``by_crop`` (``CropSGD``, the same steps at the crop's cost;
    off: ``--dense-generator-update``).
    """
    spared = set() if depthwise_decay else {id(p) for p in depthwise_parameters(model)}
    decay = [p for p in model.parameters() if p.ndim > 1 and id(p) not in spared]
    no_decay = [p for p in model.parameters() if p.ndim <= 1 or id(p) in spared]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    sgd = {"lr": lr, "momentum": momentum, "nesterov": nesterov, "fused": True}
    generators = [m for m in model.modules() if isinstance(m, GeneratedConv)]
    if generators and by_crop:
        optimizer = CropSGD(groups, generators, **sgd)
    else:
        optimizer = torch.optim.SGD(groups, **sgd)
    if momentum:
        # PyTorch's fused SGD allocates its momentum buffers uninitialized at its first step and lets
        # the kernel fill them; when GradScaler skips that step (fp16's first steps usually overflow)
        # they stay garbage, and the next step writes it into the weights. A zero buffer gives what the
        # first step computes (momentum * 0 + gradient, no dampening) without that hole.
        for p in decay + no_decay:
            optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return optimizer


def depthwise_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The weights of depthwise convs: a PrunedNet's, or the generators of a PruningNet's."""
    out = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels:
            out.append(m.weight)
        elif isinstance(m, GeneratedConv) and m.spec.depthwise:
            out += [m.fc1.weight, m.weight2]
    return out


@dataclass(frozen=True)
class LRSchedule:
    """The learning-rate multiplier at a fractional epoch: linear warmup over ``warmup_epochs``, then
    linear (MetaPruning's retraining) or cosine decay to zero at ``epochs``, or (``step``) a decay by
    ``gamma`` at each of the ``milestones`` epochs."""

    kind: str
    epochs: int
    warmup_epochs: int = 0
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1

    @classmethod
    def of(cls, cfg: argparse.Namespace) -> "LRSchedule":
        return cls(cfg.lr_scheduler, cfg.epochs, cfg.warmup_epochs, tuple(cfg.lr_milestones or ()), cfg.lr_gamma)

    def factor(self, progress: float) -> float:
        if progress < self.warmup_epochs:
            return progress / self.warmup_epochs
        if self.kind == "step":
            # progress is counted at a step's end: the last step of epoch m - 1 ends at exactly m, and epoch
            # m's first step is the first to decay, as with a scheduler stepped once per epoch
            return self.gamma ** sum(progress > m for m in self.milestones)
        t = min(1.0, (progress - self.warmup_epochs) / max(1e-9, self.epochs - self.warmup_epochs))
        return 0.5 * (1 + math.cos(math.pi * t)) if self.kind == "cosine" else 1 - t


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: LRSchedule,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step schedule defined on fractional epochs, so resuming with another world size (other
    steps per epoch) keeps the same learning rate at the same point of training."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule.factor((step + 1) / steps_per_epoch))


def gene_for_step(layout: GeneLayout, seed: int, step: int) -> Gene:
    """The PruningNet's training gene of a global step: a pure function of (seed, step), so every
    process of a distributed run, and a resumed run, draws the same gene."""
    return layout.sample(random.Random(seed * 1_000_003 + step))


@dataclass(frozen=True)
class GeneSchedule:
    """The genes a PruningNet trains at each global step, a pure function of (seed, step) as
    ``gene_for_step``: one random gene (the paper's), or with ``sandwich`` N the widest gene, the
    narrowest and N random ones, whose gradients add up in the step (the sandwich rule of slimmable
    networks and BigNAS). With ``distill`` the genes after the widest learn from the widest gene's
    soft predictions of the same batch (in-place distillation), the widest from the labels."""

    layout: GeneLayout
    seed: int
    sandwich: int | None = None
    distill: bool = False

    def genes(self, step: int) -> tuple[Gene, ...]:
        if self.sandwich is None:
            return (gene_for_step(self.layout, self.seed, step),)
        rng = random.Random(self.seed * 1_000_003 + step)
        return (self.layout.full(), self.layout.narrowest(), *(self.layout.sample(rng) for _ in range(self.sandwich)))

    def format(self, genes: tuple[Gene, ...]) -> list | list[list]:
        """``genes`` as logged: the gene itself when there is one, else the list of them."""
        shown = [self.layout.format(g) for g in genes]
        return shown[0] if len(shown) == 1 else shown


def soft_cross_entropy(logits: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``logits`` against the probabilities ``teacher`` (in-place distillation)."""
    return -(teacher * F.log_softmax(logits, dim=1)).sum(1).mean()


def autocast(amp: str | None, device: torch.device):
    """Mixed precision when ``amp`` (``--amp``: bf16, fp16) asks for it."""
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def process_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of one process's torch RNG (dropout) from global step ``step`` on.

    Distinct per rank, so the processes of a torchrun job draw different dropout masks; the gene of
    a step and the data order have seeds of their own and stay the same on every rank.
    """
    return ((seed * 1_000_003 + rank) * 10_000_019 + step) % 2 ** 63


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's torch RNG states: the CPU generator and, on a GPU, that GPU's generator."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and isinstance(state.get("cuda"), torch.Tensor):
        torch.cuda.set_rng_state(state["cuda"], device)


def to_channels_last(model: nn.Module) -> nn.Module:
    """NHWC weights for the model's ``nn.Conv2d`` layers. A PruningNet has none: its generated
    weights follow the channels-last input, and its 4-D generator tensors must stay as they are."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.to(memory_format=torch.channels_last)
    return model


def check_resume(state: dict, record: dict, args: argparse.Namespace, world_size: int) -> None:
    """A ``--resume`` checkpoint must continue this very run: same model, dataset and input size,
    with its optimizer state, no more epochs done than ``--epochs``, and a mid-epoch position that
    this run's steps reach exactly. Checked before any output is written."""
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
    for flag, key, default in (("--sandwich", "sandwich", None), ("--distill", "distill", False)):
        saved = state.get("config", {}).get(key, default)
        if saved != getattr(args, key, default):  # trainer_exp.py trains no PruningNet: neither flag
            spelled = f"without {flag}" if saved in (None, False) else flag + ("" if saved is True else f" {saved}")
            raise UserError(f"{where}: the checkpoint was trained {spelled} (another schedule of genes); resume "
                            f"{spelled}")
    saved_decay = state.get("config", {}).get("depthwise_decay", True)
    if saved_decay != args.depthwise_decay:
        flag = "--depthwise-decay" if saved_decay else "--no-depthwise-decay"
        raise UserError(f"{where}: the checkpoint's optimizer was built with {flag} (another set of decayed "
                        f"parameters); resume with {flag}")
    done = state.get("epoch", 0)
    if args.epochs < done:
        raise UserError(f"{where}: the checkpoint has trained {done} epochs, more than --epochs {args.epochs}; give "
                        f"--epochs {done} to report its result, or more to continue it")
    samples, per_step = state.get("samples_in_epoch", 0), args.batch_size * world_size
    if samples % per_step:
        saved = state.get("config", {}).get("batch_size"), state.get("world_size", 1)
        raise UserError(f"{where}: the checkpoint stopped {samples} samples into epoch {done + 1}, and a step of "
                        f"--batch-size {args.batch_size} on {world_size} process(es) takes {per_step}, which does not "
                        f"divide {samples}; resume with a batch size (times processes) that divides it, e.g. the "
                        f"checkpoint's --batch-size {saved[0]} on {saved[1]} process(es)")


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
def evaluate(model: nn.Module, batches: Iterable, device: torch.device, amp: str | None = None,
             channels_last: bool = False, reduce: bool = False) -> dict[str, float]:
    """Top-1, top-5 (%) and cross-entropy of ``model`` in eval mode over ``(x, y)`` batches (under
    ``amp``, in the channels-last layout if asked).

    ``reduce`` sums the counts over all processes (each evaluated its own shard of the data).
    """
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, top-1 hits, top-5 hits
    n = 0  # samples, counted on the host: the device is read once, at the end
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(amp, device):
            out = model(x)
        out = out.float()
        top1, top5 = correct_topk(out, y, (1, 5))
        sums += torch.stack([F.cross_entropy(out, y, reduction="sum").double(), top1.double(), top5.double()])
        n += len(y)
    counts = torch.cat([sums, sums.new_tensor([n])])  # one read of the device, after the exchange if reducing
    loss, hits1, hits5, n = sum_over_processes(counts) if reduce else counts.tolist()
    n = max(n, 1)
    return {"top1": 100.0 * hits1 / n, "top5": 100.0 * hits5 / n, "loss": loss / n}


class Trainer:
    """The epoch loop: train, validate, save ``_checkpoint`` (every epoch, every ``--save-every-steps``
    steps, and on SIGINT/SIGTERM) and ``_best``; resume from ``--resume``."""

    def __init__(self, args: argparse.Namespace, model: nn.Module, record: dict, loader, device: torch.device,
                 logger: RunLogger, validate: Callable[[nn.Module], dict[str, float]],
                 schedule: GeneSchedule | None = None, dist_info: Dist = Dist()) -> None:
        self.args, self.record, self.loader, self.device, self.logger = args, record, loader, device, logger
        self.validate, self.schedule, self.dist = validate, schedule, dist_info
        if args.channels_last:
            model = to_channels_last(model)
        if args.sync_bn and dist_info.enabled:
            if device.type != "cuda":
                raise UserError("--sync-bn needs CUDA devices (PyTorch's SyncBatchNorm has no CPU kernel)")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if args.dropout is not None:  # a training setting: the weights, and so the checkpoint, are the same
            model.dropout = nn.Dropout(args.dropout) if args.dropout else nn.Identity()
        self.model = model
        self.optimizer = build_optimizer(model, args.lr, args.momentum, args.weight_decay, args.nesterov,
                                         args.depthwise_decay, not args.dense_generator_update)
        by_crop = isinstance(self.optimizer, CropSGD)
        self.ddp = wrap_ddp(model, device, schedule is not None, by_crop) if dist_info.enabled else model
        self.criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
        self.steps = min(len(loader), args.steps_per_epoch or len(loader))
        self.lr_schedule = LRSchedule.of(args)
        self.scheduler = build_scheduler(self.optimizer, self.lr_schedule, self.steps)
        self.scaler = CropGradScaler(device.type, enabled=args.amp == "fp16")
        self.ckpt_path, self.best_path = run_files(args)
        self.epoch, self.step_in_epoch, self.best, self.metrics = 0, 0, -1.0, {}
        self.run_id = uuid.uuid4().hex  # names this run's weights (checkpoint.identity); kept on resume
        self.stopping = False  # a stop signal reached some process
        self.overflows = 0  # fp16 steps in a row whose loss was non-finite (skipped by the GradScaler)

    def resume(self, state: dict) -> None:
        """Continue from a checkpoint that ``check_resume`` accepted.

        The weights and optimizer state are taken out of ``state`` once restored: the caller's dict
        would otherwise keep a multi-GB PruningNet checkpoint referenced for the whole run.
        """
        self.model.load_state_dict(state.pop("model"))
        self.optimizer.load_state_dict(state.pop("optimizer"))
        self.resume_loss_scale(state.get("scaler") or {}, state.get("config", {}).get("amp"))
        self.epoch, self.best, self.metrics = state["epoch"], state["best_top1"], state.get("metrics", {})
        self.run_id = state.get("run_id", self.run_id)
        # mid-epoch: go on after the same samples (check_resume made them a whole number of steps)
        self.step_in_epoch = state["samples_in_epoch"] // (self.args.batch_size * self.dist.world_size)
        self.scheduler.last_epoch = self.epoch * self.steps + self.step_in_epoch  # steps taken
        factor = self.lr_schedule.factor((self.scheduler.last_epoch + 1) / self.steps)
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * factor
        self.resume_rng(state["rng"])
        self.logger.info(f"resumed {self.args.resume} at epoch {self.epoch} step {self.step_in_epoch} "
                         f"(best top-1 {self.best:.2f})")

    def resume_loss_scale(self, saved: dict, saved_amp: str | None) -> None:
        """fp16's loss scale goes on where the checkpoint left it; a checkpoint trained without fp16
        has none, so under ``--amp fp16`` the scale starts afresh (and a scale is dropped without fp16)."""
        amp = self.args.amp
        if amp != saved_amp:
            fresh = f"; the fp16 loss scale starts afresh at {self.scaler.get_scale():g}" if amp == "fp16" else ""
            self.logger.info(f"the checkpoint was trained with --amp {saved_amp or 'none'}, this run uses --amp "
                             f"{amp or 'none'}{fresh}")
        if self.scaler.is_enabled() and saved:
            self.scaler.load_state_dict(saved)

    def resume_rng(self, saved: list[dict] | dict) -> None:
        """Every process takes up its own RNG stream; with another number of processes the streams
        restart from seeds of (seed, rank, step), which only changes the dropout masks drawn."""
        states = saved if isinstance(saved, list) else [saved]  # older checkpoints kept one state
        if len(states) == self.dist.world_size:
            set_rng_state(states[self.dist.rank], self.device)
            return
        step = self.epoch * self.steps + self.step_in_epoch
        torch.manual_seed(process_seed(self.args.seed, self.dist.rank, step))
        self.logger.info(f"the checkpoint holds the RNG states of {len(states)} process(es), this run has "
                         f"{self.dist.world_size}: dropout draws restart from the seeds of step {step}")

    def state(self, rng: list[dict]) -> dict:
        """Everything a resumed run needs, in plain types and tensors (safe to load); ``rng`` holds
        every process's RNG states, in rank order."""
        return {"format": checkpoint.FORMAT, "kind": checkpoint.MODEL, **self.record, "dataset": self.args.dataset,
                "model": checkpoint.model_state(self.model), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch, "world_size": self.dist.world_size,
                "samples_in_epoch": self.step_in_epoch * self.args.batch_size * self.dist.world_size,
                "best_top1": self.best, "run_id": self.run_id,
                "metrics": self.metrics, "rng": rng, "config": vars(self.args)}

    def save(self, best: bool = False) -> None:
        if isinstance(self.optimizer, CropSGD):
            # every process, not only the one that writes: flushing rounds otherwise than the lazy updates
            # would, and the processes' weights must stay the same to the bit
            self.optimizer.flush()
        rng = all_gather(rng_state(self.device))  # a collective: every process takes part
        if self.dist.main:
            checkpoint.save(self.state(rng), self.ckpt_path)
            if best:
                checkpoint.copy(self.ckpt_path, self.best_path)
        barrier()

    def fit(self, resume_state: dict | None = None) -> dict[str, float]:
        """Train to ``--epochs`` (from ``resume_state`` when given); the last validation metrics."""
        args = self.args
        if resume_state is not None:
            self.resume(resume_state)
        else:
            torch.manual_seed(process_seed(args.seed, self.dist.rank))
        if self.dist.main:
            save_text(json.dumps(vars(args), indent=1, sort_keys=True),
                      checkpoint_dir(args) / f"{run_name(args)}_config.json")
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
        skipped = self.damaged_images()
        self.logger.record("epoch", epoch=self.epoch, train_loss=round(stats["loss"], 5),
                           train_top1=round(stats["top1"], 3), lr=stats["lr"], seconds=round(stats["time"], 2),
                           img_s=round(stats["img_s"], 1), **{f"val_{k}": round(v, 4) for k, v in metrics.items()},
                           **({"skipped_images": len(skipped)} if skipped else {}))
        self.logger.info(f"epoch {self.epoch}/{args.epochs} loss {stats['loss']:.4f} train top-1 {stats['top1']:.2f} "
                         f"lr {stats['lr']:.4g} {stats['img_s']:.0f} img/s"
                         + (f" | val top-1 {top1:.2f} (best {self.best:.2f})" if metrics else ""))
        self.save(best=is_best)

    def damaged_images(self) -> list[str]:
        """The damaged images every process skipped since the last call (``--skip-bad-images``), logged."""
        mine = getattr(self.loader.dataset, "damaged", list)()  # one log for all of this process's image sets
        skipped = [line for reports in all_gather(mine) for line in reports]
        for line in skipped:
            self.logger.info(line)
        return skipped

    def train_one_epoch(self, stop: StopRequests) -> dict[str, float]:
        """Train from ``step_in_epoch`` to the end of the epoch (or until a stop signal).

        Steps are queued on the device without the host waiting for them. The host reads the device
        only at sync points: every ``--vis-interval`` steps (the logged point), before a mid-epoch
        checkpoint, at the end of the epoch, and when a single process is signalled to stop. There
        the losses since the last sync point are checked (nothing non-finite is ever saved) and,
        under torchrun, the processes agree on stopping.
        """
        args = self.args
        self.loader.sampler.set_epoch(self.epoch)
        self.loader.sampler.set_start(self.step_in_epoch * self.loader.batch_size)
        self.loader.dataset.set_epoch(self.epoch)
        self.ddp.train()
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss * n, top-1 hits, n: finite steps
        window: list[tuple[int, tuple[Gene, ...] | None, torch.Tensor]] = []  # (step, genes, finite loss) since sync
        start, seen, totals = time.perf_counter(), 0, None
        for x, y in progress(self.loader, desc=f"epoch {self.epoch + 1}/{args.epochs}", initial=self.step_in_epoch,
                             total=self.steps):
            step = self.epoch * self.steps + self.step_in_epoch
            genes = self.schedule.genes(step) if self.schedule is not None else None
            loss, hits = self.train_step(x, y, genes)
            finite = torch.isfinite(loss)  # fp16 steps with an overflow are left out of the means
            sums += torch.stack([torch.where(finite, loss.double() * len(y), 0.0),
                                 torch.where(finite, hits.double(), 0.0), finite.double() * len(y)])
            window.append((step, genes, finite))
            seen += len(y)
            self.step_in_epoch += 1
            last = self.step_in_epoch == self.steps
            log = self.step_in_epoch % args.vis_interval == 0 or last
            save = bool(args.save_every_steps) and self.step_in_epoch % args.save_every_steps == 0 and not last
            if log or save or (stop.signal is not None and not self.dist.enabled):
                totals = self.sync_point(sums, window, stop)
                window = []
                if log:
                    self.log_step(step, genes, totals, seen, start)
                if save and not self.stopping:
                    self.save()
            if self.stopping or last:
                break
        if totals is None or window:  # a resume at the epoch's very end runs no step
            totals = self.sync_point(sums, window, stop)
        elapsed = time.perf_counter() - start
        loss_sum, hits, count = totals
        count = max(count, 1.0)
        return {"loss": loss_sum / count, "top1": 100 * hits / count, "lr": self.optimizer.param_groups[0]["lr"],
                "time": elapsed, "img_s": seen * self.dist.world_size / max(elapsed, 1e-9)}

    def train_step(self, x: torch.Tensor, y: torch.Tensor,
                   genes: tuple[Gene, ...] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimization step, queued on the device: the loss and the top-1 hits, as device tensors.

        A PruningNet's step adds up the gradients of its ``genes`` (one backward each, reduced under
        torchrun with the last); the loss and hits returned are their means over the genes."""
        device = self.device
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if self.args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        self.optimizer.zero_grad(set_to_none=True)
        losses, hits, teacher = [], [], None
        for i, gene in enumerate(genes or (None,)):
            accumulate = i + 1 < len(genes or (None,)) and self.dist.enabled
            with self.ddp.no_sync() if accumulate else contextlib.nullcontext():
                with autocast(self.args.amp, device):
                    out = (self.ddp(x, gene) if gene is not None else self.ddp(x)).float()
                    if teacher is not None:
                        loss = soft_cross_entropy(out, teacher)
                    else:
                        loss = self.criterion(out, y)
                if i == 0 and self.schedule is not None and self.schedule.distill:
                    teacher = out.detach().softmax(1)
                self.scaler.scale(loss).backward()
            losses.append(loss.detach())
            hits.append(correct_topk(out.detach(), y)[0])
        if self.dist.enabled and isinstance(self.optimizer, CropSGD):
            self.optimizer.all_reduce_crop_gradients()  # before the inf check, so that every process agrees
        self.scaler.step(self.optimizer)  # fused SGD: an inf/NaN gradient under fp16 skips the step on the device
        self.scaler.update()
        self.scheduler.step()
        if len(losses) == 1:
            return losses[0], hits[0]
        return torch.stack(losses).mean(), torch.stack(hits).double().mean()

    def sync_point(self, sums: torch.Tensor, window: list[tuple[int, tuple[Gene, ...] | None, torch.Tensor]],
                   stop: StopRequests) -> tuple[float, float, float]:
        """One exchange (and one device sync): the epoch's loss and hit sums and sample count over all
        processes; the finiteness of every loss since the last sync point; a stop signal that reached
        any process. Returns (loss sum, top-1 hits, samples) of the steps with a finite loss.

        A non-finite loss stops training, except under fp16, where the GradScaler has skipped that
        step (its gradients were non-finite too): there training stops only when the loss stays
        non-finite for ``FP16_OVERFLOW_STEPS`` steps in a row, which no loss scale can fix.
        """
        flags = torch.stack([f for _, _, f in window]).double() if window else sums.new_zeros(0)
        stopping = torch.tensor([float(stop.signal is not None)], dtype=torch.float64)
        loss_sum, hits, count, *finite, stops = sum_over_processes(torch.cat([sums, flags, stopping.to(self.device)]))
        bad = [(step, genes) for (step, genes, _), n in zip(window, finite) if n < self.dist.world_size]
        fp16 = self.args.amp == "fp16"
        for n in finite:
            self.overflows = self.overflows + 1 if n < self.dist.world_size else 0
        if bad and (not fp16 or self.overflows >= FP16_OVERFLOW_STEPS):
            step, genes = bad[0] if not fp16 else bad[-1]
            where = f"epoch {self.epoch} step {step - self.epoch * self.steps}"
            self.logger.info(f"non-finite loss at {where}"
                             + (f" gene {self.schedule.format(genes)}" if genes is not None else ""))
            if fp16:
                raise TrainingStopped(f"the fp16 training loss has been non-finite for {self.overflows} steps in a "
                                      f"row up to {where}: an overflow in the forward pass, which the loss scale "
                                      f"cannot fix; {self.last_good()} (with --amp bf16, or without --amp)")
            raise TrainingStopped(f"the training loss became non-finite at {where}; {self.last_good()} (lower --lr or "
                                  f"add --warmup-epochs)")
        if bad:
            step = bad[-1][0] - self.epoch * self.steps
            self.logger.info(f"{len(bad)} fp16 step(s) with a non-finite loss skipped by the GradScaler (the last at "
                             f"epoch {self.epoch} step {step}); loss scale now {self.scaler.get_scale():g}")
        self.stopping = stops > 0
        return loss_sum, hits, count

    def last_good(self) -> str:
        """Where a stopped run can go on from: its last checkpoint, if one was written."""
        if self.ckpt_path.is_file():
            return f"the last good checkpoint {self.ckpt_path} is kept: --resume it"
        return "no checkpoint was written yet: start the run again"

    def log_step(self, step: int, genes: tuple[Gene, ...] | None, totals: tuple[float, float, float], seen: int,
                 start: float) -> None:
        """The logged point of a sync point: running means over the epoch so far."""
        loss_sum, hits, count = totals
        count = max(count, 1.0)  # 0 only when every step so far overflowed in fp16
        extra = {}
        if genes is not None:
            if len(set(map(tuple, all_gather(genes)))) > 1:  # DDP would average different structures
                raise TrainingStopped(f"processes disagree on the gene of step {step}; all must run the same "
                                      f"code and --seed")
            extra["gene"] = self.schedule.format(genes)
        self.logger.record("step", epoch=self.epoch, step=step + 1, loss=round(loss_sum / count, 5),
                           top1=round(100 * hits / count, 3), lr=self.optimizer.param_groups[0]["lr"],
                           img_s=round(seen * self.dist.world_size / (time.perf_counter() - start), 1), **extra)


def wrap_ddp(model: nn.Module, device: torch.device, pruningnet: bool, by_crop: bool = False
             ) -> DistributedDataParallel:
    """DistributedDataParallel for training. Gradients live in DDP's buckets, so there is no second
    full-size gradient (3.1 GB for the ResNet50 PruningNet). A PruningNet's thousands of per-scale
    BN buffers are not broadcast every forward: its training BN uses batch statistics, and every
    scoring recalibrates them. With ``by_crop`` (``CropSGD``) the generators' matrices stay out of
    DDP: their gradients are averaged by crop, and they are broadcast from rank 0 here, as DDP does
    with the parameters it holds."""
    if by_crop:
        names = [f"{name}.{p}" for name, m in model.named_modules() if isinstance(m, GeneratedConv)
                 for p in ("weight2", "bias2")]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
        for m in model.modules():
            if isinstance(m, GeneratedConv):
                for p in (m.weight2, m.bias2):
                    torch.distributed.broadcast(p.data, 0)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   forward_sync_buffers=not pruningnet, gradient_as_bucket_view=True)


def run_training(args: argparse.Namespace, model: nn.Module, record: dict, data, device: torch.device,
                 dist_info: Dist, validate: Callable[[nn.Module], dict[str, float]], summary: str,
                 schedule: GeneSchedule | None = None, resume_state: dict | None = None) -> dict[str, float]:
    """What both training scripts do once model and data exist and the input is checked: the
    loader, the split file and the logger (rank 0), the epoch loop, and leaving the process group."""
    loader = make_loader(data.train, args.batch_size, True, args.workers, args.seed, dist_info.rank,
                         dist_info.world_size, pin_memory=device.type == "cuda")
    if len(loader) == 0:
        raise UserError(f"--batch-size {args.batch_size} is larger than the {len(data.train)} training images")
    path = log_path(args)
    checkpoint.check_writable(checkpoint_dir(args), path.parent)
    # rank 0 writes; under the lock the outputs are checked again: a run of this name may have
    # written them since main() first checked
    with checkpoint.run_lock(checkpoint_dir(args), run_name(args)) if dist_info.main else contextlib.nullcontext():
        if dist_info.main:
            checkpoint.check_outputs(run_files(args), args.resume, args.overwrite, "--resume")
            data.save_split()
        logger = RunLogger(path, enabled=dist_info.main,
                           sink=make_sink(args, path.stem, path, run_name(args), bool(args.resume))
                           if dist_info.main else None)
        logger.info(f"config {json.dumps(vars(args), sort_keys=True)}")
        logger.info(summary)
        try:
            metrics = Trainer(args, model, record, loader, device, logger, validate, schedule,
                              dist_info).fit(resume_state)
            logger.info("final " + " ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
        finally:
            logger.close()
    del model
    cleanup()
    return metrics
