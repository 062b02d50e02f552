"""The voxel LiDAR detector as OpenPCDet builds it: stages passing one batch dict, configured by
YAML (the files in ``configs/``, or the user's own through ``--model-config``).

    points -> voxelize -> vfe (mean) -> backbone_3d (sparse) -> map_to_bev_module -> backbone_2d
           -> dense_head (CenterHead)

Module names are OpenPCDet's (``vfe``, ``backbone_3d``, ``map_to_bev_module``, ``backbone_2d``,
``dense_head``), so the weights of an OpenPCDet checkpoint with the same configuration load
(`load_openpcdet_state`). Voxelization, which OpenPCDet runs in its data loader, is the
model's first stage here, so a model takes raw points and the dataset stays free of model
settings; its limits differ between training and evaluation as OpenPCDet's do.

Batch dict in: ``points [N, 1 + C]`` float (batch index, x, y, z, reflectance), ``batch_size``,
and for training ``gt_boxes [B, M, 8]`` (LiDAR box, 1-based class, zero rows as padding).
"""
from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
import yaml

from zoo.errors import ConfigError, WeightsError

from .backbone3d import HeightCompression, VoxelBackBone8x
from .bev import BaseBEVBackbone
from .center_head import CenterHead
from .voxels import MeanVFE, grid_size, voxelize

__all__ = ["LidarDetector", "load_config", "build_lidar_detector", "load_openpcdet_state", "CONFIGS"]

CONFIGS = ("pathfusion_lidar_kitti", "pathfusion_lidar_tiny", "pathfusion_kitti", "pathfusion_tiny")


def load_config(config: str | Path | Mapping) -> dict:
    """A detector config: a packaged name (``pathfusion_lidar_tiny``), a YAML path, or a dict."""
    if isinstance(config, Mapping):
        return copy.deepcopy(dict(config))
    name = str(config)
    if name in CONFIGS:
        text = resources.files("zoo.models.pathfusion").joinpath(f"configs/{name}.yaml").read_text()
        where = f"the packaged {name}.yaml"
    else:
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"{name}: no such detector config; give a YAML file or one of {', '.join(CONFIGS)}.")
        text, where = path.read_text(), str(path)
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({e}).") from None
    for key in ("CLASS_NAMES", "POINT_CLOUD_RANGE", "VOXELIZE", "MODEL"):
        if not isinstance(cfg, dict) or key not in cfg:
            raise ConfigError(f"{where}: a detector config needs CLASS_NAMES, POINT_CLOUD_RANGE, VOXELIZE and MODEL; "
                              f"{key} is missing.")
    return cfg


def _need(cfg: Mapping, key: str, where: str) -> Any:
    if key not in cfg:
        raise ConfigError(f"detector config: {where} needs {key}")
    return cfg[key]


