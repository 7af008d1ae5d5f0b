"""Plain training of a network from a JSON experiment (the README's baselines).

Full width by default; ``--gene`` or ``--search-resume FILE --candidate N`` train that PrunedNet
from scratch. Unlike ``meta_trainer_exp.py --arch *_prunednet`` (which records the all ``-1``
gene), a full-width run's checkpoint stores no gene: it describes a plain network of the arch.
"""
from __future__ import annotations

import argparse
import sys

import torch

from app import checkpoint
from app.config import add_common_args, add_training_args, dump, parse_args, run_files
from app.distributed import setup
from app.engine import check_resume, evaluate, run_training
from app.genes import add_gene_args, derive_gene_args, resolve_gene, validate_gene_args
from data import get_data, make_loader
from models import create_model, get_family, is_pruningnet
from models.cost import cost_model
from utils.cli import Parser, UserError, run_script


def get_args_parser() -> Parser:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    add_training_args(p)
    add_gene_args(p)
    return p


def _validate(args: argparse.Namespace) -> None:
    if is_pruningnet(args.arch):
        raise UserError(f"trainer_exp.py trains plain networks; use meta_trainer_exp.py for {args.arch}")
    validate_gene_args(args)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Parse, check the input, then train; the final validation metrics."""
    args = parse_args(get_args_parser(), argv, _validate, derive_gene_args)
    if args.dry_run:
        print(dump(args))
        return {}
    dist_info, device = setup(args, fixed_shapes=True)
    torch.manual_seed(args.seed)
    resume_state = checkpoint.load(args.resume, checkpoint.MODEL, "--resume", mmap=True) if args.resume else None
    checkpoint.check_outputs(run_files(args), args.resume, args.overwrite, "--resume")
    data = get_data(args.dataset, args.data_root, args.input_size, args.val_per_class, hold_out=False, seed=args.seed,
                    skip_damaged=args.skip_bad_images, lighting=args.lighting)
    model_args = {"num_classes": data.num_classes, "width_mult": args.width_mult, "small_input": args.small_input}
    gene, _ = resolve_gene(args)
    model = create_model(args.arch, gene=gene, **model_args).to(device)
    cost = cost_model(args.arch, args.input_size, data.num_classes, args.width_mult, args.small_input)(gene)
    val = make_loader(data.val, args.batch_size, False, args.workers, rank=dist_info.rank,
                      world_size=dist_info.world_size, pin_memory=device.type == "cuda")
    record = checkpoint.model_record(args.arch, None if gene == get_family(args.arch).layout.full() else gene,
                                     **model_args)
    validate = lambda m: evaluate(m, val, device, args.amp, args.channels_last, reduce=dist_info.enabled)
    summary = f"{args.arch}: {cost.macs / 1e6:.2f} MMac, {cost.params / 1e6:.3f} M params"
    if resume_state is not None:
        check_resume(resume_state, record, args, dist_info.world_size)
    return run_training(args, model, record, data, device, dist_info, validate, summary, resume_state=resume_state)


if __name__ == "__main__":
    run_script(main, sys.argv[1:])
