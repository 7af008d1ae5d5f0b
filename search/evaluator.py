"""Candidate evaluator: the top-1 of a gene with PruningNet-generated weights.

For each gene: materialize the PrunedNet once (weights generated once), recalibrate its BatchNorm
statistics exactly (cumulative average) on a fixed set of training batches, then score top-1 on
the evaluation batches in inference mode. Deterministic for fixed batches.
"""
from __future__ import annotations

from typing import Iterable

import torch

from app.engine import evaluate
from data import DataBundle, decode, fixed_batches
from models import Gene, PruningNet, recalibrate_bn


class CandidateEvaluator:
    """Scores genes with the PruningNet's generated weights.

    ``recal_batches`` and ``eval_batches`` are iterated once per candidate (a list, a loader, or a
    ``data.DecodedBatches`` already on the device). ``reduce=True`` is for evaluation batches that
    are this process's shard of the set (PruningNet training's ``--valuate`` under torchrun): the
    counts are summed over all processes. The search shards candidates instead and gives every
    process the whole set, so it leaves ``reduce`` off.
    """

    def __init__(self, pruningnet: PruningNet, recal_batches: Iterable[torch.Tensor],
                 eval_batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                 reduce: bool = False) -> None:
        self.net, self.device, self.reduce = pruningnet, device, reduce
        self.recal, self.eval_batches = recal_batches, eval_batches

    def top1(self, gene: Gene) -> float:
        """Top-1 (%) of ``gene`` on the evaluation batches."""
        with torch.no_grad():
            net = recalibrate_bn(self.net.materialize(gene), (x.to(self.device, non_blocking=True)
                                                              for x in self.recal))
        return evaluate(net, self.eval_batches, self.device, reduce=self.reduce)["top1"]


def search_evaluator(net: PruningNet, data: DataBundle, recal_batches: int, batch_size: int, seed: int,
                     device: torch.device, workers: int = 0, recal_batch_size: int | None = None) -> CandidateEvaluator:
    """The search's scorer: BN recalibrated on ``recal_batches`` fixed training batches (of
    ``recal_batch_size``, default ``batch_size``), top-1 on the whole sub-validation split in batches
    of ``batch_size``; both decoded once and kept for every candidate (``data.cache``)."""
    recal = fixed_batches(data.train_eval, recal_batches, recal_batch_size or batch_size, seed, device, workers)
    return CandidateEvaluator(net, recal, decode(data.subval, batch_size, device, workers), device)
