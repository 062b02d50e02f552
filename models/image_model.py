"""The plumbing every zoo image family shares, written once: timm's interface around a
``stem -> stages -> (norm) -> head`` network.

A family's model class mixes in `ImageModel` and sets, in ``__init__``: ``stem`` (the module
before the stages; EfficientViT calls it ``patch_embed`` and names it in `stem_name`),
``stages`` (an ``nn.Sequential``), ``feature_info`` (timm's list of dicts, one per stage),
``img_size``, ``fixed_input_size``, ``grad_checkpointing``, ``deployed`` and
``pretrained_cfg`` (from `image_cfg`, so a model built without the registry carries the same
cfg the registry would give it). It may define ``norm`` (applied after the last stage) and
``_fold_for_deploy()`` (the family's own step of `reparameterize`).

What it gets:

- `check_input_size` (the one error message for a wrong input side);
- `forward_stages` (the stage loop, with timm's ``checkpoint_seq`` in training when
  gradient checkpointing is on);
- `forward_intermediates` and `prune_intermediate_layers` with timm 1.0's signatures and
  meaning (NCHW only; ``norm`` applies the final norm to the last stage's map only; the token
  output of EfficientFormer's last stage comes back as a map), which timm's
  ``FeatureGetterNet`` uses for ``features_only``;
- `reparameterize` (fold, switch to the deploy kernels, freeze).
"""
from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.models import checkpoint_seq
from timm.models._features import feature_take_indices
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

from zoo.errors import ConfigError
from zoo.models.cpu_kernels import use_deploy_kernels
from zoo.nn import fuse_modules

__all__ = ["ImageModel", "image_cfg"]


def image_cfg(input_spec, in_chans: int, img_size: int, num_classes: int, **extra) -> dict:
    """timm's ``pretrained_cfg`` of an image model, from the family's `InputSpec` (the one its
    cards use) at this model's channels and size. `extra`: ``first_conv``, ``classifier``,
    ``fixed_input_size``, ``pool_size``..."""
    return {
        "input_size": (in_chans, img_size, img_size),
        "mean": input_spec.mean,
        "std": input_spec.std,
        "crop_pct": input_spec.crop_pct,
        "interpolation": input_spec.interpolation,
        "num_classes": num_classes,
        **extra,
    }


class ImageModel:
    """timm's backbone interface and the deploy step shared by the image families (a mixin
    placed before ``nn.Module``; see the module docstring for what a family provides)."""

    stem_name = "stem"
    size_hint = ""  # what the input size fixes, for the error message

    def check_input_size(self, x: torch.Tensor) -> None:
        """Raise `ConfigError` when a fixed-size model gets another input side. Skipped while fx
        traces (shapes are symbols then; the traced graph has no Python checks, as timm's)."""
        if is_fx_symbolic_tracing():
            return
        if self.fixed_input_size and (x.shape[-2] != self.img_size or x.shape[-1] != self.img_size):
            raise ConfigError(
                f"this {type(self).__name__} was built for {self.img_size}x{self.img_size} inputs{self.size_hint}, "
                f"got {tuple(x.shape[-2:])}; build it with img_size={x.shape[-1]}."
            )

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self._modules[self.stem_name](x)

    def forward_stages(self, x: torch.Tensor) -> torch.Tensor:
        """The stages in order; with gradient checkpointing on, in training, through timm's
        ``checkpoint_seq`` (activations recomputed in backward)."""
        if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
            return checkpoint_seq(self.stages, x)
        return self.stages(x)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def _as_map(self, x: torch.Tensor) -> torch.Tensor:
        """A stage output as ``[B, C, H, W]``: tokens ``[B, N, C]`` (EfficientFormer's last
        stage) are laid back on the stage's square grid."""
        if x.dim() == 3:
            side = int(round(x.shape[1] ** 0.5))
            return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)
        return x

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        norm = self._modules.get("norm")
        return x if norm is None else norm(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs as timm 1.0 gives them: ``indices`` None (all), an int (the last n)
        or a list (negative from the end); ``norm`` applies the final norm to the last stage's
        map; ``stop_early`` skips the stages after the last one asked for. Returns the list
        of ``[B, C_i, H_i, W_i]`` maps, or ``(features, maps)`` where ``features`` is what
        `forward_features` returns (normed when the last stage ran)."""
        if output_fmt != "NCHW":
            raise ConfigError(f"output_fmt must be 'NCHW' (got {output_fmt!r}), as in timm for this family.")
        if not torch.jit.is_scripting():
            self.check_input_size(x)
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last = len(self.stages) - 1
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[: max_index + 1]
        x = self.forward_stem(x)
        intermediates = []
        feat_idx = 0
        for feat_idx, stage in enumerate(stages):
            if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
            if feat_idx in take_indices:
                intermediates.append(self._as_map(self._final_norm(x) if norm and feat_idx == last else x))
        if intermediates_only:
            return intermediates
        if feat_idx == last:
            x = self._final_norm(x)
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop what `forward_intermediates(indices)` does not need (timm's meaning): the stages
        after the last index, the final norm when asked or when the last stage goes, and the
        classifier. Returns the absolute indices kept."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        if (prune_norm or prune_end) and "norm" in self._modules:
            self.norm = nn.Identity()
        self.stages = self.stages[: max_index + 1]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self._drop_head()
        return take_indices

    def _drop_head(self) -> None:
        if self.deployed:  # the merged heads of a deploy form cannot be reset, only removed
            self.num_classes = 0
            self.head = nn.Identity()
            if "head_dist" in self._modules:
                self.head_dist = None
            return
        self.reset_classifier(0)

    def _fold_for_deploy(self) -> None:
        """The family's own deploy step, after every ``fuse()`` ran (merge heads...)."""

    @torch.no_grad()
    def reparameterize(self):
        """Fold for inference, in place (each family's docstring says what folds). Returns
        self, in eval mode, frozen, on the deploy kernels (`zoo.models.cpu_kernels`)."""
        self.eval()
        if self.deployed:
            return self
        fuse_modules(self)
        self._fold_for_deploy()
        use_deploy_kernels(self)
        self.requires_grad_(False)
        self.deployed = True
        return self
