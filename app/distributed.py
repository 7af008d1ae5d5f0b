"""Devices and torchrun: one process per GPU (or per CPU worker), DistributedDataParallel, gloo on CPU."""
from __future__ import annotations

import argparse
import gc
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .config import UserError


@dataclass(frozen=True)
class Dist:
    """This process's place in the job (a single process is rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Only the main process writes checkpoints, logs and plots."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def select_device(args: argparse.Namespace) -> torch.device:
    """The device ``--gpu``/``--cpu`` ask for; a GPU this machine lacks is a clear error."""
    if args.cpu:
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if args.gpu is None:
        return torch.device("cuda", 0) if count else torch.device("cpu")
    if len(args.gpu) > 1:
        ids = ",".join(map(str, args.gpu))
        raise UserError(f"--gpu {ids}: one process drives one GPU; for several run CUDA_VISIBLE_DEVICES={ids} "
                        f"torchrun --nproc_per_node={len(args.gpu)} <script> <the same flags without --gpu>")
    index = args.gpu[0]
    if index >= count and count:
        raise UserError(f"--gpu {index}: this machine has {count} CUDA GPU(s), 0..{count - 1}; pick one or drop --gpu")
    if index >= count:
        raise UserError(f"--gpu {index}: this machine has no CUDA GPU; drop --gpu to run on the CPU")
    return torch.device("cuda", index)


def setup(args: argparse.Namespace, fixed_shapes: bool) -> tuple[Dist, torch.device]:
    """Join the torchrun job if there is one (NCCL on CUDA, gloo on CPU), pick this process's device
    and the kernels.

    cuDNN autotuning (``cudnn.benchmark``) is on only where the conv shapes stay fixed
    (``fixed_shapes``: PrunedNet training, the search's scoring of one candidate over thousands of
    batches). A PruningNet changes its conv shapes with every step's gene, so autotuning there would
    benchmark a new shape almost every step. ``--deterministic`` turns it off and picks
    deterministic kernels.
    """
    deterministic = getattr(args, "deterministic", False)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = fixed_shapes and not deterministic
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        device = select_device(args)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        check_amp(getattr(args, "amp", None), device)
        return Dist(), device
    if args.gpu is not None:
        raise UserError("--gpu is for one process; under torchrun pick GPUs with CUDA_VISIBLE_DEVICES")
    info = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    use_cuda = torch.cuda.is_available() and not args.cpu
    if use_cuda:
        count = torch.cuda.device_count()
        if info.local_rank >= count:
            raise UserError(f"LOCAL_RANK {info.local_rank}: this node has {count} visible CUDA GPU(s), one per "
                            f"process; start torchrun with --nproc-per-node {count} or fewer (or set "
                            f"CUDA_VISIBLE_DEVICES to more GPUs)")
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    check_amp(getattr(args, "amp", None), device)
    # The other processes wait in a collective while rank 0 alone measures a latency table or writes
    # (and copies) a PruningNet checkpoint of several GB: NCCL's default 10 minutes is too short.
    dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None,
                            timeout=timedelta(minutes=args.dist_timeout))
    return info, device


def check_amp(amp: str | None, device: torch.device) -> None:
    """``--amp bf16`` needs bf16 tensor cores (compute capability 8.0, Ampere, or newer); older GPUs
    such as the V100 would emulate it at a fraction of the speed."""
    if amp != "bf16" or device.type != "cuda":
        return
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        raise UserError(f"--amp bf16: {torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) has "
                        f"no bf16 tensor cores and would emulate bf16 slowly; use --amp fp16 on this GPU")


def cleanup() -> None:
    """Leave the process group. Call it after the DDP model and optimizer are gone: gloo aborts at
    exit in a few percent of runs when they outlive ``destroy_process_group``."""
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def sum_over_processes(t: torch.Tensor) -> list[float]:
    """Element-wise sum of the device tensor ``t`` over all processes, read on the host: one
    exchange and one device sync (``t`` is summed in place)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def any_process(flags: list[bool], device: torch.device) -> list[bool]:
    """Element-wise: is the flag set on any process? (the flags themselves in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flags
    t = torch.tensor(flags, dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def all_gather(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order (a one-element list in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
