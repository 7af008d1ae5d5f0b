"""Candidate evaluator: the top-1 of a gene with PruningNet-generated weights.

For each gene: materialize the PrunedNet once (weights generated once), recalibrate its BatchNorm
statistics exactly (cumulative average) on a fixed set of training batches, then score top-1 on
the evaluation batches in inference mode. Deterministic for fixed batches.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

from data import DataBundle, fixed_batches, make_loader
from models import Gene, PruningNet, recalibrate_bn
from utils.engine import evaluate


class CandidateEvaluator:
    """Scores genes with the PruningNet's generated weights.

    ``reduce=True`` is for evaluation batches that are this process's shard of the set (PruningNet
    training's ``--valuate`` under torchrun): the counts are summed over all processes. The search
    shards candidates instead and gives every process the whole set, so it leaves ``reduce`` off.
    """

    def __init__(self, pruningnet: PruningNet, recal_batches: Sequence[torch.Tensor],
                 eval_batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                 reduce: bool = False) -> None:
        self.net, self.device, self.reduce = pruningnet, device, reduce
        self.recal = [x.to(device, non_blocking=True) for x in recal_batches]
        self.eval_batches = eval_batches

    def top1(self, gene: Gene) -> float:
        """Top-1 (%) of ``gene`` on the evaluation batches."""
        with torch.no_grad():
            net = recalibrate_bn(self.net.materialize(gene), self.recal)
        return evaluate(net, self.eval_batches, self.device, reduce=self.reduce)["top1"]


def cached_batches(loader, device: torch.device, max_bytes: int = 4 * 2 ** 30) -> list | Iterable:
    """The loader's batches, held on ``device`` when the whole set fits in ``max_bytes``.

    Scoring runs every candidate over the same images; caching them once removes decoding and
    host-to-device copies from the per-candidate time. Larger sets (ImageNet's 50,000-image
    sub-validation split at 224px is 30 GB as floats) stream from the loader instead.
    """
    x, _ = next(iter(loader))
    if x[0].numel() * x.element_size() * len(loader.dataset) > max_bytes:
        return loader
    return [(x.to(device), y.to(device)) for x, y in loader]


def search_evaluator(net: PruningNet, data: DataBundle, recal_batches: int, batch_size: int, seed: int,
                     device: torch.device, workers: int = 0) -> CandidateEvaluator:
    """The search's scorer: BN recalibrated on ``recal_batches`` fixed training batches, top-1 on the
    whole sub-validation split (cached on ``device`` when it fits)."""
    recal = fixed_batches(data.train_eval, recal_batches, batch_size, seed)
    return CandidateEvaluator(net, recal, cached_batches(make_loader(data.subval, batch_size, False, workers), device),
                              device)
