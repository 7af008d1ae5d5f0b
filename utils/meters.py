"""Top-k accuracy counts."""
from __future__ import annotations

import torch


def correct_topk(output: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1,)) -> list[torch.Tensor]:
    """Number of samples whose target is among the top-k predictions, for each k (tensors on the
    output's device, so that counting forces no device synchronization)."""
    maxk = min(max(ks), output.shape[1])
    pred = output.topk(maxk, 1).indices
    hit = pred.eq(target.unsqueeze(1))
    return [hit[:, :min(k, maxk)].any(1).sum() for k in ks]
