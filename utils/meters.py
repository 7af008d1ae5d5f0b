"""Top-k accuracy counts."""
from __future__ import annotations

import torch


def correct_topk(output: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1,)) -> list[torch.Tensor]:
    """Number of samples whose target is among the top-k predictions, for each k (tensors on the
    output's device, so that counting forces no device synchronization).

    A class scoring as high as the target counts as ranked above it, so ties are misses: the count
    does not depend on how ``topk`` orders equal scores on one device or another, and a network
    that outputs a constant scores 0, not the share of class 0. A non-finite target score is a miss.
    """
    score = output.gather(1, target.unsqueeze(1))
    above = (output >= score).sum(1) - 1  # other classes scoring at least the target's score
    valid = torch.isfinite(score.squeeze(1))
    return [((above < k) & valid).sum() for k in ks]
