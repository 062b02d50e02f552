"""PathFusion's house: voxels, sparse convolution, the voxel LiDAR detector (and, next, the
camera branch and its fusion).

- `voxels`: `voxelize` (spconv's PointToVoxel arithmetic) and the mean VFE;
- `sparse`: `SparseTensor`, `SubMConv3d`, `SparseConv3d`, `SparseInverseConv3d` in plain PyTorch.
"""
from .sparse import (SparseConv3d, SparseInverseConv3d, SparseModule, SparseSequential, SparseTensor,
                     SubMConv3d, convert_spconv_weight)
from .voxels import MeanVFE, grid_size, voxelize

__all__ = ["voxelize", "grid_size", "MeanVFE", "SparseTensor", "SparseModule", "SubMConv3d", "SparseConv3d",
           "SparseInverseConv3d", "SparseSequential", "convert_spconv_weight"]
