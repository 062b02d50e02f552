"""Focals Conv's focal sparse convolution (Chen et al., CVPR 2022; dvlab-research/FocalsConv),
on zoo's sparse tensors, with its module names (``conv``, ``bn1``, ``conv_imp``,
``conv_enlarge``) so its checkpoints load.

A submanifold convolution ``conv_imp`` predicts, per active site, ``K = k^3`` importances (a
sigmoid each): the last is the site's own, the first ``K - 1`` its kernel's neighbours (the
offsets ``(dz, dy, dx)`` in ``-k//2..k//2`` row-major, the centre left out). Per sample, the
sites of highest importance (the top ``threshold`` fraction with ``topk``, else those above
``threshold``) are foreground: each also activates the neighbours whose importance is at least
``threshold``, as new sites with zero features. The foreground sites' features are multiplied
by their importance (1 for the site itself; a site reached more than once takes the mean, as
the official code does); the background sites pass unchanged; where sites coincide their
features add. A submanifold ``conv`` on the new site set, BatchNorm, ReLU follow. With
``use_img`` the importance is predicted from the voxel features concatenated with the image
features lifted onto the sites (`lifting.lift`), and the lifted image features are added to
the output before the norm (Focals Conv-F, the multimodal layer).

Training adds the official auxiliary loss: a focal loss (gamma 2) between the site importance
and whether the site's corner lies in a ground-truth box, computed as the official code does
it (a softmax over ``[1 - m, m]``, the mean over both entries of every site).

Where this differs from the official code, on purpose: the new sites' bounds are
``0 <= index < shape`` (the official check ``index > 0`` drops the first row of every axis);
coinciding sites are merged by their exact coordinates (the official key, built from the
largest index present, can merge distinct sites); ties in the top-k order are broken by the
site order (a stable sort).
"""
from __future__ import annotations

import itertools
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.boxes import points_in_boxes

from .lifting import site_positions
from .sparse import SparseModule, SparseSequential, SparseTensor, SubMConv3d, unique_sites

__all__ = ["FocalSparseConv", "focal_importance_loss"]


def focal_importance_loss(importance: torch.Tensor, target: torch.Tensor, gamma: float = 2.0,
                          eps: float = 1e-7) -> torch.Tensor:
    """The official loss: ``importance [N]`` in (0, 1) against ``target [N]`` bool, as a two-class
    focal loss on ``softmax([1 - m, m])``, averaged over ``N x 2`` entries."""
    if importance.numel() == 0:
        return importance.sum()
    p = F.softmax(torch.stack([1 - importance, importance], dim=1), dim=1).clamp(eps, 1 - eps)
    y = F.one_hot(target.long(), 2).to(p.dtype)
    return (-y * torch.log(p) * (1 - p) ** gamma).mean()


