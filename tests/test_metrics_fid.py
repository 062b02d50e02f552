"""FID and KID through torchmetrics against an independent scipy/numpy computation."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from zoo.errors import ConfigError, MissingAssetError
from zoo.metrics.fid import SmallFeatureNet, fid_kid, inception_features


def _sets():
    g = torch.Generator().manual_seed(0)
    real = torch.rand(40, 3, 24, 24, generator=g)
    fake = (torch.rand(32, 3, 24, 24, generator=g) * 0.7 + 0.1).clamp(0, 1)
    return real, fake


def _reference(fr: np.ndarray, ff: np.ndarray, size: int, subsets: int, seed: int):
    mu1, mu2 = fr.mean(0), ff.mean(0)
    s1, s2 = np.cov(fr, rowvar=False), np.cov(ff, rowvar=False)
    fid = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    torch.manual_seed(seed)  # the same subsets as the metric draws
    d, scores = fr.shape[1], []
    for _ in range(subsets):
        x = fr[torch.randperm(len(fr))[:size].numpy()]
        y = ff[torch.randperm(len(ff))[:size].numpy()]
        kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3), ((y @ y.T / d + 1) ** 3), ((x @ y.T / d + 1) ** 3)
        m = size
        mmd = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.mean()
        scores.append(mmd)
    return fid, float(np.mean(scores))


def test_fid_and_kid_equal_a_scipy_computation_on_the_same_features():
    real, fake = _sets()
    net = SmallFeatureNet().eval()
    with torch.no_grad():
        fr, ff = net(real).double().numpy(), net(fake).double().numpy()
    out = fid_kid(real, fake, net, subsets=20, seed=5)
    assert out["subset_size"] == 32  # adapted to the smaller set, not torchmetrics' 1000
    fid, kid = _reference(fr, ff, 32, 20, 5)
    assert abs(out["fid"] - fid) < 1e-6 * max(1, abs(fid))
    assert abs(out["kid"] - kid) < 1e-6 * max(1, abs(kid))
    again = fid_kid(real, fake, net, subsets=20, seed=5)
    assert again["kid"] == out["kid"]  # seeded subsets
    same = fid_kid(real, real.flip(0), net, subsets=20)
    assert same["fid"] < 1e-6 < out["fid"]


def test_the_feature_net_is_fixed_and_bad_sizes_are_config_errors():
    real, fake = _sets()
    assert torch.equal(SmallFeatureNet()(real[:2]), SmallFeatureNet()(real[:2]))
    with pytest.raises(ConfigError):
        fid_kid(real, fake, subset_size=33)
    with pytest.raises(ConfigError):
        fid_kid(real[:, :2], fake)


def test_inception_needs_a_local_file_and_says_where(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_HOME", str(tmp_path))
    with pytest.raises(MissingAssetError) as err:
        inception_features()
    assert "pt_inception-2015-12-05-6726825d.pth" in str(err.value) and str(tmp_path / "inception") in str(err.value)
