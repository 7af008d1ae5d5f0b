"""Train a PruningNet (``--arch *_pruningnet``) or retrain a PrunedNet (``--arch *_prunednet``).

PruningNet: every step draws a fresh random gene; ``--valuate`` scores fixed probe genes (widest,
middle, narrowest) with recalibrated BN on the sub-validation split, which training never sees.
PrunedNet: the gene comes from ``--gene``, from ``--search-resume FILE --candidate N`` or from the
``--json`` file (default: full width); ``--inherit`` starts from inherited weights instead of from scratch.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

from app import checkpoint
from app.config import SPLIT_DIR, add_common_args, add_training_args, dump, gene_literal, parse_args, run_files
from app.distributed import Dist, setup
from app.engine import GeneSchedule, check_resume, evaluate, run_training
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
    p.flag("--recal-batches", type=int, default=20, help="training batches for BN recalibration of --valuate probes")
    p.flag("--recal-batch-size", type=int, default=None, help="images per recalibration batch (default --batch-size)")
    p.flag("--sandwich", type=int, default=None, metavar="N",
           help="PruningNet: every step adds up the gradients of the widest gene, the narrowest and N random genes "
                "(the sandwich rule; default: one random gene, the paper's)")
    p.flag("--distill", action="store_true",
           help="PruningNet with --sandwich: the other genes learn from the widest gene's soft predictions of the "
                "same batch (in-place distillation), the widest from the labels")
    return p


def add_gene_args(p: Parser) -> None:
    """Where a PrunedNet's gene comes from (also ``trainer_exp.py``'s flags)."""
    p.flag("--gene", type=gene_literal, default=None, help='PrunedNet gene, e.g. "[20, 10, ..., 24]"')
    p.flag("--search-resume", default=None, help="search checkpoint whose candidate to retrain")
    p.flag("--candidate", type=int, default=None, help="rank of the candidate in --search-resume (0 = best)")


def _validate(args: argparse.Namespace) -> None:
    if is_pruningnet(args.arch) and args.inherit:
        raise UserError(f"--inherit is for *_prunednet archs, not {args.arch}")
    if not is_pruningnet(args.arch) and (args.sandwich is not None or args.distill):
        raise UserError(f"--sandwich and --distill train a PruningNet (*_pruningnet archs), not {args.arch}")
    if args.sandwich is not None and not 0 <= args.sandwich <= 64:
        raise UserError(f"--sandwich N takes 0 to 64 random genes beside the widest and the narrowest, got "
                        f"{args.sandwich}")
    if args.distill and args.sandwich is None:
        raise UserError("--distill needs --sandwich N (the widest gene of each step is the teacher)")
    validate_gene_args(args)
    if args.recal_batches < 1 or (args.recal_batch_size is not None and args.recal_batch_size < 1):
        raise UserError(f"--recal-batches and --recal-batch-size must be positive integers, got {args.recal_batches} "
                        f"and {args.recal_batch_size}")


def validate_gene_args(args: argparse.Namespace) -> None:
    """Check the gene flags of ``add_gene_args``; a retrained search candidate is named after its budget."""
    pruning = is_pruningnet(args.arch)
    if pruning and (args.gene is not None or args.search_resume):
        raise UserError(f"--gene and --search-resume are for *_prunednet archs, not {args.arch}")
    if args.candidate is not None and not args.search_resume:
        raise UserError("--candidate N needs --search-resume FILE (the search checkpoint holding the candidates)")
    if args.gene is not None and args.search_resume:
        raise UserError("give the gene either with --gene or with --search-resume/--candidate, not both")
    if args.candidate is not None and args.candidate < 0:
        raise UserError(f"--candidate must be 0 or more, got {args.candidate}")
    if not pruning and args.gene is not None:
        _parse_gene(args.arch, args.gene)
    if args.search_resume:
        args.suffix = retrain_suffix(args.search_resume, args.candidate or 0, args.suffix)


def retrain_suffix(search_file: str, candidate: int, suffix: str) -> str:
    """The name of a retrained candidate: the search's own (its budgets and suffix, as the README's
    ``_flops1500`` names), or ``--suffix`` when given; ``_candidate{N}`` for every candidate but the
    best, so that retraining several candidates of one search keeps each one's files."""
    if not suffix:
        match = re.fullmatch(r"MetaPruneSearch_[a-z0-9]+_pruningnet(_flops.*)_checkpoint\.pth\.tar",
                             Path(search_file).name)
        suffix = match.group(1) if match else ""
    return suffix + (f"_candidate{candidate}" if candidate else "")


def _parse_gene(arch: str, value: object) -> Gene:
    try:
        return get_family(arch).layout.parse(value)
    except ValueError as e:
        raise UserError(f"--gene: {e}") from None