class FocalSparseConv(SparseModule):
    """``forward(x, gt_boxes=None, lift_fn=None) -> (SparseTensor, aux_loss)``.

    `lift_fn(sparse) -> [N, C_img]` returns the image features of a tensor's sites (zeros
    outside the image), needed with ``use_img``. `gt_boxes` ``[B, M, >=7]`` (zero rows padding)
    gives the auxiliary loss in training. `voxel_size` ``(z, y, x)`` and `point_range_min`
    ``(z, y, x)`` place the sites for it, as the official ``voxel_size`` and
    ``point_cloud_range[:3]`` (given in that order there too)."""

    def __init__(self, inplanes: int, planes: int, voxel_stride: int, norm_fn: Callable[[int], nn.Module],
                 indice_key: str, image_channel: int = 3, kernel_size: int = 3, mask_multi: bool = False,
                 use_img: bool = False, topk: bool = True, threshold: float = 0.5, skip_mask_kernel: bool = False,
                 enlarge_voxel_channels: int = -1, voxel_size: Sequence[float] = (0.1, 0.05, 0.05),
                 point_range_min: Sequence[float] = (-3.0, -40.0, 0.0), fuse_sum: bool = True):
        super().__init__()
        self.conv = SubMConv3d(inplanes, planes, kernel_size, bias=False, indice_key=indice_key)
        self.bn1 = norm_fn(planes if fuse_sum else 2 * planes)
        self.relu = nn.ReLU()
        voxel_channel = enlarge_voxel_channels if enlarge_voxel_channels > 0 else inplanes
        in_channels = image_channel + voxel_channel if use_img else voxel_channel
        self.conv_enlarge = SparseSequential(
            SubMConv3d(inplanes, enlarge_voxel_channels, 3, bias=False, indice_key=indice_key + "_enlarge"),
            norm_fn(enlarge_voxel_channels), nn.ReLU()) if enlarge_voxel_channels > 0 else None
        self.conv_imp = SubMConv3d(in_channels, kernel_size ** 3, 3, bias=False, indice_key=indice_key + "_imp")
        step = kernel_size // 2
        offsets = [o for o in itertools.product(range(-step, step + 1), repeat=3) if o != (0, 0, 0)]
        self.register_buffer("kernel_offsets", torch.tensor(offsets, dtype=torch.int32), persistent=False)
        self.voxel_stride = voxel_stride
        self.topk, self.threshold = topk, threshold
        self.mask_multi, self.skip_mask_kernel = mask_multi, skip_mask_kernel
        self.use_img, self.fuse_sum = use_img, fuse_sum
        self.voxel_size = tuple(float(v) for v in voxel_size)
        self.point_range_min = tuple(float(v) for v in point_range_min)

    def _split(self, x: SparseTensor, imps: torch.Tensor):
        """Foreground sites with their dilation, and the background: ``(fore_indices, fore_features,
        back_indices, back_features)`` over the whole batch."""
        site_imp = imps[:, -1].sigmoid()
        kernel_imp = imps[:, :-1].sigmoid()
        feats = x.features * site_imp[:, None] if self.mask_multi else x.features
        fore_rows, back_rows = [], []
        for b in range(x.batch_size):
            rows = torch.nonzero(x.indices[:, 0] == b).squeeze(1)
            if self.topk:
                order = torch.sort(site_imp[rows], descending=True, stable=True).indices
                n_fore = int(len(rows) * self.threshold)
                fore_rows.append(rows[order[:n_fore]])
                back_rows.append(rows[order[n_fore:]])
            else:
                keep = site_imp[rows] > self.threshold
                fore_rows.append(rows[keep])
                back_rows.append(rows[~keep])
        fore, back = torch.cat(fore_rows), torch.cat(back_rows)
        # dilation: the neighbours each foreground site finds important
        hit = kernel_imp[fore] >= self.threshold  # [F, K - 1]
        f_idx, k_idx = hit.nonzero(as_tuple=True)
        new = x.indices[fore[f_idx]].clone()
        new[:, 1:] += self.kernel_offsets[k_idx]
        shape = torch.tensor(x.spatial_shape, device=new.device)
        inside = ((new[:, 1:] >= 0) & (new[:, 1:] < shape)).all(1)
        new, new_mask = new[inside], kernel_imp[fore[f_idx[inside]], k_idx[inside]]
        idx = torch.cat([x.indices[fore], new])
        f = torch.cat([feats[fore], feats.new_zeros((len(new), feats.shape[1]))])
        mask = torch.cat([torch.ones(len(fore), dtype=feats.dtype, device=feats.device), new_mask])
        idx, inv = unique_sites(idx, x.spatial_shape)
        f = f.new_zeros((len(idx), f.shape[1])).index_add(0, inv, f)
        counts = torch.bincount(inv, minlength=len(idx)).to(mask.dtype)
        mask = mask.new_zeros(len(idx)).index_add(0, inv, mask) / counts
        if not self.skip_mask_kernel:
            f = f * mask[:, None]
        return idx, f, x.indices[back], feats[back]

    def forward(self, x: SparseTensor, gt_boxes: torch.Tensor | None = None,
                lift_fn: Callable[[SparseTensor], torch.Tensor] | None = None):
        if self.use_img:
            if lift_fn is None:
                raise ValueError("a multimodal FocalSparseConv needs the image features (lift_fn)")
            predict = x.replace_feature(torch.cat([lift_fn(x), x.features], dim=1))
        else:
            predict = self.conv_enlarge(x) if self.conv_enlarge is not None else x
        imps = self.conv_imp(predict).features
        fore_idx, fore_f, back_idx, back_f = self._split(x, imps)
        idx, inv = unique_sites(torch.cat([fore_idx, back_idx]), x.spatial_shape)
        feats = torch.cat([fore_f, back_f])
        feats = feats.new_zeros((len(idx), feats.shape[1])).index_add(0, inv, feats)
        out = self.conv(SparseTensor(feats, idx, x.spatial_shape, x.batch_size, x.rules))
        if self.use_img:
            img = lift_fn(out)
            out = out.replace_feature(out.features + img if self.fuse_sum else torch.cat([img, out.features], 1))
        out = out.replace_feature(self.relu(self.bn1(out.features)))
        loss = imps.new_zeros(())
        if self.training and gt_boxes is not None:
            # the sites' corners at this stride, as the official code places them
            corners = site_positions(x.indices, self.voxel_stride, self.voxel_size[::-1], self.point_range_min[::-1],
                                     "corner")
            target = torch.zeros(len(x.indices), dtype=torch.bool, device=imps.device)
            for b in range(x.batch_size):
                rows = torch.nonzero(x.indices[:, 0] == b).squeeze(1)
                boxes = gt_boxes[b, :, :7]
                boxes = boxes[boxes[:, 3:6].abs().sum(1) > 0]
                target[rows] = points_in_boxes(corners[rows], boxes.to(corners.dtype)).any(1)
            loss = focal_importance_loss(imps[:, -1].sigmoid(), target)
        return out, loss

