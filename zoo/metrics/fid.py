"""FID and KID between image sets, through torchmetrics, with a pluggable feature network.

- ``fid``: Fréchet distance between Gaussians fitted to the two sets' features (Heusel et al.,
  2017): ``|mu_r - mu_f|^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2))``, covariances with ``n - 1``.
- ``kid``: the unbiased squared MMD with the cubic polynomial kernel ``(x.y / d + 1)^3``
  (Bińkowski et al., 2018), averaged over ``subsets`` random subsets of ``subset_size`` images
  of each set; ``kid_std`` is their spread. The subset size is ``min(1000, n_real, n_fake)``
  unless given (torchmetrics' fixed 1000 fails on small sets), and the subsets are drawn from a
  generator seeded by ``seed``, so the figure repeats.

Images are ``[N, 3, H, W]`` floats in ``[0, 1]``. Features come from ``features``, any module
mapping such a batch to ``[B, F]``: `SmallFeatureNet` (fixed random convolutional features,
made here, for tests and the demo; its figures compare runs of this project only) or
`inception_features` (the standard InceptionV3 ``pool3`` features through torch-fidelity,
from a local weights file only: nothing is downloaded).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.errors import ConfigError, MissingAssetError

__all__ = ["fid_kid", "SmallFeatureNet", "inception_features", "INCEPTION_FILE"]

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"


class SmallFeatureNet(nn.Module):
    """Four strided 3x3 convolutions with fixed random weights (seeded; He-scaled, ReLU) on images
    resized to ``size``, mean- and max-pooled to ``num_features`` values. Never trained: the same
    seed gives the same features everywhere."""

    def __init__(self, num_features: int = 64, size: int = 64, seed: int = 0):
        super().__init__()
        if num_features % 2:
            raise ConfigError("num_features must be even (mean- and max-pooled halves)")
        g = torch.Generator().manual_seed(seed)
        widths = [3, 16, 32, 48, num_features // 2]
        self.weights = nn.ParameterList(
            nn.Parameter(torch.randn(b, a, 3, 3, generator=g) * (2 / (9 * a)) ** 0.5, requires_grad=False)
            for a, b in zip(widths[:-1], widths[1:]))
        self.size, self.num_features = size, num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.float(), size=(self.size, self.size), mode="bilinear", align_corners=False,
                          antialias=True)
        x = x * 2 - 1
        for w in self.weights:
            x = F.relu(F.conv2d(x, w, stride=2, padding=1))
        return torch.cat([x.mean((2, 3)), x.amax((2, 3))], 1)


def inception_features(path: str | os.PathLike | None = None) -> nn.Module:
    """torch-fidelity's InceptionV3 (``pool3``, 2048 features) from a local weights file: ``path``,
    else ``$ZOO_HOME/inception/`` + `INCEPTION_FILE`. Takes ``[B, 3, H, W]`` in ``[0, 1]``."""
    home = Path(os.environ.get("ZOO_HOME", Path.home() / ".cache" / "zoo"))
    file = Path(path) if path else home / "inception" / INCEPTION_FILE
    if not file.is_file():
        raise MissingAssetError(
            f"FID with Inception needs its weights, {INCEPTION_FILE} (torch-fidelity's port of the TF-Slim "
            f"InceptionV3, from its GitHub releases); put it at {file} or pass --inception FILE. "
            "Nothing is downloaded; --features small uses the project's own small network.")
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError:
        raise MissingAssetError("Inception features need torch-fidelity: pip install torch-fidelity") from None
    return _Inception(FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                  feature_extractor_weights_path=str(file)))


class _Inception(nn.Module):
    num_features = 2048

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.clamp(0, 1) * 255).round().to(torch.uint8)  # its input: uint8 RGB
        return self.net(x)[0].reshape(len(images), -1)


@torch.no_grad()
def _features(images: torch.Tensor, net: nn.Module, batch_size: int) -> torch.Tensor:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ConfigError(f"FID/KID take images [N, 3, H, W] in [0, 1], not {tuple(images.shape)}")
    return torch.cat([net(images[i:i + batch_size]).double() for i in range(0, len(images), batch_size)])


class _Precomputed(nn.Module):
    """Passes features through: the metric objects then see features, not images."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@torch.no_grad()
def fid_kid(real: torch.Tensor, fake: torch.Tensor, features: nn.Module | None = None,
            subset_size: int | None = None, subsets: int = 100, seed: int = 0, batch_size: int = 64) -> dict:
    """``{"fid", "kid", "kid_std", "subset_size", "num_real", "num_fake"}`` for image sets ``real`` and
    ``fake`` ``[N, 3, H, W]`` (module docstring). ``features`` defaults to `SmallFeatureNet`."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    if len(real) < 2 or len(fake) < 2:
        raise ConfigError(f"FID/KID need at least 2 images in each set, got {len(real)} and {len(fake)}")
    net = (features or SmallFeatureNet()).eval()
    fr, ff = _features(real, net, batch_size), _features(fake, net, batch_size)
    size = min(1000, len(fr), len(ff)) if subset_size is None else subset_size
    if not 2 <= size <= min(len(fr), len(ff)):
        raise ConfigError(f"the KID subset size must be between 2 and the smaller set ({min(len(fr), len(ff))}), "
                          f"not {size}")
    passthrough = _Precomputed(fr.shape[1])
    with warnings.catch_warnings():  # its note that KID keeps every feature: these sets are small
        warnings.simplefilter("ignore", UserWarning)
        fid = FrechetInceptionDistance(feature=passthrough, reset_real_features=True).double()
        kid = KernelInceptionDistance(feature=passthrough, subsets=subsets, subset_size=size).double()
    for metric in (fid, kid):
        metric.update(fr, real=True)
        metric.update(ff, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std), "subset_size": size,
            "num_real": len(fr), "num_fake": len(ff)}
