"""OpenPCDet's VoxelBackBone8x and HeightCompression, on zoo's sparse convolution.

Module names and shapes are OpenPCDet's (``conv_input``, ``conv1`` .. ``conv4``, ``conv_out``;
BatchNorm1d eps 1e-3, momentum 0.01), so its checkpoints' ``backbone_3d.*`` weights load.
`channels` and `bn_momentum` are zoo's additions (OpenPCDet fixes 16/32/64/64, 128 out and
momentum 0.01): the tiny detector narrows the channels and, training for only about a
thousand steps, raises the momentum to PyTorch's 0.1 so that the running statistics it
evaluates with have caught up; the defaults are OpenPCDet's.
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

import torch.nn as nn

from .sparse import SparseConv3d, SparseInverseConv3d, SparseSequential, SparseTensor, SubMConv3d

__all__ = ["VoxelBackBone8x", "HeightCompression", "post_act_block"]


def post_act_block(cin: int, cout: int, kernel_size, indice_key: str, stride=1, padding=0,
                   conv_type: str = "subm", norm_fn=None) -> SparseSequential:
    """conv -> norm -> ReLU, OpenPCDet's block (``subm``, ``spconv`` or ``inverseconv``)."""
    if conv_type == "subm":
        conv = SubMConv3d(cin, cout, kernel_size, bias=False, indice_key=indice_key)
    elif conv_type == "spconv":
        conv = SparseConv3d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False, indice_key=indice_key)
    elif conv_type == "inverseconv":
        conv = SparseInverseConv3d(cin, cout, kernel_size, indice_key=indice_key, bias=False)
    else:
        raise ValueError(f"conv_type must be subm, spconv or inverseconv, not {conv_type!r}")
    return SparseSequential(conv, norm_fn(cout), nn.ReLU())


class VoxelBackBone8x(nn.Module):
    """Four sparse stages at strides 1, 2, 4, 8 (z, y, x), then a (3, 1, 1) stride-(2, 1, 1)
    convolution that halves the height again.

    In: voxel features ``[M, C]``, coordinates ``[M, 4]`` (batch, z, y, x) on the grid
    ``(X, Y, Z)``; the sparse shape is ``(Z + 1, Y, X)`` as in OpenPCDet. Out: the encoded
    `SparseTensor` (stride 8) and the four stages' tensors ``x_conv1`` .. ``x_conv4``.
    """

    def __init__(self, input_channels: int, grid_size: Sequence[int], channels: Sequence[int] = (16, 32, 64, 64),
                 out_channels: int = 128, last_pad: int = 0, bn_momentum: float = 0.01):
        super().__init__()
        c1, c2, c3, c4 = channels
        norm_fn = partial(nn.BatchNorm1d, eps=1e-3, momentum=bn_momentum)
        self.sparse_shape = (int(grid_size[2]) + 1, int(grid_size[1]), int(grid_size[0]))
        self.conv_input = SparseSequential(
            SubMConv3d(input_channels, c1, 3, padding=1, bias=False, indice_key="subm1"), norm_fn(c1), nn.ReLU())
        block = post_act_block
        self.conv1 = SparseSequential(block(c1, c1, 3, norm_fn=norm_fn, padding=1, indice_key="subm1"))
        self.conv2 = SparseSequential(
            block(c1, c2, 3, norm_fn=norm_fn, stride=2, padding=1, indice_key="spconv2", conv_type="spconv"),
            block(c2, c2, 3, norm_fn=norm_fn, padding=1, indice_key="subm2"),
            block(c2, c2, 3, norm_fn=norm_fn, padding=1, indice_key="subm2"))
        self.conv3 = SparseSequential(
            block(c2, c3, 3, norm_fn=norm_fn, stride=2, padding=1, indice_key="spconv3", conv_type="spconv"),
            block(c3, c3, 3, norm_fn=norm_fn, padding=1, indice_key="subm3"),
            block(c3, c3, 3, norm_fn=norm_fn, padding=1, indice_key="subm3"))
        self.conv4 = SparseSequential(
            block(c3, c4, 3, norm_fn=norm_fn, stride=2, padding=(0, 1, 1), indice_key="spconv4", conv_type="spconv"),
            block(c4, c4, 3, norm_fn=norm_fn, padding=1, indice_key="subm4"),
            block(c4, c4, 3, norm_fn=norm_fn, padding=1, indice_key="subm4"))
        self.conv_out = SparseSequential(
            SparseConv3d(c4, out_channels, (3, 1, 1), stride=(2, 1, 1), padding=last_pad, bias=False,
                         indice_key="spconv_down2"),
            norm_fn(out_channels), nn.ReLU())
        self.num_point_features = out_channels
        self.backbone_channels = {"x_conv1": c1, "x_conv2": c2, "x_conv3": c3, "x_conv4": c4}

    def forward(self, batch: dict) -> dict:
        x = SparseTensor(batch["voxel_features"], batch["voxel_coords"].int(), self.sparse_shape, batch["batch_size"])
        x = self.conv_input(x)
        x1 = self.conv1(x)
        x2 = self.conv2(x1)
        x3 = self.conv3(x2)
        x4 = self.conv4(x3)
        batch["encoded_spconv_tensor"] = self.conv_out(x4)
        batch["encoded_spconv_tensor_stride"] = 8
        batch["multi_scale_3d_features"] = {"x_conv1": x1, "x_conv2": x2, "x_conv3": x3, "x_conv4": x4}
        batch["multi_scale_3d_strides"] = {"x_conv1": 1, "x_conv2": 2, "x_conv3": 4, "x_conv4": 8}
        return batch


class HeightCompression(nn.Module):
    """The encoded sparse tensor as a dense BEV map ``[B, C * D, H, W]`` (channels major)."""

    def __init__(self, num_bev_features: int):
        super().__init__()
        self.num_bev_features = num_bev_features

    def forward(self, batch: dict) -> dict:
        dense = batch["encoded_spconv_tensor"].dense()
        n, c, d, h, w = dense.shape
        if c * d != self.num_bev_features:
            raise ValueError(f"the 3D backbone gives {c} x {d} = {c * d} BEV channels; the config says "
                             f"NUM_BEV_FEATURES {self.num_bev_features}")
        batch["spatial_features"] = dense.reshape(n, c * d, h, w)
        batch["spatial_features_stride"] = batch["encoded_spconv_tensor_stride"]
        return batch
