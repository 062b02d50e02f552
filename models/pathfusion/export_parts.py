"""The dense parts of a detector as plain tensor-in, tensors-out modules, for ONNX export.

A voxel detector is sparse stages between dense ones. What exports today:

- ``bev_head``: the BEV backbone and the CenterHead's convolutions, ``spatial_features
  [B, C, H, W]`` (the height-compressed sparse output) -> the head's maps, per head
  ``center, center_z, dim, rot`` (its ``HEAD_ORDER``) then ``hm`` (logits); decoding (peaks,
  boxes, NMS) stays in Python (`CenterHead.decode`);
- ``image_branch`` (camera-fusion detectors): ``images [B, 3, H, W]`` in [0, 1] -> one feature map
  per fused level, reduced.

Voxelization and the sparse backbone do not export: their rule books come from data-dependent
searches and unique sites (and a focal layer chooses its sites from its own predictions), which
the exporters cannot trace into a fixed graph; feeding the index tables in as graph inputs is
the route, and it is not built yet.
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["BevHeadPart", "ImageBranchPart", "export_parts", "NOT_EXPORTED"]

NOT_EXPORTED = ("voxelization and the sparse backbone stay in PyTorch: their rule books come from data-dependent "
                "searches and unique sites (a focal layer also chooses its sites from its own predictions), which "
                "the exporters cannot trace into a fixed graph; index tables as graph inputs are the route, not built yet")


class BevHeadPart(nn.Module):
    """``spatial_features [B, C, H, W]`` -> the CenterHead's maps (see the module docstring)."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.backbone_2d = detector.backbone_2d
        self.dense_head = detector.dense_head
        self.output_names = [f"head{i}_{k}" for i in range(len(self.dense_head.heads_list))
                             for k in [*self.dense_head.head_order, "hm"]]

    def export_wrapper(self, input_shape=None) -> dict:
        shape = tuple(input_shape or self.input_shape)
        shape = shape if len(shape) == 4 else (1, *shape)
        return {"module": self, "inputs": (torch.randn(shape, generator=torch.Generator().manual_seed(0)),),
                "input_names": ["spatial_features"], "output_names": self.output_names}

    def forward(self, spatial_features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.backbone_2d({"spatial_features": spatial_features})["spatial_features_2d"]
        x = self.dense_head.shared_conv(x)
        out = []
        for head in self.dense_head.heads_list:
            maps = head(x)
            out += [maps[k] for k in [*self.dense_head.head_order, "hm"]]
        return tuple(out)


class ImageBranchPart(nn.Module):
    """``images [B, 3, H, W]`` -> the image branch's levels, a tuple."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.branch = detector.backbone_3d.semseg

    def export_wrapper(self, input_shape=None) -> dict:
        shape = tuple(input_shape or self.input_shape)
        shape = shape if len(shape) == 4 else (1, *shape)
        return {"module": self, "inputs": (torch.rand(shape, generator=torch.Generator().manual_seed(0)),),
                "input_names": ["images"], "output_names": [f"level{i}" for i in range(len(self.branch.channels))]}

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.branch(images))


def export_parts(detector: nn.Module, image_size: tuple[int, int] = (375, 1242)) -> dict[str, tuple[nn.Module, tuple]]:
    """``{part: (module, input_shape (C, H, W))}`` of a `LidarDetector` or `FusionDetector`;
    the image branch's input at `image_size`."""
    def down(n: int) -> int:  # a 3-wide, stride-2, padding-1 convolution
        return (n + 2 - 3) // 2 + 1

    grid = detector.grid_size
    h, w = down(down(down(int(grid[1])))), down(down(down(int(grid[0]))))
    c = detector.map_to_bev_module.num_bev_features
    bev = BevHeadPart(detector).eval()
    bev.input_shape = (c, h, w)
    parts = {"bev_head": (bev, bev.input_shape)}
    if hasattr(detector.backbone_3d, "semseg"):
        img = ImageBranchPart(detector).eval()
        img.input_shape = (3, *image_size)
        parts["image_branch"] = (img, img.input_shape)
    return parts
