"""Model definitions, one module per family; importing this registers them all.

Installed as ``zoo.models``. Shared building blocks live in `zoo.models.layers`.
"""
if __name__ != "zoo.models":  # the folder is importable from the repo root; one copy only
    raise ImportError(f"{__name__!r} is zoo's models/ folder imported under its bare name, which would make a "
                      "second copy of every module in it; import zoo.models instead.")

from zoo.models import efficientformer  # noqa: F401  (registers efficientformer_l1/l3/l7)
from zoo.models import efficientformer_supernet  # noqa: F401  (registers efficientformer_supernet)
from zoo.models import efficientformer_v2  # noqa: F401  (registers efficientformerv2_s0/s1/s2/l)
from zoo.models import efficientvit  # noqa: F401  (registers efficientvit_m0..m5)
from zoo.models import pathfusion  # noqa: F401  (registers pathfusion_lidar_kitti/tiny, pathfusion_kitti/tiny)
from zoo.models import lsv  # noqa: F401  (registers lsv_mannequin, lsv_smpl)
from zoo.models import psf  # noqa: F401  (registers psf_airplane/chair/car/tiny)
from zoo.models.efficientformer import EfficientFormer
from zoo.models.efficientformer_v2 import EfficientFormerV2
from zoo.models.efficientvit import EfficientVit
from zoo.models.psf import PSF

__all__ = ["EfficientFormer", "EfficientFormerV2", "EfficientVit", "PSF"]
