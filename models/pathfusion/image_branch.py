"""Image branches for camera fusion: feature maps of the batch image, one per fused level.

`DeepLabV3Branch` is Focals Conv-F's branch (its ``PyramidFeat2D`` / ``SemDeepLabV3``):
torchvision's DeepLabV3-ResNet-50 backbone run up to the last layer asked for (Focals Conv uses
``layer1`` and runs, and stores, the whole network; the layers after the last one asked for,
and the segmentation head, are not built here), each output reduced by a 1x1 conv-BN-ReLU
(256 -> 16 for ``layer1``). Module names are Focals Conv's (``ifn.model.backbone.*``,
``reduce_blocks.<i>.{conv,bn}``), so its checkpoints and torchvision's COCO DeepLabV3 weights
load; built with ``weights=None, weights_backbone=None`` (torchvision would download).

`ZooImageBranch` is any zoo image backbone through ``features_only`` (EfficientViT,
EfficientFormer), each level reduced the same way.

Both take ``images [B, 3, H, W]`` float in [0, 1] and normalize them with ImageNet's mean and
std (Focals Conv does when it loads pretrained weights; a zoo backbone with its own
``pretrained_cfg``), and return ``[B, C_i, H_i, W_i]`` per level; ``channels`` and
``reductions`` describe the levels.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.errors import ConfigError, WeightsError
from zoo.hub import read_state_dict
from zoo.registry import create_model, model_card

__all__ = ["BasicBlock2D", "DeepLabV3Branch", "ZooImageBranch", "build_image_branch"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESNET_LAYERS = ("layer1", "layer2", "layer3", "layer4")
RESNET_CHANNELS = {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048}
# DeepLabV3 dilates layer3 and layer4 instead of striding them
RESNET_REDUCTIONS = {"layer1": 4, "layer2": 8, "layer3": 8, "layer4": 8}


class BasicBlock2D(nn.Module):
    """Conv2d -> BatchNorm2d -> ReLU (Focals Conv's channel-reduce block; ``conv``, ``bn``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, bias: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class _Normalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x):
        return (x - self.mean) / self.std


def _reduce_blocks(in_channels: Sequence[int], out_channels: Sequence[int] | None) -> nn.ModuleList | None:
    if out_channels is None:
        return None
    if len(out_channels) != len(in_channels):
        raise ConfigError(f"{len(out_channels)} reduced widths for {len(in_channels)} image levels")
    return nn.ModuleList(BasicBlock2D(c, o) for c, o in zip(in_channels, out_channels))


class DeepLabV3Branch(nn.Module):
    """Focals Conv-F's image branch; `layers` a subset of ``layer1..layer4`` in order,
    `out_channels` the reduced widths (None: no reduction), `weights` a local file of
    torchvision's DeepLabV3-ResNet-50 (``backbone.*`` keys) or of this branch."""

    def __init__(self, layers: Sequence[str] = ("layer1",), out_channels: Sequence[int] | None = (16,),
                 weights: str | os.PathLike | None = None):
        super().__init__()
        from torchvision.models import resnet50

        layers = list(layers)
        if not layers or any(l not in RESNET_LAYERS for l in layers) or layers != sorted(layers):
            raise ConfigError(f"image layers must be some of {RESNET_LAYERS} in order, not {layers}")
        self.layers = layers
        last = RESNET_LAYERS.index(layers[-1])
        net = resnet50(weights=None, replace_stride_with_dilation=[False, True, True])
        kept = ["conv1", "bn1", "relu", "maxpool", *RESNET_LAYERS[: last + 1]]
        self.ifn = nn.Module()
        self.ifn.model = nn.Module()
        self.ifn.model.backbone = nn.ModuleDict({n: getattr(net, n) for n in kept})
        self.normalize = _Normalize(IMAGENET_MEAN, IMAGENET_STD)
        self.reduce_blocks = _reduce_blocks([RESNET_CHANNELS[l] for l in layers], out_channels)
        self.channels = list(out_channels) if out_channels is not None else [RESNET_CHANNELS[l] for l in layers]
        self.reductions = [RESNET_REDUCTIONS[l] for l in layers]
        if weights is not None:
            self.load_weights(weights)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = self.normalize(images)
        out = []
        for name, m in self.ifn.model.backbone.items():
            x = m(x)
            if name in self.layers:
                out.append(x)
        if self.reduce_blocks is not None:
            out = [blk(f) for blk, f in zip(self.reduce_blocks, out)]
        return out

    def load_weights(self, path: str | os.PathLike) -> list[str]:
        """Load a local torchvision DeepLabV3-ResNet-50 checkpoint (``backbone.*``, ``classifier.*``)
        or this branch's own state dict; returns the keys left unused (the head and the layers
        after the last one kept). Nothing is downloaded."""
        sd = read_state_dict(path)
        if any(k.startswith("backbone.") for k in sd):
            sd = {"ifn.model." + k: v for k, v in sd.items()}
        own = self.state_dict()
        unused = [k for k in sd if k not in own]
        missing = [k for k in own if k not in sd and not k.startswith("reduce_blocks.")]
        if missing:
            raise WeightsError(f"{path}: {len(missing)} image-branch weights are missing (first: {missing[0]}); "
                               "give torchvision's deeplabv3_resnet50 checkpoint or this branch's state dict.")
        self.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
        return unused


class ZooImageBranch(nn.Module):
    """A zoo image backbone through ``features_only`` (`out_indices` its stages), each level
    reduced to `out_channels` (None: as the backbone gives them). `pretrained` as
    `zoo.create_model` takes it (a local file here; nothing downloads in tests).

    EfficientViT's windows and EfficientFormer's attention grids are fixed square at build, so
    the batch image is resized (bilinear, antialiased) to ``img_size x img_size`` first: the
    feature maps still span the whole image, which is all lifting needs (a choice; KITTI's
    1242 x 375 frames are squeezed about 3:1 horizontally)."""

    def __init__(self, name: str, out_indices: Sequence[int] | None = None, out_channels: Sequence[int] | None = None,
                 pretrained: bool | str | os.PathLike = False, img_size: int = 224):
        super().__init__()
        card = model_card(name)
        if card.feature_out_indices is None:
            raise ConfigError(f"{name} is a {card.task} model without features_only support; an image branch "
                              "needs a backbone that returns feature maps (e.g. efficientvit_m0, efficientformer_l1), "
                              "or Focals Conv's DeepLabV3 branch (IMAGE_BRANCH NAME: deeplabv3_resnet50).")
        self.img_size = int(img_size)
        self.backbone = create_model(name, pretrained=pretrained, features_only=True, img_size=self.img_size,
                                     out_indices=None if out_indices is None else tuple(out_indices))
        info = self.backbone.feature_info
        cfg = getattr(self.backbone, "pretrained_cfg", {})
        self.normalize = _Normalize(cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD))
        self.reduce_blocks = _reduce_blocks(info.channels(), out_channels)
        self.channels = list(out_channels) if out_channels is not None else list(info.channels())
        self.reductions = list(info.reduction())

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = self.normalize(images)
        if tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False,
                              antialias=True)
        out = self.backbone(x)
        if self.reduce_blocks is not None:
            out = [blk(f) for blk, f in zip(self.reduce_blocks, out)]
        return out


def build_image_branch(cfg: dict) -> nn.Module:
    """An image branch from a config: ``NAME`` ``deeplabv3_resnet50`` (``LAYERS``,
    ``OUT_CHANNELS``, ``WEIGHTS``) or a zoo backbone name (``OUT_INDICES``, ``OUT_CHANNELS``,
    ``WEIGHTS``, ``IMG_SIZE``)."""
    name = cfg.get("NAME", "deeplabv3_resnet50")
    if name == "deeplabv3_resnet50":
        return DeepLabV3Branch(cfg.get("LAYERS", ["layer1"]), cfg.get("OUT_CHANNELS", [16]), cfg.get("WEIGHTS"))
    return ZooImageBranch(name, cfg.get("OUT_INDICES"), cfg.get("OUT_CHANNELS"), cfg.get("WEIGHTS") or False,
                          cfg.get("IMG_SIZE", 224))
