"""Train a PruningNet (``--arch *_pruningnet``) or retrain a PrunedNet (``--arch *_prunednet``).

PruningNet: every step draws a fresh random gene; ``--valuate`` scores fixed probe genes (widest,
middle, narrowest) with recalibrated BN on the sub-validation split, which training never sees.
PrunedNet: the gene comes from ``--gene``, from ``--search-resume FILE --candidate N`` or from the
``--json`` file (default: full width); ``--inherit`` starts from inherited weights instead of from scratch.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from app import checkpoint
from app.config import (add_common_args, add_recalibration_args, add_training_args, dump, parse_args, run_files,
                        split_dir)
from app.distributed import Dist, setup
from app.engine import GeneSchedule, check_resume, evaluate, run_training
from app.genes import add_gene_args, derive_gene_args, inherit_weights, resolve_gene, validate_gene_args
from data import fixed_batches, get_data, make_loader
from models import Gene, GeneLayout, create_model, get_family, is_pruningnet
from models.cost import cost_model
from search.evaluator import CandidateEvaluator
from utils.cli import Parser, UserError, run_script

MIDDLE_ID = 15


def probe_genes(layout: GeneLayout) -> dict[str, Gene]:
    """The fixed genes ``--valuate`` scores a PruningNet on: widest, middle and narrowest."""
    middle = layout.validate([30 if i in layout.fixed else MIDDLE_ID for i in range(len(layout))])
    return {"widest": layout.full(), "middle": middle, "narrowest": layout.narrowest()}


def get_args_parser() -> Parser:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    add_training_args(p)
    add_gene_args(p)
    p.flag("--inherit", nargs="?", const="auto", default=None,
           help="start from inherited weights (fine-tuning): a PruningNet checkpoint's generated weights for the "
                "gene, or a PrunedNet checkpoint of the same gene; without a path, the PruningNet the search used")
    p.flag("--zero-init-residual", action="store_true",
           help="PrunedNet from scratch: every residual block starts as its shortcut (the last BN of its body "
                "scaled by 0)")
    add_recalibration_args(p, 20, "--valuate's probes")
    p.flag("--sandwich", type=int, default=None, metavar="N",
           help="PruningNet: every step adds up the gradients of the widest gene, the narrowest and N random genes "
                "(the sandwich rule; default: one random gene, the paper's)")
    p.flag("--distill", action="store_true",
           help="PruningNet with --sandwich: the other genes learn from the widest gene's soft predictions of the "
                "same batch (in-place distillation), the widest from the labels")
    return p


def _validate(args: argparse.Namespace) -> None:
    if is_pruningnet(args.arch) and args.inherit:
        raise UserError(f"--inherit is for *_prunednet archs, not {args.arch}")
    if not is_pruningnet(args.arch) and (args.sandwich is not None or args.distill):
        raise UserError(f"--sandwich and --distill train a PruningNet (*_pruningnet archs), not {args.arch}")
    if args.zero_init_residual and (is_pruningnet(args.arch) or args.inherit):
        raise UserError("--zero-init-residual initialises a PrunedNet trained from scratch: drop it with --inherit "
                        "and with *_pruningnet archs")
    if args.sandwich is not None and not 0 <= args.sandwich <= 64:
        raise UserError(f"--sandwich N takes 0 to 64 random genes beside the widest and the narrowest, got "
                        f"{args.sandwich}")
    if args.distill and args.sandwich is None:
        raise UserError("--distill needs --sandwich N (the widest gene of each step is the teacher)")
    validate_gene_args(args)


def build_pruningnet(args: argparse.Namespace, data, device: torch.device, dist_info: Dist, model_args: dict):
    """The PruningNet, its checkpoint record, and ``--valuate``'s probe-gene scoring on the sub-val split."""
    layout = get_family(args.arch).layout
    model = create_model(args.arch, **model_args).to(device)
    # pinned host memory: the GPU's memory belongs to the training run, which reads this set only to validate
    recal = fixed_batches(data.train_eval, args.recal_batches, args.recal_batch_size or args.batch_size, args.seed,
                          device, args.workers, keep_on_device=False)
    subval = make_loader(data.subval, args.batch_size, False, args.workers, rank=dist_info.rank,
                         world_size=dist_info.world_size, pin_memory=device.type == "cuda")
    evaluator = CandidateEvaluator(model, recal, subval, device, reduce=dist_info.enabled)
    probes = probe_genes(layout)

    def validate(_model: torch.nn.Module) -> dict[str, float]:
        scores = {f"top1_{k}": evaluator.top1(g) for k, g in probes.items()}
        return {"top1": sum(scores.values()) / len(scores), **scores}

    summary = f"{args.arch}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters"
    schedule = GeneSchedule(layout, args.seed, args.sandwich, args.distill)
    return model, checkpoint.model_record(args.arch, None, **model_args), validate, schedule, summary


