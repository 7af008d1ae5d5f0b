"""The search checkpoint: where a search writes, what its checkpoint holds, and what a resumed search
and a retraining of one of its candidates are checked against.

Read by ``meta_search_exp.py`` (writing, ``--search-resume``) and by ``app.genes`` (a retraining's
``--search-resume FILE --candidate N`` and ``--inherit``).
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Iterable

import torch

from app import checkpoint
from app.config import checkpoint_dir, log_dir
from models import Gene, recalibrate_bn
from models.cost import CostModel, channel_table
from utils.cli import UserError

from . import evolution

# Flags whose values change the candidates' scores or the evolution: a resumed search must keep them.
RESUME_FLAGS = ("dataset", "input_size", "width_mult", "batch_size", "recal_batches", "recal_batch_size",
                "val_per_class", "seed", "population", "select_num", "mutation_num", "crossover_num", "mutation_prob")


def millionths(value: float, round_up: bool) -> int:
    """``value`` millions as a whole count (MMac → MACs, M → params), from its decimal spelling.

    ``Decimal(repr(value))`` keeps what was typed (``0.3`` is 300000, not 299999.99...); upper
    bounds round down and lower bounds up, because costs are whole numbers.
    """
    units = Decimal(repr(value)) * 1_000_000
    return math.ceil(units) if round_up else math.floor(units)


def budget(cfg: argparse.Namespace) -> dict[str, float]:
    return {"flops": cfg.flops, "min_flops": cfg.min_flops, "params": cfg.params, "latency": cfg.latency}


@dataclass(frozen=True)
class SearchFiles:
    """Where a search writes: named ``MetaPruneSearch_{arch}_flops{budget}{other budgets}{suffix}``."""

    stem: str
    checkpoint: Path
    export: Path  # the best candidate as a standalone PrunedNet
    log: Path


def search_files(cfg: argparse.Namespace) -> SearchFiles:
    """The search's files, named after every budget that changes its result (``--flops`` as written,
    ``cfg.flops_name``, then ``--min-flops``, ``--params``, ``--latency`` when given) and ``--suffix``."""
    others = "".join(f"_{name}{value:g}" for name, value in (("minflops", cfg.min_flops), ("params", cfg.params),
                                                             ("latency", cfg.latency)) if value)
    stem = f"MetaPruneSearch_{cfg.arch}_flops{cfg.flops_name}{others}{cfg.suffix}"
    folder = checkpoint_dir(cfg)
    return SearchFiles(stem, folder / f"{stem}_checkpoint.pth.tar", folder / f"{stem}_best_prunednet.pth.tar",
                       Path(cfg.log) if cfg.log else log_dir(cfg) / f"{stem}.txt")


def settings(cfg: argparse.Namespace, pruningnet: dict) -> dict:
    """What a resumed search, and a retraining that inherits from its PruningNet, are checked
    against: the flags, the PruningNet file (absolute) and what identifies its weights."""
    return {**{name: getattr(cfg, name) for name in RESUME_FLAGS}, "resume": str(Path(cfg.resume).resolve()),
            "pruningnet_trained": pruningnet["trained"], "pruningnet_run": pruningnet["run"]}


def scored_with(state: dict) -> dict:
    """The PruningNet a search checkpoint's candidates were scored with: ``{"path": absolute path,
    "run": ..., "trained": [epoch, step]}`` (``checkpoint.identity``; None where an older search did
    not record them; a search checkpoint from before the settings held the path names it at its top level)."""
    saved = state["settings"]
    return {"path": saved.get("resume", state.get("pruningnet")), "run": saved.get("pruningnet_run"),
            "trained": saved.get("pruningnet_trained")}


def check_resumed(cfg: argparse.Namespace, state: dict) -> None:
    """A ``--search-resume`` checkpoint must be this search's: arch, budget, no more iterations done
    than ``--epochs``."""
    where = f"--search-resume {cfg.search_resume}"
    if state["arch"] != cfg.arch:
        raise UserError(f"{where}: a search over {state['arch']}, not {cfg.arch}")
    if state["budget"] != budget(cfg):
        raise UserError(f"{where}: the search ran under budget {state['budget']}, not {budget(cfg)}; resume it with "
                        f"the same --flops/--min-flops/--params/--latency")
    if cfg.epochs < state["iter"]:
        raise UserError(f"{where}: the search has done {state['iter']} iterations, more than --epochs {cfg.epochs}; "
                        f"give --epochs {state['iter']} to report its result, or more to continue it")


def check_settings(cfg: argparse.Namespace, state: dict, now: dict) -> None:
    """A resumed search must score and evolve as it began: the flags of ``RESUME_FLAGS``, the same
    PruningNet file, and that file not trained further since."""
    where = f"--search-resume {cfg.search_resume}"
    saved = state.get("settings", {})
    for key, value in now.items():
        if key not in saved or saved[key] == value:
            continue
        if key == "pruningnet_run":
            raise UserError(f"{where}: the PruningNet {cfg.resume} is not the one the search began with (another "
                            f"training run); resume with the PruningNet the search used (or start a new search)")
        if key == "pruningnet_trained":
            raise UserError(f"{where}: the PruningNet {cfg.resume} was at epoch {saved[key][0]} step "
                            f"{saved[key][1]} when the search began and is now at epoch {value[0]} step {value[1]}; "
                            f"resume with the PruningNet the search used (or start a new search)")
        flag = "--" + key.replace("_", "-")
        raise UserError(f"{where}: the search ran with {flag} {saved[key]}, this run has {flag} {value}; resume "
                        f"with {flag} {saved[key]} (or start a new search without --search-resume)")


def search_state(cfg: argparse.Namespace, s: evolution.SearchState, now: dict, costs: CostModel,
                 num_classes: int) -> dict:
    """The search checkpoint: resumable state plus the candidates, best first, in the README's gene form."""
    best, layout = s.best(), costs.spec.layout
    return {"format": checkpoint.FORMAT, "kind": checkpoint.SEARCH, "arch": cfg.arch, "flops_arch": cfg.flops_arch,
            "dataset": cfg.dataset, "budget_name": cfg.flops_name, "suffix": cfg.suffix, "budget": budget(cfg),
            "settings": now, "iter": s.iteration, "epochs": cfg.epochs,
            "candidates": [layout.format(g, e) for g, e in best],
            "macs": [costs(g).macs for g, _ in best], "params": [costs(g).params for g, _ in best],
            "state": s.to_dict(), "input_size": cfg.input_size,
            "model_args": {"num_classes": num_classes, "width_mult": cfg.width_mult, "small_input": cfg.small_input},
            "config": vars(cfg)}


def export_best(net, gene: Gene, error: float, recal: Iterable[torch.Tensor], cfg: argparse.Namespace,
                costs: CostModel, files: SearchFiles) -> None:
    """Save the best candidate as a PrunedNet checkpoint with inherited, BN-recalibrated weights."""
    pruned = recalibrate_bn(net.materialize(gene), recal)
    record = checkpoint.model_record(cfg.flops_arch, gene, net.num_classes, cfg.width_mult, cfg.small_input)
    cost = costs(gene)
    checkpoint.save({"format": checkpoint.FORMAT, "kind": checkpoint.MODEL, **record, "dataset": cfg.dataset,
                     "model": pruned.state_dict(), "epoch": 0, "best_top1": 100.0 - error, "macs": cost.macs,
                     "params": cost.params, "channels": channel_table(net.spec, gene, net.num_classes),
                     "source": str(files.checkpoint.resolve()), "config": vars(cfg)}, files.export)
