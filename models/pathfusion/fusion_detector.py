"""The LiDAR-camera detector: `LidarDetector` with `fusion.VoxelBackBone8xFusion` as its sparse
backbone (``MODEL.BACKBONE_3D.NAME: VoxelBackBone8xFusion``).

Config keys of that backbone, beyond VoxelBackBone8x's (``CHANNELS``, ``OUT_CHANNELS``,
``LAST_PAD``, ``BN_MOMENTUM``): ``IMAGE_BRANCH`` (`image_branch.build_image_branch`),
``FOCAL_STAGES`` (Focals Conv's focal layers, e.g. ``[1, 2, 3]``), ``TOPK``, ``THRESHOLD``,
``SKIP_MASK_KERNEL_IMG`` (Focals Conv's names), ``FOCAL_LOSS_WEIGHT`` (1 in Focals Conv), and
``FUSION``: ``SHALLOW_LEVEL`` (the image level of Focals Conv-F's layer after stage 1; null for
none), ``DEEP`` (stage -> image level), ``DEEP_MODE`` (sum or concat), ``POSITION`` (corner or
centre), ``SAMPLE`` (nearest or bilinear), and ``CONSISTENCY``: ``WEIGHTS`` (first stage of a
pair -> weight), ``DISTANCE`` (l2, l1, cosine), ``STOP_GRADIENT`` (all or weights).

Batch dict in, beyond `LidarDetector`'s: ``image`` (one ``[H, W, 3]`` uint8 array or tensor per
sample, as `zoo.data.kitti_dataset.collate` gives them; or ``images [B, 3, H, W]`` float in
[0, 1] with ``image_sizes``) and ``lidar_to_image [B, 3, 4]`` (the augmented points'
projection). Images of different sizes are padded at the bottom and right, as OpenPCDet pads
them. Training adds ``focal_loss`` and ``consistency_loss`` to ``losses``.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
import torch.nn as nn

from zoo.errors import ConfigError, DataError, WeightsError

from .detector import LidarDetector, load_config
from .fusion import VoxelBackBone8xFusion
from .image_branch import build_image_branch

__all__ = ["FusionDetector", "build_fusion_detector", "prepare_images", "is_fusion_config", "load_focals_conv_state"]


def is_fusion_config(cfg: Mapping) -> bool:
    """Whether a detector config fuses the camera (its sparse backbone is the fusion one)."""
    return cfg.get("MODEL", {}).get("BACKBONE_3D", {}).get("NAME") == "VoxelBackBone8xFusion"


def prepare_images(images, device=None) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """``[B, 3, H, W]`` float in [0, 1] from per-sample ``[H_b, W_b, 3]`` uint8 images (numpy or
    torch), zero-padded at the bottom and right to the largest, and the sizes ``[(H_b, W_b)]``."""
    if images is None or len(images) == 0:
        raise DataError("a camera-fusion detector needs each frame's image (batch['image']): load the dataset "
                        "with load_image=True, and check that every frame has training/image_2/<id>.png.")
    arrs = [im if isinstance(im, torch.Tensor) else torch.from_numpy(np.array(im, copy=True)) for im in images]
    for a in arrs:
        if a.dim() != 3 or a.shape[2] != 3:
            raise DataError(f"an image of shape {tuple(a.shape)}; a frame's image is [H, W, 3] (RGB)")
    h = max(int(a.shape[0]) for a in arrs)
    w = max(int(a.shape[1]) for a in arrs)
    out = torch.zeros(len(arrs), 3, h, w, device=device)
    for b, a in enumerate(arrs):
        out[b, :, : a.shape[0], : a.shape[1]] = a.to(device=device).permute(2, 0, 1).float() / 255.0
    return out, [(int(a.shape[0]), int(a.shape[1])) for a in arrs]


class FusionDetector(LidarDetector):
    """A voxel detector whose sparse backbone fuses the camera image (see the module docstring)."""

    batch_keys = ("points", "batch_size", "image", "lidar_to_image")

    def _build_backbone_3d(self, b3: Mapping, n_feat: int) -> nn.Module:
        if b3.get("NAME") != "VoxelBackBone8xFusion":
            raise ConfigError("a camera-fusion detector config needs BACKBONE_3D NAME VoxelBackBone8xFusion")
        fusion = b3.get("FUSION", {})
        cons = fusion.get("CONSISTENCY", {})
        self.focal_loss_weight = float(b3.get("FOCAL_LOSS_WEIGHT", 1.0))
        return VoxelBackBone8xFusion(
            n_feat, self.grid_size, self.voxel_size, self.point_cloud_range, build_image_branch(b3.get("IMAGE_BRANCH", {})),
            channels=tuple(b3.get("CHANNELS", (16, 32, 64, 64))), out_channels=int(b3.get("OUT_CHANNELS", 128)),
            last_pad=int(b3.get("LAST_PAD", 0)), bn_momentum=float(b3.get("BN_MOMENTUM", 0.01)),
            focal_stages=tuple(b3.get("FOCAL_STAGES", ())), shallow_level=fusion.get("SHALLOW_LEVEL", 0),
            deep=fusion.get("DEEP", {}), deep_mode=fusion.get("DEEP_MODE", "sum"), topk=bool(b3.get("TOPK", True)),
            threshold=float(b3.get("THRESHOLD", 0.5)), skip_mask_kernel_image=bool(b3.get("SKIP_MASK_KERNEL_IMG", False)),
            position=fusion.get("POSITION", "corner"), sample=fusion.get("SAMPLE", "nearest"),
            consistency_weights=cons.get("WEIGHTS", {}), consistency_distance=cons.get("DISTANCE", "l2"),
            stop_gradient=cons.get("STOP_GRADIENT", "all"))

    def camera_modules(self) -> list[str]:
        """Names of the modules a LiDAR-only detector of the same settings lacks: the image
        branch, the multimodal and focal layers, the deep fusion."""
        from .focal import FocalSparseConv

        names = [n for n, m in self.named_modules() if isinstance(m, FocalSparseConv)]
        return names + ["backbone_3d.semseg", "backbone_3d.deep_fusion"]

    def load_lidar_weights(self, state: Mapping[str, torch.Tensor]) -> list[str]:
        """The weights of the LiDAR-only detector with the same settings (its sparse stages, BEV
        backbone and head: e.g. ``pathfusion_lidar_tiny``'s for ``pathfusion_tiny``) into this
        model; the camera modules keep their initialisation. Returns their keys."""
        state = state.get("model_state", state)
        own = self.state_dict()
        camera = tuple(n + "." for n in self.camera_modules())
        is_camera = [k for k in own if k.startswith(camera)]
        extra = sorted(k for k in state if k not in own)
        missing = sorted(k for k in own if k not in state and not k.startswith(camera))
        if extra or missing:
            raise WeightsError(f"these are not the weights of the LiDAR detector with this model's settings: "
                               f"{len(missing)} of its tensors are missing (first: {missing[:2]}), {len(extra)} have no "
                               f"place (first: {extra[:2]}).")
        try:
            self.load_state_dict(dict(state), strict=False)
        except RuntimeError as e:
            raise WeightsError(f"a LiDAR tensor has another shape than this model's: {str(e).splitlines()[-1]}") from None
        return is_camera

    def forward(self, batch: dict) -> dict:
        batch = dict(batch)
        if "images" not in batch:
            device = batch["points"].device if "points" in batch else None
            batch["images"], batch["image_sizes"] = prepare_images(batch.get("image"), device)
        if "lidar_to_image" not in batch:
            raise DataError("a camera-fusion detector needs batch['lidar_to_image'] [B, 3, 4] (the frames' "
                            "projection with their augmentations undone; zoo.data.kitti_dataset.collate makes it).")
        batch = super().forward(batch)
        if "losses" in batch and "backbone_losses" in batch:
            extra = batch.pop("backbone_losses")
            losses = dict(batch["losses"])
            losses["focal_loss"] = self.focal_loss_weight * extra["focal_loss"]
            losses["consistency_loss"] = extra["consistency_loss"]
            losses["loss"] = losses["loss"] + losses["focal_loss"] + losses["consistency_loss"]
            batch["losses"] = losses
        return batch


def build_fusion_detector(config: str | Mapping = "pathfusion_tiny") -> FusionDetector:
    """The registered builder of the camera-fusion detectors: a packaged config name, a YAML
    path, or a config dict."""
    cfg = load_config(config)
    if not is_fusion_config(cfg):
        raise ConfigError("this config's BACKBONE_3D is not VoxelBackBone8xFusion: build it with "
                          "build_lidar_detector (a LiDAR-only model).")
    return FusionDetector(cfg)


def _pathfusion_own(key: str) -> bool:
    """Tensors PathFusion adds to Focals Conv-F's backbone: the deep fusion adapters and the
    reduce blocks of the image levels after the first."""
    if key.startswith("backbone_3d.deep_fusion."):
        return True
    parts = key.split(".")
    return key.startswith("backbone_3d.semseg.reduce_blocks.") and parts[3] != "0"


def load_focals_conv_state(model: FusionDetector, checkpoint: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    """Load a Focals Conv-F checkpoint (``model_state`` or a bare state dict) into `model`'s sparse
    backbone, image branch and fusion layers (``backbone_3d.*``; sparse weights in any spconv
    layout). Its heads (Voxel R-CNN's ``dense_head`` anchor head and ``roi_head``) have no place
    here: the CenterHead replaces them. Returns ``loaded``, ``unused`` (the segmentation head and
    image layers this model does not build, and the replaced heads) and ``new`` (this model's
    tensors the checkpoint cannot hold: PathFusion's additions and the detector after the
    backbone). Raises `WeightsError` when a Focals Conv-F tensor is missing or has no place."""
    state = checkpoint.get("model_state", checkpoint)
    own = model.state_dict()
    src = {k: v for k, v in state.items() if k.startswith("backbone_3d.")}
    image_only = "backbone_3d.semseg.ifn.model."
    unused = sorted(k for k in src if k not in own and k.startswith(image_only))
    unused += sorted(k for k in state if not k.startswith("backbone_3d."))
    unexpected = sorted(k for k in src if k not in own and not k.startswith(image_only))
    if unexpected:
        raise WeightsError(f"the checkpoint has {len(unexpected)} backbone tensors this model has no place for (first: "
                           f"{unexpected[:3]}); its FOCAL_STAGES or channels differ from the checkpoint's config.")
    missing = sorted(k for k in own if k.startswith("backbone_3d.") and k not in src and not _pathfusion_own(k))
    if missing:
        raise WeightsError(f"the checkpoint lacks {len(missing)} of Focals Conv-F's backbone tensors (first: "
                           f"{missing[:3]}); it is not a Focals Conv-F (USE_IMG) checkpoint of this configuration.")
    loaded = {k: v for k, v in src.items() if k in own}
    try:
        model.load_state_dict(loaded, strict=False)
    except RuntimeError as e:
        raise WeightsError(f"a Focals Conv-F tensor has another shape than this model's: {str(e).splitlines()[-1]}") from None
    return {"loaded": sorted(loaded), "unused": unused, "new": sorted(k for k in own if k not in loaded)}
