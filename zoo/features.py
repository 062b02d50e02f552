"""``features_only``: a backbone returning a list of feature maps, as timm gives one.

`FeatureNet` is timm's ``FeatureGetterNet`` (it prunes the model to the last stage asked for,
drops the classifier, and calls ``forward_intermediates(x, indices, intermediates_only=True)``;
``feature_info`` is timm's ``FeatureInfo`` over the kept stages) plus what a zoo model keeps:
``pretrained_cfg`` and ``reparameterize()`` to the deploy form. The wrapped model sits under
``model.``, as in timm; weights are loaded into the full model before it is wrapped, so a
classification checkpoint in any supported layout loads with its head dropped. Only the
registry imports this module, and only when ``features_only`` is asked for.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.models._features import FeatureGetterNet

__all__ = ["FeatureNet"]


class FeatureNet(FeatureGetterNet):
    """A zoo image model's feature maps: ``forward(x) -> [ [B, C_i, H_i, W_i], ... ]`` for the
    stages in ``out_indices`` (absolute, ascending); ``feature_info.channels()``,
    ``.reduction()`` and ``.module_name()`` describe them."""

    def __init__(self, model: nn.Module, out_indices):
        super().__init__(model, out_indices=out_indices)
        self.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), "num_classes": 0,
                               "features_only": True, "out_indices": tuple(self.out_indices)}

    @torch.no_grad()
    def reparameterize(self) -> "FeatureNet":
        """The wrapped model's deploy form, in place; returns self in eval mode."""
        self.model.reparameterize()
        return self.eval()
