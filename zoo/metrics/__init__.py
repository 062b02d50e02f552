"""Evaluation metrics (imports core modules only).

- `zoo.metrics.classification`: top-1/top-5 accuracy and cross-entropy as summable counts;
- `zoo.metrics.pointcloud`: Chamfer, EMD, MMD/COV/1-NNA/JSD.
"""
from .classification import classification_sums, summarize
from .pointcloud import chamfer_distance, compute_all_metrics, emd, jsd, mmd_cov, one_nna, pairwise_distances

__all__ = ["chamfer_distance", "emd", "pairwise_distances", "mmd_cov", "one_nna", "jsd",
           "compute_all_metrics", "classification_sums", "summarize"]
