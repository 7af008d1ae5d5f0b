"""Where a PrunedNet's gene comes from: ``--gene``, or ``--search-resume FILE --candidate N``, and the
weights it may start from (``--inherit``). Shared by ``meta_trainer_exp.py`` and ``trainer_exp.py``."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from models import Gene, get_family, is_pruningnet
from search import record
from utils.cli import Parser, UserError

from . import checkpoint


def raw_gene(value: object) -> str | list:
    """A gene as the user wrote it: a string, or a list from ``--json``; parsed once the arch is known."""
    if isinstance(value, (str, list)):
        return value
    raise argparse.ArgumentTypeError(f"a gene is a list of ids, got {value!r}")


def add_gene_args(p: Parser) -> None:
    """Where a PrunedNet's gene comes from (``meta_trainer_exp.py`` and ``trainer_exp.py``)."""
    p.flag("--gene", type=raw_gene, default=None, help='PrunedNet gene, e.g. "[20, 10, ..., 24]"')
    p.flag("--search-resume", default=None, help="search checkpoint whose candidate to retrain")
    p.flag("--candidate", type=int, default=None, help="rank of the candidate in --search-resume (0 = best)")


def validate_gene_args(args: argparse.Namespace) -> None:
    """Check the gene flags of ``add_gene_args`` against each other and the arch."""
    pruning = is_pruningnet(args.arch)
    if pruning and (args.gene is not None or args.search_resume):
        raise UserError(f"--gene and --search-resume are for *_prunednet archs, not {args.arch}")
    if args.candidate is not None and not args.search_resume:
        raise UserError("--candidate N needs --search-resume FILE (the search checkpoint holding the candidates)")
    if args.gene is not None and args.search_resume:
        raise UserError("give the gene either with --gene or with --search-resume/--candidate, not both")
    if args.candidate is not None and args.candidate < 0:
        raise UserError(f"--candidate must be 0 or more, got {args.candidate}")


def derive_gene_args(args: argparse.Namespace) -> dict:
    """The values the gene flags fix: ``--gene`` parsed (once, as the arch's canonical ids), and the
    name of a retrained search candidate (``retrain_suffix``)."""
    derived = {}
    if args.gene is not None:
        try:
            derived["gene"] = get_family(args.arch).layout.parse(args.gene)
        except ValueError as e:
            raise UserError(f"--gene: {e}") from None
    if args.search_resume:
        derived["suffix"] = retrain_suffix(args.search_resume, args.candidate or 0, args.suffix)
    return derived


def retrain_suffix(search_file: str, candidate: int, suffix: str) -> str:
    """The name of a retrained candidate: the search's own (its budgets and suffix, as the README's
    ``_flops1500`` names), or ``--suffix`` when given; ``_candidate{N}`` for every candidate but the
    best, so that retraining several candidates of one search keeps each one's files."""
    if not suffix:
        match = re.fullmatch(r"MetaPruneSearch_[a-z0-9]+_pruningnet(_flops.*)_checkpoint\.pth\.tar",
                             Path(search_file).name)
        suffix = match.group(1) if match else ""
    return suffix + (f"_candidate{candidate}" if candidate else "")


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
        return (args.gene if args.gene is not None else get_family(args.arch).layout.full()), None
    state = _search_state(args)
    n, candidates = args.candidate or 0, state["candidates"]
    if n >= len(candidates):
        raise UserError(f"--candidate {n}: the search checkpoint holds {len(candidates)} candidates "
                        f"(0..{len(candidates) - 1})")
    try:
        return get_family(args.arch).layout.parse(candidates[n]), record.scored_with(state)
    except ValueError as e:
        raise UserError(f"--search-resume {args.search_resume}: candidate {n} is not a {args.arch} gene ({e})") from None


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
