"""zoo.metrics.pointcloud against independent computations."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from zoo.errors import DataError
from zoo.metrics import chamfer_distance, compute_all_metrics, emd, jsd, mmd_cov, one_nna


def brute_chamfer(x, y, squared):
    total = []
    for a, b in zip(x.double().numpy(), y.double().numpy()):
        d = np.array([[np.sum((p - q) ** 2) for q in b] for p in a])
        if not squared:
            d = np.sqrt(d)
        total.append(d.min(1).mean() + d.min(0).mean())
    return torch.tensor(total)


@pytest.mark.parametrize("squared", [True, False])
def test_chamfer_matches_brute_force(squared):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 17, 3, generator=g), torch.randn(3, 23, 3, generator=g)
    torch.testing.assert_close(chamfer_distance(x, y, squared=squared).double(),
                               brute_chamfer(x, y, squared), rtol=1e-5, atol=1e-6)
    assert chamfer_distance(x, x).abs().max() == 0
    # chunking does not change the result
    torch.testing.assert_close(chamfer_distance(x, y, chunk=1), chamfer_distance(x, y))


@pytest.mark.parametrize("squared", [True, False])
def test_exact_emd_matches_every_permutation(squared):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 6, 3, generator=g), torch.randn(2, 6, 3, generator=g)
    best = []
    for a, b in zip(x.double(), y.double()):
        d = ((a[:, None] - b[None]) ** 2).sum(-1)
        if not squared:
            d = d.sqrt()
        best.append(min(d[list(range(6)), list(p)].mean().item() for p in itertools.permutations(range(6))))
    torch.testing.assert_close(emd(x, y, exact=True, squared=squared).double(), torch.tensor(best, dtype=torch.float64),
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("squared", [True, False])
def test_sinkhorn_emd_gap_to_exact_is_small(squared):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 128, 3, generator=g)
    y = torch.randn(4, 128, 3, generator=g) * 0.8 + 0.3
    exact = emd(x, y, exact=True, squared=squared)
    approx = emd(x, y, exact=False, squared=squared)
    gap = ((approx - exact) / exact).max().item()
    low = ((approx - exact) / exact).min().item()
    assert low >= -1e-6 and gap < (0.05 if squared else 0.02), (low, gap)  # a feasible plan: never below the optimum
    # a matching cost, not Chamfer: a cloud against a shuffled copy of itself is ~0
    perm = x[:, torch.randperm(128, generator=g)]
    assert emd(x, perm, squared=squared).max() < 0.02 * exact.min()


def test_emd_gradients_pull_clouds_together():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 32, 3, generator=g, requires_grad=True)
    y = torch.randn(1, 32, 3, generator=g) + 1.0
    for exact in (True, False):
        d = emd(x, y, exact=exact)
        (grad,) = torch.autograd.grad(d.sum(), x)
        with torch.no_grad():
            assert emd(x - 0.1 * grad, y, exact=True) < emd(x, y, exact=True)


def test_one_nna_on_hand_made_sets():
    def d(a, b):  # 1-point clouds on a line
        return torch.tensor([[abs(p - q) for q in b] for p in a], dtype=torch.float64)

    def nna(refs, samples):
        return one_nna(d(refs, refs), d(refs, samples), d(samples, samples))

    assert nna([0, 1], [10, 11]) == 1.0  # separable
    assert nna([0, 10], [1, 11]) == 0.0  # every nearest neighbour has the other label
    assert nna([0, 1, 10], [11, 20, 21]) == pytest.approx(4 / 6)
    # through compute_all_metrics: duplicates of the refs are each other's nearest neighbours
    pts = torch.tensor([[[0.0, 0, 0]], [[0.3, 0, 0]], [[0, 0.2, 0]]])
    m = compute_all_metrics(pts.clone(), pts, emd_exact=True)
    assert m["1-NNA-CD"] == 0.0 and m["1-NNA-EMD"] == 0.0
    assert m["MMD-CD"] == 0.0 and m["COV-CD"] == 1.0 and m["COV-EMD"] == 1.0
    assert m["JSD"] == pytest.approx(0.0, abs=1e-12)
    assert set(m) == {"MMD-CD", "MMD-EMD", "COV-CD", "COV-EMD", "1-NNA-CD", "1-NNA-EMD", "JSD"}
    # Chamfer only: the same Chamfer figures, no EMD entries
    g = torch.Generator().manual_seed(3)
    samples, refs = torch.randn(5, 16, 3, generator=g), torch.randn(4, 16, 3, generator=g)
    full = compute_all_metrics(samples, refs, emd_exact=True)
    cd = compute_all_metrics(samples, refs, include_emd=False)
    assert cd == {k: v for k, v in full.items() if "EMD" not in k}


def test_mmd_and_cov_definitions():
    # rows: samples, cols: refs
    dist = torch.tensor([[1.0, 5.0, 9.0], [2.0, 4.0, 8.0]])
    mmd, cov = mmd_cov(dist)
    assert mmd == pytest.approx((1 + 4 + 8) / 3)  # per ref, nearest sample
    assert cov == pytest.approx(1 / 3)  # both samples' nearest ref is ref 0


def test_jsd_against_a_brute_force_histogram():
    g = np.random.default_rng(4)
    a = g.uniform(-0.45, 0.45, size=(3, 50, 3))
    b = g.normal(0, 0.15, size=(2, 50, 3)).clip(-0.5, 0.5)
    axis = np.arange(28) / 27 - 0.5
    grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    grid = grid[np.linalg.norm(grid, axis=1) <= 0.5]

    def hist(c):
        idx = [np.argmin(((grid - p) ** 2).sum(1)) for p in c.reshape(-1, 3)]
        return np.bincount(idx, minlength=len(grid)) / len(idx)

    p, q = hist(a), hist(b)
    m = (p + q) / 2
    kl = lambda u, v: np.sum(u[u > 0] * np.log2(u[u > 0] / v[u > 0]))  # noqa: E731
    expect = 0.5 * kl(p, m) + 0.5 * kl(q, m)
    assert jsd(torch.tensor(a), torch.tensor(b)) == pytest.approx(expect, rel=1e-9)
    far = torch.full((1, 10, 3), 0.25)
    assert jsd(far, -far) == pytest.approx(1.0)  # disjoint support: 1 bit


def test_bad_input():
    with pytest.raises(DataError, match="equal size"):
        emd(torch.zeros(1, 4, 3), torch.zeros(1, 5, 3))
    with pytest.raises(DataError, match=r"\[B,N,D\]"):
        chamfer_distance(torch.zeros(4, 3), torch.zeros(4, 3))
    with pytest.raises(DataError, match="same N"):
        compute_all_metrics(torch.zeros(2, 4, 3), torch.zeros(2, 5, 3))
