"""Running averages and top-k accuracy."""
from __future__ import annotations

import torch


class AverageMeter:
    """Sum and count of a metric, weighted by batch size."""

    def __init__(self) -> None:
        self.sum, self.count = 0.0, 0

    def update(self, value: float, n: int = 1) -> None:
        self.sum += value * n
        self.count += n

    @property
    def avg(self) -> float:
        return self.sum / max(self.count, 1)


def correct_topk(output: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1,)) -> list[int]:
    """Number of samples whose target is among the top-k predictions, for each k."""
    maxk = min(max(ks), output.shape[1])
    pred = output.topk(maxk, 1).indices
    hit = pred.eq(target.unsqueeze(1))
    return [int(hit[:, :min(k, maxk)].any(1).sum()) for k in ks]
