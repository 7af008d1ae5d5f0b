"""Plain training of a full-width network from a JSON experiment (the README's baselines).

Unlike ``meta_trainer_exp.py --arch *_prunednet`` (which records the all ``-1`` gene), the
checkpoint stores no gene: it describes a plain network of the given arch.
"""
from __future__ import annotations

import argparse
import sys

import torch

from data import get_data, make_loader
from models import create_model, is_pruningnet, small_input_for
from models.cost import cost_model
from utils import checkpoint
from utils.config import Parser, UserError, add_common_args, add_training_args, dump, log_path, parse_args, run_script
from utils.distributed import select_device
from utils.engine import evaluate, fit
from utils.logger import RunLogger


def get_args_parser() -> Parser:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    add_training_args(p)
    return p


def _validate(args: argparse.Namespace) -> None:
    if is_pruningnet(args.arch):
        raise UserError(f"trainer_exp.py trains plain networks; use meta_trainer_exp.py for {args.arch}")


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(get_args_parser(), argv, _validate)
    if args.dry_run:
        print(dump(args))
        return {}
    device = select_device(args)
    torch.manual_seed(args.seed)
    data = get_data(args.dataset, args.data_root, args.input_size, args.val_per_class, hold_out=False)
    small = small_input_for(args.input_size)
    model_args = {"num_classes": data.num_classes, "width_mult": args.width_mult, "small_input": small}
    model = create_model(args.arch, **model_args).to(device)
    logger = RunLogger(log_path(args))
    logger.info(f"config {dump(args)}")
    cost = cost_model(args.arch, args.input_size, data.num_classes, args.width_mult, small)(model.gene)
    logger.info(f"{args.arch}: {cost.macs / 1e6:.2f} MMac, {cost.params / 1e6:.3f} M params")
    pin = device.type == "cuda"
    loader = make_loader(data.train, args.batch_size, True, args.workers, args.seed, pin_memory=pin)
    if len(loader) == 0:
        raise UserError(f"--batch-size {args.batch_size} is larger than the {len(data.train)} training images")
    val_loader = make_loader(data.val, args.batch_size, False, args.workers, pin_memory=pin)
    record = checkpoint.model_record(args.arch, None, **model_args)
    metrics = fit(args, model, record, loader, device, logger, lambda m: evaluate(m, val_loader, device))
    logger.info("final " + " ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
    logger.close()
    return metrics


if __name__ == "__main__":
    run_script(main, sys.argv[1:])
