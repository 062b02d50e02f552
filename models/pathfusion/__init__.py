"""PathFusion's house: voxels, sparse convolution and the voxel LiDAR detector it builds on.

- `voxels`: `voxelize` (spconv's PointToVoxel arithmetic) and the mean VFE;
- `sparse`: `SparseTensor`, `SubMConv3d`, `SparseConv3d`, `SparseInverseConv3d` in plain PyTorch;
- `backbone3d`, `bev`, `center_head`: OpenPCDet's VoxelBackBone8x, HeightCompression,
  BaseBEVBackbone and CenterHead, with its module names;
- `detector`: the stages as one `LidarDetector`, configured by YAML (``configs/``);
- camera fusion: `image_branch` (Focals Conv's DeepLabV3 branch, any zoo backbone), `lifting`
  (voxels to pixels and image features), `focal` (Focals Conv's focal sparse convolution),
  `fusion` (the fused backbone, deep fusion, the path consistency loss), `fusion_detector`
  (`FusionDetector`, Focals Conv-F's checkpoints);
- `export_parts`: the dense parts as ONNX-ready modules.

Registers ``pathfusion_lidar_kitti`` (KITTI's full settings) and ``pathfusion_lidar_tiny`` (LiDAR
only), ``pathfusion_kitti`` and ``pathfusion_tiny`` (LiDAR and camera).
"""
from pathlib import Path

from zoo.hub import WeightEntry
from zoo.registry import InputSpec, ModelCard, Paper, register_model

from .detector import CONFIGS, LidarDetector, build_lidar_detector, load_config, load_openpcdet_state
from .sparse import (SparseConv3d, SparseInverseConv3d, SparseModule, SparseSequential, SparseTensor,
                     SubMConv3d, convert_spconv_weight)
from .voxels import MeanVFE, grid_size, voxelize
from .focal import FocalSparseConv
from .fusion import DeepFusion, VoxelBackBone8xFusion
from .fusion_detector import (FusionDetector, build_fusion_detector, is_fusion_config, load_focals_conv_state,
                              prepare_images)
from .image_branch import DeepLabV3Branch, ZooImageBranch, build_image_branch
from .lifting import lift

__all__ = ["voxelize", "grid_size", "MeanVFE", "SparseTensor", "SparseModule", "SubMConv3d", "SparseConv3d",
           "SparseInverseConv3d", "SparseSequential", "convert_spconv_weight", "LidarDetector",
           "build_lidar_detector", "load_config", "load_openpcdet_state", "FocalSparseConv", "DeepFusion",
           "VoxelBackBone8xFusion", "DeepLabV3Branch", "ZooImageBranch", "build_image_branch", "lift",
           "FusionDetector", "build_fusion_detector", "is_fusion_config", "prepare_images",
           "load_focals_conv_state"]

PAPER = Paper("PathFusion: Path-consistent Lidar-Camera Deep Feature Fusion", "2212.06244")

register_model(ModelCard(
    name="pathfusion_lidar_kitti", family="pathfusion", task="3d-detection", paper=PAPER,
    builder=build_lidar_detector, config={"config": "pathfusion_lidar_kitti"},
    input=InputSpec("lidar-points", (16384, 5)), license="MIT (architecture); no weights shipped",
    description="PathFusion's LiDAR branch on KITTI: OpenPCDet's VoxelBackBone8x, BEV backbone and CenterHead "
                "(Car, Pedestrian, Cyclist), in plain PyTorch.",
))
TINY_WEIGHTS = Path(__file__).parent / "weights" / "pathfusion_lidar_tiny_synthetic.safetensors"
# the shipped file's digest, checked before every load (benchmarks/train_lidar_tiny.py --install
# prints the new one to put here)
TINY_SHA256 = "8fa5c76ac81b60b69aaede7e2681ccf1ccdaf240e8710d8da5a56b4b994b1958"
register_model(ModelCard(
    name="pathfusion_lidar_tiny", family="pathfusion", task="3d-detection", paper=PAPER,
    builder=build_lidar_detector, config={"config": "pathfusion_lidar_tiny"},
    input=InputSpec("lidar-points", (8192, 5)), license="MIT",
    weights={"synthetic": WeightEntry(
        "synthetic", "package:zoo.models.pathfusion/weights/pathfusion_lidar_tiny_synthetic.safetensors",
        format="safetensors", sha256=TINY_SHA256, license="MIT",
        description="trained on 320 frames of zoo's synthetic KITTI world (benchmarks/train_lidar_tiny.py)")}
    if TINY_WEIGHTS.is_file() else {},
    default_tag="synthetic" if TINY_WEIGHTS.is_file() else None,
    description="A CPU-sized voxel detector (38 m range, 0.15 m voxels, quarter width) for the synthetic KITTI "
                "world; its weights train in an hour on two CPU cores.",
))

register_model(ModelCard(
    name="pathfusion_kitti", family="pathfusion", task="3d-detection", paper=PAPER,
    builder=build_fusion_detector, config={"config": "pathfusion_kitti"},
    input=InputSpec("lidar-camera", (16384, 5, 375, 1242)), license="MIT (architecture); no weights shipped",
    description="PathFusion on KITTI: Focals Conv-F's fused sparse backbone (its module names) with deep fusion "
                "at stages 2-4 and the path consistency loss (a reconstruction: PathFusion's code is not public; "
                "docs/pathfusion.md), BEV backbone and CenterHead, in plain PyTorch.",
))
register_model(ModelCard(
    name="pathfusion_tiny", family="pathfusion", task="3d-detection", paper=PAPER,
    builder=build_fusion_detector, config={"config": "pathfusion_tiny"},
    input=InputSpec("lidar-camera", (8192, 5, 128, 416)), license="MIT",
    description="A CPU-sized PathFusion for the synthetic KITTI world: EfficientFormerV2-S0 image branch, shallow "
                "and deep fusion with the path consistency loss (a reconstruction; docs/pathfusion.md).",
))
