"""Classification metrics: top-k accuracy and cross-entropy as sums, so shards and batches add.

`classification_sums` returns counts rather than percentages: a data-parallel evaluation adds
them across batches and ranks (an all-reduce of one vector) and divides once at the end, which
gives the exact figure over the whole set, with no padding or per-batch averaging error.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["classification_sums", "summarize"]


def classification_sums(logits: torch.Tensor, target: torch.Tensor, k: int = 5) -> torch.Tensor:
    """``float64 [4]``: correct at top-1, correct at top-``min(k, C)``, summed cross-entropy,
    and the number of samples, for ``logits [B, C]`` and integer ``target [B]``."""
    logits = logits.float()
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return torch.tensor(
        [(top[:, 0] == target).sum().item(), (top == target[:, None]).any(1).sum().item(),
         F.cross_entropy(logits, target, reduction="sum").item(), target.numel()],
        dtype=torch.float64,
    )


def summarize(sums: torch.Tensor) -> dict:
    """``{"top1", "top5"}`` in percent and the mean ``"loss"`` from summed `classification_sums`."""
    n = max(sums[3].item(), 1.0)
    return {"top1": 100 * sums[0].item() / n, "top5": 100 * sums[1].item() / n, "loss": sums[2].item() / n}
