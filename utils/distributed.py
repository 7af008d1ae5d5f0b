"""Device selection and (for torchrun) the process group."""
from __future__ import annotations

import argparse

import torch

from .config import UserError


def select_device(args: argparse.Namespace) -> torch.device:
    """The device ``--gpu``/``--cpu`` ask for; a GPU this machine lacks is a clear error."""
    if args.cpu:
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if args.gpu is None:
        return torch.device("cuda", 0) if count else torch.device("cpu")
    if len(args.gpu) > 1:
        raise UserError(f"--gpu {','.join(map(str, args.gpu))}: one process drives one GPU; for several use "
                        f"torchrun --nproc_per_node={len(args.gpu)} with CUDA_VISIBLE_DEVICES={','.join(map(str, args.gpu))}")
    index = args.gpu[0]
    if index >= count:
        have = f"{count} CUDA GPU{'s' if count != 1 else ''}" if count else "no CUDA GPU"
        raise UserError(f"--gpu {index}: this machine has {have}; pick an index below {count} or drop --gpu to run "
                        f"on the CPU" if count else f"--gpu {index}: this machine has {have}; drop --gpu to run on the CPU")
    return torch.device("cuda", index)
