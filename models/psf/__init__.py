"""PSF: point cloud generation with straight flows (arXiv 2212.01747), on a pure-PyTorch PVCNN2."""
from .pvcnn import PVCNN2, PVCNN2Config

__all__ = ["PVCNN2", "PVCNN2Config"]
