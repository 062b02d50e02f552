"""LiDAR-camera fusion in the sparse 3D backbone: Focals Conv-F's shallow fusion and PathFusion's
deep fusion with its path consistency loss.

`VoxelBackBone8xFusion` is Focals Conv's ``VoxelBackBone8xFocal`` (module names ``conv_input``,
``conv1`` .. ``conv4``, ``conv_out``, the image branch ``semseg``, the multimodal layer
``conv_focal_multimodal``, focal layers at the end of the stages in ``focal_stages``) plus
PathFusion's deep fusion, ``deep_fusion.<stage>``: after stage k (2-4), the image level given
for it is lifted onto the stage's sites and passed through a 1x1 adapter ``A_k`` (a bias-free
linear map, so sites outside the image stay unchanged), then summed with the voxel features or
concatenated and reduced by a 1x1 conv-BN-ReLU.

Path consistency (PathFusion, arXiv 2212.06244; no public code, so this is a reconstruction):
for consecutive deep-fused stages k, k+1, the image features lifted at stage k and sent through
the 3D backbone's next stage, ``f3D(A_k(Lift(F2D_k)))``, should equal the image features sent
through the 2D backbone's next stage and then lifted, ``A_{k+1}(Lift(F2D_{k+1}))``, on the
stage-(k+1) sites that lie in the image. The 3D path runs the next stage's blocks with the main
path's rule books and in eval mode (running BatchNorm statistics used, never updated), skipping
a focal layer at its end (its site set is the main path's own choice); the sites are matched by
coordinates. ``stop_gradient="all"`` (the default) makes the whole 3D term the target, so the
loss trains the 2D branch and ``A_{k+1}``; ``"weights"`` freezes only the stage's weights, so
``A_k`` learns too. The distance is ``l2`` (mean squared), ``l1`` or ``cosine`` (one minus the
cosine, per site), weighted per pair.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.errors import ConfigError, DataError

from .backbone3d import post_act_block
from .focal import FocalSparseConv
from .lifting import lift, project_to_image, site_positions
from .sparse import SparseConv3d, SparseSequential, SparseTensor, SubMConv3d, site_keys

__all__ = ["DeepFusion", "VoxelBackBone8xFusion", "consistency_distance"]

STAGE_STRIDES = {1: 1, 2: 2, 3: 4, 4: 8}


class DeepFusion(nn.Module):
    """``x [N, C3]`` and lifted image features ``img [N, C2]`` with ``mask [N]`` -> ``[N, C3]``:
    ``x + A(img)`` (``sum``) or ``ReLU(BN(W [x, A(img)]))`` (``concat``)."""

    def __init__(self, image_channels: int, voxel_channels: int, mode: str = "sum", norm_fn=None):
        super().__init__()
        if mode not in ("sum", "concat"):
            raise ConfigError(f"deep fusion mode must be 'sum' or 'concat', not {mode!r}")
        self.mode = mode
        self.adapter = nn.Linear(image_channels, voxel_channels, bias=False)
        if mode == "concat":
            self.fuse = nn.Sequential(nn.Linear(2 * voxel_channels, voxel_channels, bias=False),
                                      (norm_fn or nn.BatchNorm1d)(voxel_channels), nn.ReLU())

    def adapt(self, img: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.adapter(img) * mask[:, None].to(img.dtype)

    def forward(self, x: torch.Tensor, adapted: torch.Tensor) -> torch.Tensor:
        if self.mode == "sum":
            return x + adapted
        return self.fuse(torch.cat([x, adapted], dim=1))


def consistency_distance(a: torch.Tensor, b: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """Mean distance between matched rows of ``a`` and ``b`` ``[N, C]``."""
    if len(a) == 0:
        return (a.sum() + b.sum()) * 0
    if kind == "l2":
        return F.mse_loss(a, b)
    if kind == "l1":
        return F.l1_loss(a, b)
    if kind == "cosine":
        return (1 - F.cosine_similarity(a, b, dim=1, eps=1e-6)).mean()
    raise ConfigError(f"consistency distance must be l2, l1 or cosine, not {kind!r}")


def _match(a_idx: torch.Tensor, b_idx: torch.Tensor, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``(ia, ib)`` of the sites present in both index sets."""
    ka, kb = site_keys(a_idx, shape), site_keys(b_idx, shape)
    sorted_b, order = kb.sort()
    pos = torch.searchsorted(sorted_b, ka).clamp_max(max(len(kb) - 1, 0))
    hit = (sorted_b[pos] == ka) if len(kb) else torch.zeros_like(ka, dtype=torch.bool)
    ia = torch.nonzero(hit).squeeze(1)
    return ia, order[pos[ia]]