def _search_state(args: argparse.Namespace) -> dict:
    state = checkpoint.load(args.search_resume, checkpoint.SEARCH, "--search-resume")
    if get_family(state["arch"]) is not get_family(args.arch):
        raise UserError(f"--search-resume {args.search_resume}: the search was over {state['arch']}, "
                        f"not the {args.arch} family")
    return state


def resolve_gene(args: argparse.Namespace) -> tuple[Gene, dict | None]:
    """The PrunedNet's gene and, with ``--search-resume``, the PruningNet that search scored with:
    ``{"path": absolute path, "run": ..., "trained": [epoch, step]}`` (``checkpoint.identity``)."""
    if not args.search_resume:
        layout = get_family(args.arch).layout
        return (_parse_gene(args.arch, args.gene) if args.gene is not None else layout.full()), None
    state = _search_state(args)
    n, candidates = args.candidate or 0, state["candidates"]
    if n >= len(candidates):
        raise UserError(f"--candidate {n}: the search checkpoint holds {len(candidates)} candidates "
                        f"(0..{len(candidates) - 1})")
    settings = state["settings"]
    pruningnet = {"path": settings.get("resume", state.get("pruningnet")), "run": settings.get("pruningnet_run"),
                  "trained": settings.get("pruningnet_trained")}
    return _parse_gene(args.arch, candidates[n]), pruningnet


def inherit_weights(model: torch.nn.Module, gene: Gene, path: str, searched_with: dict | None = None) -> None:
    """Start ``model`` from checkpoint ``path``: a PruningNet's materialized PrunedNet for ``gene``,
    or the weights of a PrunedNet of the same gene (e.g. a search's exported best candidate).

    ``searched_with`` (``resolve_gene``) is the PruningNet a search scored the gene with: a
    PruningNet given here must hold those very weights, whatever its path."""
    state = checkpoint.load(path, checkpoint.MODEL, "--inherit", mmap=True)
    family = model.spec.layout.family
    if get_family(state["arch"]).layout != model.spec.layout:
        raise UserError(f"--inherit {path}: holds {state['arch']}, not a network of the {family} family")
    if state["model_args"]["num_classes"] != model.num_classes:
        raise UserError(f"--inherit {path}: the network has {state['model_args']['num_classes']} classes, this "
                        f"dataset {model.num_classes}")
    net = checkpoint.build_model(state)
    if net.spec != model.spec:
        raise UserError(f"--inherit {path}: the network was built with {state['model_args']}; pass the same "
                        f"--width-mult and --small-input")
    if not is_pruningnet(state["arch"]):
        if net.gene != tuple(gene):
            raise UserError(f"--inherit {path}: a PrunedNet of gene {model.spec.layout.format(net.gene)}, not of "
                            f"this run's gene {model.spec.layout.format(gene)}")
        model.load_state_dict(net.state_dict())
        return
    if searched_with is not None:
        check_searched_with(path, checkpoint.identity(state), searched_with)
    model.load_state_dict(net.materialize(gene).state_dict())


def check_searched_with(path: str, got: dict, searched_with: dict) -> None:
    """A PruningNet to inherit from is the one the search used: the same training run (when the
    search recorded it) at the same epoch and step."""
    want = searched_with["trained"]
    other_run = searched_with["run"] is not None and got["run"] != searched_with["run"]
    if other_run or (want is not None and got["trained"] != want):
        held = "another training run's weights" if other_run else \
            f"the weights of epoch {got['trained'][0]} step {got['trained'][1]}"
        raise UserError(f"--inherit {path}: the search scored its candidates with {searched_with['path']} at epoch "
                        f"{want[0]} step {want[1]}, and this file holds {held}; inherit from the PruningNet the "
                        f"search used (--inherit FILE), or retrain from scratch without --inherit")


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
    validate = lambda m: evaluate(m, val, device, args, reduce=dist_info.enabled)
    return model, checkpoint.model_record(args.arch, gene, **model_args), validate, None, summary


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Parse, check every input file, then train; the final validation metrics."""
    args = parse_args(get_args_parser(), argv, _validate)
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
                    split_dir=SPLIT_DIR)
    model_args = {"num_classes": data.num_classes, "width_mult": args.width_mult, "small_input": args.small_input}
    build = build_pruningnet if pruning else build_prunednet
    model, record, validate, schedule, summary = build(args, data, device, dist_info, model_args)
    if resume_state is not None:
        check_resume(resume_state, record, args, dist_info.world_size)
    return run_training(args, model, record, data, device, dist_info, validate, summary, schedule, resume_state)


if __name__ == "__main__":
    run_script(main, sys.argv[1:])
