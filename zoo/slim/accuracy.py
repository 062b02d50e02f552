"""Accuracy as importance, measured on held-out images: EfficientFormer's accuracy drop per
action (`AccuracyImportance`), and the oracle of the other families' greedy search
(`InheritedAccuracy`, end of this docstring).

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

For EfficientViT and EfficientFormerV2 there is no supernet of paths: the full network of the
search space is trained once, and an architecture's score is its network with the weights it
inherits from it (`zoo.slim.inherit`), BatchNorm re-estimated, on the same validation batches.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.errors import ConfigError
from zoo.slim.search import Action, AlphaImportance, SlotArch

__all__ = ["AccuracyImportance", "InheritedAccuracy", "recalibrate_batchnorm", "evaluate"]


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


def evaluate(model: nn.Module, calib: list[torch.Tensor], val: list[tuple[torch.Tensor, torch.Tensor]],
             metric: str = "loss") -> float:
    """`model` with its BatchNorm statistics re-estimated on `calib`, scored on `val`; higher is
    better: minus the mean cross-entropy (``loss``) or top-1 in percent (``top1``)."""
    model = recalibrate_batchnorm(model, calib)
    loss = correct = count = 0.0
    with torch.no_grad():
        for x, y in val:
            logits = model(x)
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
            count += len(y)
    return -loss / count if metric == "loss" else 100.0 * correct / count


def _check(metric: str, calib, val) -> None:
    if metric not in ("loss", "top1"):
        raise ConfigError(f"metric must be 'loss' or 'top1', not {metric!r}.")
    if not calib or not val:
        raise ConfigError("the accuracy importance needs calibration batches and validation batches.")


class AccuracyImportance(AlphaImportance):
    """Importance as measured accuracy (module docstring).

    supernet: a trained `EfficientFormerSupernet`; calib: training images ``[B, 3, H, W]``
    batches for the BatchNorm statistics; val: ``(images, labels)`` batches.
    """

    def __init__(self, supernet, calib: list[torch.Tensor], val: list[tuple[torch.Tensor, torch.Tensor]],
                 metric: str = "loss"):
        _check(metric, calib, val)
        alpha = AlphaImportance.from_supernet(supernet)
        super().__init__(alpha.p)
        self.supernet, self.calib, self.val, self.metric = supernet, calib, val, metric
        self.cache: dict[SlotArch, float] = {}

    def score(self, arch: SlotArch) -> float:
        """Higher is better: minus the mean validation loss, or top-1 in percent."""
        if arch not in self.cache:
            self.cache[arch] = evaluate(self.supernet.extract(arch.widths, arch.kept), self.calib, self.val, self.metric)
        return self.cache[arch]

    def lost(self, arch: SlotArch, action: Action) -> float:
        return max(0.0, self.score(arch) - self.score(action.apply(arch)))

    def kept(self, arch: SlotArch) -> float:
        return self.score(arch)

    def after(self, kept: float, lost: float, new: SlotArch) -> float:
        return self.score(new)


class InheritedAccuracy:
    """The accuracy oracle of `zoo.slim.greedy`: an architecture of `space` with weights
    inherited from the trained full network (`zoo.slim.inherit`), its BatchNorm statistics
    re-estimated on `calib`, scored on `val` (`evaluate`). Called as ``oracle(arch)``; cached.

    full_state: the full network's state dict (the space's `full_arch`, trained)."""

    def __init__(self, space, full_state: dict, calib: list[torch.Tensor], val: list[tuple[torch.Tensor, torch.Tensor]],
                 metric: str = "loss"):
        from zoo.slim.inherit import inherit_state

        _check(metric, calib, val)
        self.space, self.full, self.calib, self.val, self.metric = space, full_state, calib, val, metric
        self._inherit = inherit_state
        self.cache: dict = {}
        self.inherit(space.full_arch())  # a full state of another space fails here, before any search

    def inherit(self, arch) -> nn.Module:
        """`arch`'s network with its inherited weights (BatchNorm statistics as inherited)."""
        model = self.space.build(arch)
        model.load_state_dict(self._inherit(self.full, model.state_dict(), self.space.block_map(arch)))
        return model

    def __call__(self, arch) -> float:
        if arch not in self.cache:
            self.cache[arch] = evaluate(self.inherit(arch), self.calib, self.val, self.metric)
        return self.cache[arch]
