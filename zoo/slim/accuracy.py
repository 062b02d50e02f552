"""The paper's other importance: the accuracy each action costs, measured on held-out images.

EfficientFormer's search "evaluates the accuracy drop of each action" (section 4.2). Here an
architecture's accuracy is that of the slimmed network with the weights it inherits from the
supernet (`EfficientFormerSupernet.extract`), after its BatchNorm statistics are re-estimated
on a few training batches (the supernet's statistics are those of the mixture, not of the
slimmed network; re-estimating them is the usual one-shot practice), measured on a validation
loader. `lost(arch, action)` is the drop from `arch` to ``action.apply(arch)``; which slot and
which stage an action touches still comes from the alphas, as in the paper (only the price
changes). Evaluations are cached per architecture.

``metric="loss"`` (default) uses the validation cross-entropy, which moves with every action
on a small validation set, where top-1 often does not (a zero drop ranks actions by latency
alone); ``metric="top1"`` is the paper's accuracy.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.errors import ConfigError
from zoo.slim.search import Action, AlphaImportance, SlotArch

__all__ = ["AccuracyImportance", "recalibrate_batchnorm"]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches) -> nn.Module:
    """Re-estimate every BatchNorm's running mean and variance from `batches` (a cumulative
    average over them), leaving the weights alone; returns `model` in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for x in batches:
        model(x)
    return model.eval()


class AccuracyImportance(AlphaImportance):
    """Importance as measured accuracy (module docstring).

    supernet: a trained `EfficientFormerSupernet`; calib: training images ``[B, 3, H, W]``
    batches for the BatchNorm statistics; val: ``(images, labels)`` batches.
    """

    def __init__(self, supernet, calib: list[torch.Tensor], val: list[tuple[torch.Tensor, torch.Tensor]],
                 metric: str = "loss"):
        if metric not in ("loss", "top1"):
            raise ConfigError(f"metric must be 'loss' or 'top1', not {metric!r}.")
        if not calib or not val:
            raise ConfigError("the accuracy importance needs calibration batches and validation batches.")
        alpha = AlphaImportance.from_supernet(supernet)
        super().__init__(alpha.p)
        self.supernet, self.calib, self.val, self.metric = supernet, calib, val, metric
        self.cache: dict[SlotArch, float] = {}

    def score(self, arch: SlotArch) -> float:
        """Higher is better: minus the mean validation loss, or top-1 in percent."""
        if arch not in self.cache:
            model = recalibrate_batchnorm(self.supernet.extract(arch.widths, arch.kept), self.calib)
            loss = correct = count = 0.0
            with torch.no_grad():
                for x, y in self.val:
                    logits = model(x)
                    loss += F.cross_entropy(logits, y, reduction="sum").item()
                    correct += (logits.argmax(1) == y).sum().item()
                    count += len(y)
            self.cache[arch] = -loss / count if self.metric == "loss" else 100.0 * correct / count
        return self.cache[arch]

    def lost(self, arch: SlotArch, action: Action) -> float:
        return max(0.0, self.score(arch) - self.score(action.apply(arch)))

    def kept(self, arch: SlotArch) -> float:
        return self.score(arch)

    def after(self, kept: float, lost: float, new: SlotArch) -> float:
        return self.score(new)