class LidarDetector(nn.Module):
    """A LiDAR-only voxel detector (OpenPCDet's stage layout). `forward(batch)` returns the
    batch dict with ``losses`` (training, when ``gt_boxes`` is given) or ``final_box_dicts``."""

    def __init__(self, cfg: Mapping):
        super().__init__()
        self.cfg = copy.deepcopy(dict(cfg))
        self.class_names = list(cfg["CLASS_NAMES"])
        self.point_cloud_range = [float(v) for v in cfg["POINT_CLOUD_RANGE"]]
        vox = cfg["VOXELIZE"]
        self.voxel_size = [float(v) for v in _need(vox, "VOXEL_SIZE", "VOXELIZE")]
        self.max_points_per_voxel = int(_need(vox, "MAX_POINTS_PER_VOXEL", "VOXELIZE"))
        limits = _need(vox, "MAX_NUMBER_OF_VOXELS", "VOXELIZE")
        self.max_voxels = {"train": int(limits["train"]), "test": int(limits["test"])}
        self.grid_size = grid_size(self.voxel_size, self.point_cloud_range)
        m = cfg["MODEL"]
        n_feat = int(cfg.get("NUM_POINT_FEATURES", 4))
        if m.get("VFE", {}).get("NAME", "MeanVFE") != "MeanVFE":
            raise ConfigError("detector config: VFE NAME must be MeanVFE")
        self.vfe = MeanVFE(n_feat)
        self.backbone_3d = self._build_backbone_3d(m.get("BACKBONE_3D", {}), n_feat)
        self.map_to_bev_module = HeightCompression(int(_need(m["MAP_TO_BEV"], "NUM_BEV_FEATURES", "MAP_TO_BEV")))
        b2 = m["BACKBONE_2D"]
        self.backbone_2d = BaseBEVBackbone(self.map_to_bev_module.num_bev_features, b2["LAYER_NUMS"],
                                           b2["LAYER_STRIDES"], b2["NUM_FILTERS"], b2["UPSAMPLE_STRIDES"],
                                           b2["NUM_UPSAMPLE_FILTERS"], float(b2.get("BN_MOMENTUM", 0.01)))
        h = m["DENSE_HEAD"]
        sep = h.get("SEPARATE_HEAD_CFG", {})
        tgt = h.get("TARGET_ASSIGNER_CONFIG", {})
        lw = h.get("LOSS_CONFIG", {}).get("LOSS_WEIGHTS", {})
        post = h.get("POST_PROCESSING", {})
        nmsc = post.get("NMS_CONFIG", {})
        self.dense_head = CenterHead(
            self.backbone_2d.num_bev_features, self.class_names, self.point_cloud_range, self.voxel_size,
            class_names_each_head=h.get("CLASS_NAMES_EACH_HEAD"), feature_map_stride=int(tgt.get("FEATURE_MAP_STRIDE", 8)),
            shared_conv_channel=int(h.get("SHARED_CONV_CHANNEL", 64)),
            use_bias_before_norm=bool(h.get("USE_BIAS_BEFORE_NORM", True)), num_hm_conv=int(h.get("NUM_HM_CONV", 2)),
            head_dict=sep.get("HEAD_DICT"), head_order=sep.get("HEAD_ORDER"),
            bn_eps=float(h.get("BN_EPS", 1e-5)), bn_mom=float(h.get("BN_MOM", 0.1)),
            num_max_objs=int(tgt.get("NUM_MAX_OBJS", 500)), gaussian_overlap=float(tgt.get("GAUSSIAN_OVERLAP", 0.1)),
            min_radius=int(tgt.get("MIN_RADIUS", 2)), cls_weight=float(lw.get("cls_weight", 1.0)),
            loc_weight=float(lw.get("loc_weight", 2.0)), code_weights=tuple(lw.get("code_weights", (1.0,) * 8)),
            score_thresh=float(post.get("SCORE_THRESH", 0.1)),
            post_center_limit_range=post.get("POST_CENTER_LIMIT_RANGE"),
            max_obj_per_sample=int(post.get("MAX_OBJ_PER_SAMPLE", 500)),
            nms_thresh=float(nmsc.get("NMS_THRESH", 0.1)), nms_pre_maxsize=int(nmsc.get("NMS_PRE_MAXSIZE", 4096)),
            nms_post_maxsize=int(nmsc.get("NMS_POST_MAXSIZE", 500)), peak_kernel=int(post.get("PEAK_KERNEL", 3)))
        stride = self.dense_head.feature_map_stride
        bev_stride = 8 * b2["LAYER_STRIDES"][0] / b2["UPSAMPLE_STRIDES"][0]
        if abs(bev_stride - stride) > 1e-6:
            raise ConfigError(f"detector config: the BEV map is at stride {bev_stride:g} but FEATURE_MAP_STRIDE is {stride}")

    batch_keys = ("points", "batch_size")  # what the model reads from a collated batch (and gt_boxes to train)

    def _build_backbone_3d(self, b3: Mapping, n_feat: int) -> nn.Module:
        if b3.get("NAME", "VoxelBackBone8x") != "VoxelBackBone8x":
            raise ConfigError(f"detector config: BACKBONE_3D NAME must be VoxelBackBone8x for a LiDAR detector "
                              f"(VoxelBackBone8xFusion is the camera-fusion detector's), not {b3.get('NAME')!r}")
        return VoxelBackBone8x(n_feat, self.grid_size, tuple(b3.get("CHANNELS", (16, 32, 64, 64))),
                               int(b3.get("OUT_CHANNELS", 128)), int(b3.get("LAST_PAD", 0)),
                               float(b3.get("BN_MOMENTUM", 0.01)))

    @property
    def module_list(self) -> list[nn.Module]:
        return [self.vfe, self.backbone_3d, self.map_to_bev_module, self.backbone_2d, self.dense_head]

    def voxelize(self, points: torch.Tensor, batch_size: int) -> dict:
        """Per-sample voxels of ``points [N, 1 + C]``, concatenated, with the batch index
        prepended to the coordinates: ``voxels [M, P, C]``, ``voxel_coords [M, 4]``,
        ``voxel_num_points [M]``."""
        limit = self.max_voxels["train" if self.training else "test"]
        vs, cs, ns = [], [], []
        for b in range(batch_size):
            pts = points[points[:, 0] == b, 1:]
            v, c, n = voxelize(pts, self.voxel_size, self.point_cloud_range, self.max_points_per_voxel, limit)
            vs.append(v)
            cs.append(torch.cat([torch.full_like(c[:, :1], b), c], dim=1))
            ns.append(n)
        return {"voxels": torch.cat(vs), "voxel_coords": torch.cat(cs), "voxel_num_points": torch.cat(ns)}

    def forward(self, batch: dict) -> dict:
        batch = dict(batch)
        if "points" not in batch:
            raise ConfigError("the detector's batch needs 'points' [N, 1 + C] (batch index first)")
        batch.setdefault("batch_size", int(batch["points"][:, 0].max().item()) + 1 if len(batch["points"]) else 1)
        batch.update(self.voxelize(batch["points"], batch["batch_size"]))
        batch["voxel_features"] = self.vfe(batch["voxels"], batch["voxel_num_points"])
        for stage in self.module_list[1:]:
            batch = stage(batch)
        return batch


def build_lidar_detector(config: str | Mapping = "pathfusion_lidar_tiny") -> LidarDetector:
    """The registered builder: a packaged config name, a YAML path, or a config dict."""
    return LidarDetector(load_config(config))


def load_openpcdet_state(model: LidarDetector, checkpoint: Mapping[str, torch.Tensor]) -> None:
    """Load an OpenPCDet checkpoint's ``model_state`` (or a bare state dict) into `model`:
    same key names; sparse conv weights in any spconv layout; keys the model has no module
    for (e.g. a second stage) are reported."""
    state = checkpoint.get("model_state", checkpoint)
    own = model.state_dict()
    extra = sorted(k for k in state if k not in own)
    missing = sorted(k for k in own if k not in state)
    if missing:
        raise WeightsError(f"the checkpoint lacks {len(missing)} of the detector's tensors (first: {missing[:3]}); "
                           "it was trained with another configuration.")
    if extra:
        raise WeightsError(f"the checkpoint has {len(extra)} tensors this detector has no place for "
                           f"(first: {extra[:3]}); give the config it was trained with.")
    model.load_state_dict({k: state[k] for k in own})