class VoxelBackBone8xFusion(nn.Module):
    """VoxelBackBone8x with Focals Conv-F's and PathFusion's fusion. See the module docstring.

    `image_branch` returns one map per level; `shallow_level` (None: no shallow fusion) is the
    level the multimodal focal layer after stage 1 reads; `deep` maps stage (2-4) to level.
    Forward takes the batch dict of `LidarDetector` plus ``images [B, 3, H, W]``,
    ``image_sizes`` ``[(H_b, W_b)]`` and ``lidar_to_image [B, 3, 4]``; adds
    ``backbone_losses`` (``focal_loss``, ``consistency_loss``) in training."""

    def __init__(self, input_channels: int, grid_size: Sequence[int], voxel_size: Sequence[float],
                 point_range: Sequence[float], image_branch: nn.Module, channels: Sequence[int] = (16, 32, 64, 64),
                 out_channels: int = 128, last_pad: int = 0, bn_momentum: float = 0.01,
                 focal_stages: Sequence[int] = (), shallow_level: int | None = 0, deep: dict | None = None,
                 deep_mode: str = "sum", topk: bool = True, threshold: float = 0.5, skip_mask_kernel_image: bool = False,
                 position: str = "corner", sample: str = "nearest", consistency_weights: dict | None = None,
                 consistency_distance: str = "l2", stop_gradient: str = "all"):
        super().__init__()
        c1, c2, c3, c4 = channels
        norm_fn = partial(nn.BatchNorm1d, eps=1e-3, momentum=bn_momentum)
        self.sparse_shape = (int(grid_size[2]) + 1, int(grid_size[1]), int(grid_size[0]))
        self.voxel_size = [float(v) for v in voxel_size]
        self.point_range = [float(v) for v in point_range]
        zyx_size, zyx_min = self.voxel_size[::-1], self.point_range[:3][::-1]
        focal = partial(FocalSparseConv, norm_fn=norm_fn, topk=topk, threshold=threshold, voxel_size=zyx_size,
                        point_range_min=zyx_min)
        self.conv_input = SparseSequential(
            SubMConv3d(input_channels, c1, 3, padding=1, bias=False, indice_key="subm1"), norm_fn(c1), nn.ReLU())
        block = partial(post_act_block, norm_fn=norm_fn)
        self.semseg = image_branch
        levels = list(image_branch.channels)
        if shallow_level is not None:
            if not 0 <= shallow_level < len(levels):
                raise ConfigError(f"shallow fusion reads image level {shallow_level}; the branch has {len(levels)}")
            if levels[shallow_level] != c1:
                raise ConfigError(f"Focals Conv-F sums image level {shallow_level} ({levels[shallow_level]} channels) "
                                  f"with stage 1's {c1}: reduce that level to {c1} channels")
            self.conv_focal_multimodal = focal(c1, c1, voxel_stride=1, indice_key="spconv_focal_multimodal",
                                               image_channel=c1, use_img=True, skip_mask_kernel=skip_mask_kernel_image)
        self.shallow_level = shallow_level
        widths = {1: c1, 2: c2, 3: c3, 4: c4}

        def stage_focal(k):
            return [focal(widths[k], widths[k], voxel_stride=STAGE_STRIDES[k], indice_key=f"focal{k}")] \
                if k in focal_stages and k < 4 else []

        self.conv1 = SparseSequential(block(c1, c1, 3, padding=1, indice_key="subm1"), *stage_focal(1))
        self.conv2 = SparseSequential(
            block(c1, c2, 3, stride=2, padding=1, indice_key="spconv2", conv_type="spconv"),
            block(c2, c2, 3, padding=1, indice_key="subm2"), block(c2, c2, 3, padding=1, indice_key="subm2"),
            *stage_focal(2))
        self.conv3 = SparseSequential(
            block(c2, c3, 3, stride=2, padding=1, indice_key="spconv3", conv_type="spconv"),
            block(c3, c3, 3, padding=1, indice_key="subm3"), block(c3, c3, 3, padding=1, indice_key="subm3"),
            *stage_focal(3))
        self.conv4 = SparseSequential(
            block(c3, c4, 3, stride=2, padding=(0, 1, 1), indice_key="spconv4", conv_type="spconv"),
            block(c4, c4, 3, padding=1, indice_key="subm4"), block(c4, c4, 3, padding=1, indice_key="subm4"))
        self.conv_out = SparseSequential(
            SparseConv3d(c4, out_channels, (3, 1, 1), stride=(2, 1, 1), padding=last_pad, bias=False,
                         indice_key="spconv_down2"), norm_fn(out_channels), nn.ReLU())
        self.deep = {int(k): int(v) for k, v in (deep or {}).items()}
        for k, lvl in self.deep.items():
            if k not in (2, 3, 4) or not 0 <= lvl < len(levels):
                raise ConfigError(f"deep fusion maps stages 2-4 to image levels 0-{len(levels) - 1}, not {k}: {lvl}")
        self.deep_fusion = nn.ModuleDict({str(k): DeepFusion(levels[lvl], widths[k], deep_mode, norm_fn)
                                          for k, lvl in sorted(self.deep.items())})
        self.position, self.sample = position, sample
        pairs = [(k, k + 1) for k in sorted(self.deep) if k + 1 in self.deep]
        weights = {int(k): float(v) for k, v in (consistency_weights or {}).items()}
        self.consistency_weights = {k: weights.get(k, 0.0) for k, _ in pairs}
        self.consistency_kind = consistency_distance
        if stop_gradient not in ("all", "weights"):
            raise ConfigError(f"stop_gradient must be 'all' or 'weights', not {stop_gradient!r}")
        self.stop_gradient = stop_gradient
        self.num_point_features = out_channels
        self.backbone_channels = {"x_conv1": c1, "x_conv2": c2, "x_conv3": c3, "x_conv4": c4}

    # ---------------------------------------------------------------- pieces
    def _stage(self, k: int) -> SparseSequential:
        return getattr(self, f"conv{k}")

    def _run_stage(self, k: int, x: SparseTensor, gt_boxes) -> tuple[SparseTensor, torch.Tensor]:
        aux = x.features.new_zeros(())
        for m in self._stage(k):
            if isinstance(m, FocalSparseConv):
                x, loss = m(x, gt_boxes)
                aux = aux + loss
            else:
                x = m(x)
        return x, aux

    def _lifter(self, batch: dict, level_maps: list[torch.Tensor]) -> Callable:
        images = batch["images"]

        def lift_level(level: int, t: SparseTensor, stride: int):
            return lift(level_maps[level], t.indices, stride, self.voxel_size, self.point_range,
                        batch["lidar_to_image"], tuple(images.shape[-2:]), batch["image_sizes"],
                        self.position, self.sample)
        return lift_level

    def _consistency(self, k: int, x_k: SparseTensor, adapted_k: torch.Tensor, x_next: SparseTensor,
                     adapted_next: torch.Tensor, mask_next: torch.Tensor) -> torch.Tensor:
        """The distance between the 3D path (stage k+1 on ``A_k(Lift_k)``) and ``A_{k+1}(Lift_{k+1})``."""
        stage = [m for m in self._stage(k + 1) if not isinstance(m, FocalSparseConv)]
        modes = [m.training for m in self.modules()]
        try:
            for m in stage:
                m.eval()
            seq = SparseSequential(*stage)
            src = SparseTensor(adapted_k, x_k.indices, x_k.spatial_shape, x_k.batch_size, x_k.rules)
            if self.stop_gradient == "all":
                with torch.no_grad():
                    target = seq(src.replace_feature(adapted_k.detach()))
            else:
                frozen = {n: p.detach() for n, p in seq.named_parameters()}
                target = torch.func.functional_call(seq, {**frozen, **dict(seq.named_buffers())}, (src,))
        finally:
            for m, t in zip(self.modules(), modes):
                m.training = t
        ia, ib = _match(target.indices, x_next.indices, x_next.spatial_shape)
        keep = mask_next[ib]
        return consistency_distance(target.features[ia[keep]], adapted_next[ib[keep]], self.consistency_kind)

    def _check_projection(self, x: SparseTensor, batch: dict) -> None:
        """A sample with voxels of which none projects into its image has a wrong calibration
        (or an image of another frame): fusing it would silently add nothing."""
        pos = site_positions(x.indices, 1, self.voxel_size, self.point_range, "centre")
        uv, depth = project_to_image(pos, x.indices[:, 0], batch["lidar_to_image"])
        for b, (h, w) in enumerate(batch["image_sizes"]):
            rows = x.indices[:, 0] == b
            if not rows.any():
                continue
            u, v = uv[rows, 0], uv[rows, 1]
            inside = (depth[rows] > 0) & (u >= 0) & (u < w) & (v >= 0) & (v < h)
            if not inside.any():
                frame = batch.get("frame_id", [None] * (b + 1))[b]
                raise DataError(f"sample {b}{f' (frame {frame})' if frame else ''}: none of its {int(rows.sum())} "
                                f"voxels projects into its {w} x {h} image; its calibration (P2, R0_rect, "
                                "Tr_velo_to_cam) does not belong to these points or this image.")

    # ---------------------------------------------------------------- forward
    def forward(self, batch: dict) -> dict:
        for key in ("images", "image_sizes", "lidar_to_image"):
            if key not in batch:
                raise ConfigError(f"a fusion backbone needs batch[{key!r}] (the camera image and its projection)")
        gt = batch.get("gt_boxes") if self.training else None
        x = SparseTensor(batch["voxel_features"], batch["voxel_coords"].int(), self.sparse_shape, batch["batch_size"])
        self._check_projection(x, batch)
        level_maps = self.semseg(batch["images"])
        lift_level = self._lifter(batch, level_maps)
        focal_loss = x.features.new_zeros(())
        x = self.conv_input(x)
        x, aux = self._run_stage(1, x, gt)
        focal_loss = focal_loss + aux
        if self.shallow_level is not None:
            x, aux = self.conv_focal_multimodal(x, gt, lambda t: lift_level(self.shallow_level, t, 1)[0])
            focal_loss = focal_loss + aux
        outs, fused = {1: x}, {}
        for k in (2, 3, 4):
            x, aux = self._run_stage(k, x, gt)
            focal_loss = focal_loss + aux
            if k in self.deep:
                img, mask = lift_level(self.deep[k], x, STAGE_STRIDES[k])
                fusion = self.deep_fusion[str(k)]
                adapted = fusion.adapt(img, mask)
                fused[k] = (x, adapted, mask)
                x = x.replace_feature(fusion(x.features, adapted))
            outs[k] = x
        consistency = x.features.new_zeros(())
        if self.training:
            for k, w in self.consistency_weights.items():
                if w:
                    xk, ak, _ = fused[k]
                    xn, an, mn = fused[k + 1]
                    consistency = consistency + w * self._consistency(k, xk, ak, xn, an, mn)
        batch["encoded_spconv_tensor"] = self.conv_out(outs[4])
        batch["encoded_spconv_tensor_stride"] = 8
        batch["multi_scale_3d_features"] = {f"x_conv{k}": outs[k] for k in (1, 2, 3, 4)}
        batch["multi_scale_3d_strides"] = {f"x_conv{k}": STAGE_STRIDES[k] for k in (1, 2, 3, 4)}
        if self.training:
            batch["backbone_losses"] = {"focal_loss": focal_loss, "consistency_loss": consistency}
        return batch

