"""Candidate evaluator: the top-1 of a gene with PruningNet-generated weights.

For each gene: materialize the PrunedNet once (weights generated once), recalibrate its BatchNorm
statistics exactly (cumulative average) on a fixed set of training batches, then score top-1 on
the evaluation batches in inference mode. Deterministic for fixed batches.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

from models import Gene, PruningNet, recalibrate_bn
from utils.engine import evaluate


class CandidateEvaluator:
    def __init__(self, pruningnet: PruningNet, recal_batches: Sequence[torch.Tensor],
                 eval_batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> None:
        self.net, self.device = pruningnet, device
        self.recal = [x.to(device, non_blocking=True) for x in recal_batches]
        self.eval_batches = eval_batches

    def top1(self, gene: Gene) -> float:
        """Top-1 (%) of ``gene`` on the evaluation batches."""
        with torch.no_grad():
            net = recalibrate_bn(self.net.materialize(gene), self.recal)
        return evaluate(net, self.eval_batches, self.device)["top1"]