def build_prunednet(args: argparse.Namespace, data, device: torch.device, dist_info: Dist, model_args: dict):
    """The PrunedNet of the resolved gene (optionally with inherited weights) and its validation."""
    gene, searched_with = resolve_gene(args)
    model = create_model(args.arch, gene=gene, **model_args)
    if args.zero_init_residual:
        model.zero_init_residual()
    if args.inherit == "auto":
        if searched_with is None:
            raise UserError("--inherit without a path needs --search-resume (whose search names its PruningNet)")
        if not Path(searched_with["path"]).is_file():
            raise UserError(f"--inherit: the PruningNet the search used, {searched_with['path']}, is gone; pass a copy "
                            f"of it with --inherit FILE")
        inherit_weights(model, gene, searched_with["path"], searched_with)
    elif args.inherit:
        inherit_weights(model, gene, args.inherit, searched_with)
    model.to(device)
    cost = cost_model(args.arch, args.input_size, data.num_classes, args.width_mult, args.small_input)(gene)
    summary = (f"gene {get_family(args.arch).layout.format(gene)}: {cost.macs / 1e6:.2f} MMac, "
               f"{cost.params / 1e6:.3f} M params")
    val = make_loader(data.val, args.batch_size, False, args.workers, rank=dist_info.rank,
                      world_size=dist_info.world_size, pin_memory=device.type == "cuda")
    validate = lambda m: evaluate(m, val, device, args.amp, args.channels_last, reduce=dist_info.enabled)
    return model, checkpoint.model_record(args.arch, gene, **model_args), validate, None, summary


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Parse, check every input file, then train; the final validation metrics."""
    args = parse_args(get_args_parser(), argv, _validate, derive_gene_args)
    if args.dry_run:
        print(dump(args))
        return {}
    pruning = is_pruningnet(args.arch)
    dist_info, device = setup(args, fixed_shapes=not pruning)
    torch.manual_seed(args.seed)
    resume_state = checkpoint.load(args.resume, checkpoint.MODEL, "--resume", mmap=True) if args.resume else None
    checkpoint.check_outputs(run_files(args), args.resume, args.overwrite, "--resume")
    data = get_data(args.dataset, args.data_root, args.input_size, args.val_per_class, hold_out=pruning,
                    seed=args.seed, defer_split=True, skip_damaged=args.skip_bad_images, lighting=args.lighting,
                    split_dir=split_dir(args))
    model_args = {"num_classes": data.num_classes, "width_mult": args.width_mult, "small_input": args.small_input}
    build = build_pruningnet if pruning else build_prunednet
    model, record, validate, schedule, summary = build(args, data, device, dist_info, model_args)
    if resume_state is not None:
        check_resume(resume_state, record, args, dist_info.world_size)
    return run_training(args, model, record, data, device, dist_info, validate, summary, schedule, resume_state)


if __name__ == "__main__":
    run_script(main, sys.argv[1:])
