"""PVCNN2, the velocity network of PSF (and the noise network of PVD), in plain PyTorch.

Same architecture, module names and state-dict keys as ``PVCNN2`` in PVD's
``model/pvcnn_generation.py`` (which PSF's ``train_flow.py`` reuses), so their checkpoints
load as they are (after stripping PSF's ``model.`` / DDP's ``module.`` prefixes). Point ops
are the pure-PyTorch ones of :mod:`.point_ops`.

Layout: four set-abstraction (SA) stages (PVConv blocks at voxel resolutions 32/16/8, then
farthest-point sampling to 1024/256/64/16 centres with ball-query grouping and a shared
MLP), global self-attention at the bottleneck, four feature-propagation (FP) stages back up
(3-NN interpolation, shared MLP, PVConv blocks), and a point-wise classifier to 3 channels.
A 64-d sinusoidal time embedding (through a small MLP) is concatenated to the features at
the input of every stage after the first. GroupNorm(8) and Swish throughout; squeeze-excite
(ReLU) after each PVConv's voxel branch.

Quirks of the original kept on purpose (they decide the weights' shapes):

- In SA stages after the first, only the **first** of ``num_blocks`` PVConv blocks is built
  (the loop's ``elif k == 0`` skips the others): stages 2 and 3 have 1 PVConv, not 3.
- Voxel attention is used in SA stage 2's PVConv only; the FP stages' attention test
  compares with the length of a list being built and is never true.
- Attention logits are ``q^T k`` without the ``1/sqrt(C)`` scale.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import point_ops as P

__all__ = ["PVCNN2Config", "PVCNN2", "PVD_SA_BLOCKS", "PVD_FP_BLOCKS"]

# (conv: (out_channels, num_blocks, voxel_resolution) or None,
#  sa: (num_centers, radius, num_neighbors, mlp_channels))
PVD_SA_BLOCKS = (
    ((32, 2, 32), (1024, 0.1, 32, (32, 64))),
    ((64, 3, 16), (256, 0.2, 32, (64, 128))),
    ((128, 3, 8), (64, 0.4, 32, (128, 256))),
    (None, (16, 0.8, 32, (256, 256, 512))),
)
# (fp mlp channels, conv: (out_channels, num_blocks, voxel_resolution))
PVD_FP_BLOCKS = (
    ((256, 256), (256, 3, 8)),
    ((256, 256), (256, 3, 8)),
    ((256, 128), (128, 2, 16)),
    ((128, 128, 64), (64, 2, 32)),
)


@dataclass(frozen=True)
class PVCNN2Config:
    """Every architecture choice of PVCNN2 (PVD/PSF defaults)."""

    num_points: int = 2048
    out_channels: int = 3
    extra_feature_channels: int = 0
    embed_dim: int = 64
    use_att: bool = True
    dropout: float = 0.1
    width_multiplier: float = 1.0
    voxel_resolution_multiplier: float = 1.0
    sa_blocks: tuple = PVD_SA_BLOCKS
    fp_blocks: tuple = PVD_FP_BLOCKS
    # PSF feeds the network t * 999 for t in [0, 1] (``sample_pairs`` in train_flow.py).
    time_scale: float = 999.0
    # "ball": PVCNN's ball query (the papers); "knn": k nearest neighbours instead.
    grouping: str = "ball"
    extra: dict = field(default_factory=dict)

    def replace(self, **kw) -> "PVCNN2Config":
        return replace(self, **kw)


class Swish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters and keys) that normalizes ``[B,C,*spatial]`` as ``[B,C,L]``.

    Same statistics (each group's channels over all positions); flattening first keeps the
    exported graph at rank 4, where GroupNorm over a voxel grid ``[B,C,r,r,r]`` would reshape
    to rank 6 and CoreML allows at most rank 5.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() <= 3:
            return super().forward(x)
        return F.group_norm(x.flatten(2), self.num_groups, self.weight, self.bias, self.eps).view_as(x)


class SharedMLP(nn.Module):
    """Point-wise (1x1) convs, each followed by GroupNorm(8) and Swish; passes tuples through."""

    def __init__(self, in_channels: int, out_channels, dim: int = 1):
        super().__init__()
        conv = nn.Conv1d if dim == 1 else nn.Conv2d
        layers = []
        for oc in out_channels if isinstance(out_channels, (list, tuple)) else [out_channels]:
            layers += [conv(in_channels, oc, 1), GroupNorm(8, oc), Swish()]
            in_channels = oc
        self.layers = nn.Sequential(*layers)

    def forward(self, inputs):
        if isinstance(inputs, (list, tuple)):
            return (self.layers(inputs[0]), *inputs[1:])
        return self.layers(inputs)


class SE3d(nn.Module):
    """Squeeze-excite over a voxel grid ``[B,C,r,r,r]``."""

    def __init__(self, channels: int, reduction: int = 8, use_relu: bool = False):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(channels, channels // reduction, bias=False),
                                nn.ReLU(True) if use_relu else Swish(),
                                nn.Linear(channels // reduction, channels, bias=False), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc(x.mean((2, 3, 4))).view(x.shape[0], x.shape[1], 1, 1, 1)


class Attention(nn.Module):
    """Self-attention over all voxels (``dims=3``) or points (``dims=1``), residual, GN + Swish."""

    def __init__(self, channels: int, num_groups: int = 8, dims: int = 3):
        super().__init__()
        conv = nn.Conv3d if dims == 3 else nn.Conv1d
        self.q, self.k, self.v, self.out = (conv(channels, channels, 1) for _ in range(4))
        self.norm = GroupNorm(num_groups, channels)
        self.nonlin = Swish()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        q = self.q(x).reshape(b, c, -1)
        k = self.k(x).reshape(b, c, -1)
        v = self.v(x).reshape(b, c, -1)
        w = torch.softmax(q.transpose(1, 2) @ k, dim=-1)  # [B,L,L]; no 1/sqrt(C), as the original
        h = (v @ w.transpose(1, 2)).reshape(x.shape)
        return self.nonlin(self.norm(self.out(h) + x))


class PVConv(nn.Module):
    """Point-voxel convolution: voxel branch (2x Conv3d 3x3x3, GN, Swish/attention, SE) + point MLP."""

    def __init__(self, in_channels: int, out_channels: int, resolution: int, attention: bool = False,
                 dropout: float | None = 0.1, with_se: bool = True, with_se_relu: bool = True):
        super().__init__()
        self.resolution = resolution
        layers = [nn.Conv3d(in_channels, out_channels, 3, padding=1), GroupNorm(8, out_channels), Swish()]
        layers += [nn.Dropout(dropout)] if dropout is not None else []
        layers += [nn.Conv3d(out_channels, out_channels, 3, padding=1), GroupNorm(8, out_channels),
                   Attention(out_channels, 8) if attention else Swish()]
        if with_se:
            layers.append(SE3d(out_channels, use_relu=with_se_relu))
        self.voxel_layers = nn.Sequential(*layers)
        self.point_features = SharedMLP(in_channels, out_channels)

    def forward(self, inputs):
        features, coords, temb = inputs
        r = self.resolution
        vcoords = P.normalize_voxel_coords(coords, r)
        grid = self.voxel_layers(P.avg_voxelize(features, vcoords, r))
        fused = P.trilinear_devoxelize(grid, vcoords, r) + self.point_features(features)
        return fused, coords, temb


class PointNetSAModule(nn.Module):
    """Set abstraction: FPS centres, group neighbours (coordinates relative to the centre first), MLP, max."""

    def __init__(self, num_centers: int, radius: float, num_neighbors: int, in_channels: int,
                 out_channels, grouping: str = "ball"):
        super().__init__()
        self.num_centers, self.radius, self.num_neighbors = num_centers, radius, num_neighbors
        self.grouping = grouping
        self.mlps = nn.ModuleList([SharedMLP(in_channels + 3, out_channels, dim=2)])
        self.out_channels = out_channels[-1]

    def forward(self, inputs):
        features, coords, temb = inputs
        centers = P.furthest_point_sample(coords, self.num_centers)
        if self.grouping == "ball":
            idx = P.ball_query(centers, coords, self.radius, self.num_neighbors)
        else:
            idx = P.knn_query(centers, coords, self.num_neighbors)
        rel = P.grouping(coords, idx) - centers.unsqueeze(-1)
        grouped = torch.cat([rel, P.grouping(features, idx)], 1)
        out = self.mlps[0](grouped).amax(-1)
        temb = P.grouping(temb, idx).amax(-1) if temb.shape[1] > 0 else temb
        return out, centers, temb


class PointNetFPModule(nn.Module):
    """Feature propagation: 3-NN interpolation of centre features (and time embedding), concat, MLP."""

    def __init__(self, in_channels: int, out_channels):
        super().__init__()
        self.mlp = SharedMLP(in_channels, out_channels, dim=1)

    def forward(self, inputs):
        points_coords, centers_coords, centers_features, points_features, temb = inputs
        feats = P.three_nn_interpolate(points_coords, centers_coords, centers_features)
        temb = P.three_nn_interpolate(points_coords, centers_coords, temb)
        if points_features is not None and points_features.shape[1] > 0:
            feats = torch.cat([feats, points_features], 1)
        return self.mlp(feats), points_coords, temb


def _pvconv_factory(cfg: PVCNN2Config, resolution: int, attention: bool):
    vr = cfg.voxel_resolution_multiplier
    return lambda cin, cout: PVConv(cin, cout, int(vr * resolution), attention=attention,
                                    dropout=cfg.dropout, with_se=True, with_se_relu=True)


class PVCNN2(nn.Module):
    """PVCNN2 velocity (or noise) network.

    ``forward(x [B,N,3], t [B])`` returns ``[B,N,out_channels]``; ``t`` in ``[0, 1]`` is
    multiplied by ``config.time_scale`` before the sinusoidal embedding, as PSF does.
    :meth:`forward_channels_first` is the original's ``forward(inputs [B,3+extra,N], t)``
    with the time already scaled.
    """

    def __init__(self, config: PVCNN2Config = PVCNN2Config()):
        super().__init__()
        self.config = cfg = config
        r, e = cfg.width_multiplier, cfg.embed_dim
        extra = cfg.extra_feature_channels
        in_channels = extra + 3
        sa_layers, sa_in_channels = [], []
        c = 0
        for conv_cfg, (num_centers, radius, num_neighbors, mlp) in cfg.sa_blocks:
            sa_in_channels.append(in_channels)
            blocks, k = [], 0
            if conv_cfg is not None:
                out_c, num_blocks, vres = conv_cfg
                out_c = int(r * out_c)
                for p in range(num_blocks):
                    make = _pvconv_factory(cfg, vres, attention=(c + 1) % 2 == 0 and cfg.use_att and p == 0)
                    if c == 0:
                        blocks.append(make(in_channels, out_c))
                    elif k == 0:  # the original builds only the first block of later stages
                        blocks.append(make(in_channels + e, out_c))
                    in_channels = out_c
                    k += 1
                extra = in_channels
            mlp = [int(r * oc) for oc in mlp]
            blocks.append(PointNetSAModule(num_centers, radius, num_neighbors,
                                           extra + (e if k == 0 else 0), mlp, cfg.grouping))
            c += 1
            in_channels = extra = blocks[-1].out_channels
            sa_layers.append(blocks[0] if len(blocks) == 1 else nn.Sequential(*blocks))
        self.sa_layers = nn.ModuleList(sa_layers)
        self.global_att = Attention(in_channels, 8, dims=1) if cfg.use_att else None

        sa_in_channels[0] = cfg.extra_feature_channels
        fp_layers = []
        for fp_idx, (fp_mlp, conv_cfg) in enumerate(cfg.fp_blocks):
            fp_mlp = tuple(int(r * oc) for oc in fp_mlp)
            blocks = [PointNetFPModule(in_channels + sa_in_channels[-1 - fp_idx] + e, fp_mlp)]
            in_channels = fp_mlp[-1]
            if conv_cfg is not None:
                out_c, num_blocks, vres = conv_cfg
                out_c = int(r * out_c)
                for _ in range(num_blocks):
                    blocks.append(_pvconv_factory(cfg, vres, attention=False)(in_channels, out_c))
                    in_channels = out_c
            fp_layers.append(blocks[0] if len(blocks) == 1 else nn.Sequential(*blocks))
        self.fp_layers = nn.ModuleList(fp_layers)
        hidden = int(r * 128)
        self.classifier = nn.Sequential(SharedMLP(in_channels, hidden), nn.Dropout(cfg.dropout),
                                        nn.Conv1d(hidden, cfg.out_channels, 1))
        self.embedf = nn.Sequential(nn.Linear(e, e), nn.LeakyReLU(0.1, inplace=True), nn.Linear(e, e))

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """Sinusoidal embedding ``[B, embed_dim]`` of (already scaled) times ``[B]``."""
        half = self.config.embed_dim // 2
        freq = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device)
                         * -(math.log(10000) / (half - 1)))
        arg = t.float()[:, None] * freq[None]
        emb = torch.cat([torch.sin(arg), torch.cos(arg)], 1)
        if self.config.embed_dim % 2:
            emb = nn.functional.pad(emb, (0, 1))
        return emb

    def forward_channels_first(self, inputs: torch.Tensor, t_scaled: torch.Tensor) -> torch.Tensor:
        """The original forward: ``inputs [B,3+extra,N]``, ``t_scaled [B]`` -> ``[B,out,N]``."""
        temb = self.embedf(self.time_embedding(t_scaled))[:, :, None].expand(-1, -1, inputs.shape[-1])
        coords, features = inputs[:, :3].contiguous(), inputs
        coords_list, in_features_list = [], []
        for i, sa in enumerate(self.sa_layers):
            in_features_list.append(features)
            coords_list.append(coords)
            feats_in = features if i == 0 else torch.cat([features, temb], 1)
            features, coords, temb = sa((feats_in, coords, temb))
        in_features_list[0] = inputs[:, 3:].contiguous()
        if self.global_att is not None:
            features = self.global_att(features)
        for fp_idx, fp in enumerate(self.fp_layers):
            features, coords, temb = fp((coords_list[-1 - fp_idx], coords, torch.cat([features, temb], 1),
                                         in_features_list[-1 - fp_idx], temb))
        return self.classifier(features)

    def forward(self, x: torch.Tensor, t: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """Velocity ``[B,N,3]`` at points ``x [B,N,3]`` and times ``t [B]`` in ``[0, 1]``.

        ``features [B,N,extra_feature_channels]``: per-point inputs beside the coordinates
        (required when the config has any, e.g. the completion model's given-point flag).
        """
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t.reshape(-1)
        inputs = x.transpose(1, 2)
        if self.config.extra_feature_channels:
            if features is None or features.shape[:2] != x.shape[:2] or \
                    features.shape[2] != self.config.extra_feature_channels:
                raise ValueError(f"this PVCNN2 takes {self.config.extra_feature_channels} feature channel(s) per "
                                 f"point beside the coordinates: features [B,N,C] for x {tuple(x.shape)}")
            inputs = torch.cat([inputs, features.transpose(1, 2).to(x.dtype)], 1)
        out = self.forward_channels_first(inputs, t * self.config.time_scale)
        return out.transpose(1, 2)
