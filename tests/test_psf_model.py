"""PSF's PVCNN2: the pure-PyTorch point ops against brute-force loops, and the network's structure."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from zoo.models.psf import PVCNN2, PVCNN2Config
from zoo.models.psf import point_ops as P
from tests.helpers import tiny_config


def cloud(b=2, n=64, seed=0):
    return torch.randn(b, 3, n, generator=torch.Generator().manual_seed(seed))


def test_voxelize_averages_the_points_of_each_voxel():
    coords = cloud()
    feats = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    r = 4
    vc = P.normalize_voxel_coords(coords, r)
    assert vc.min() >= 0 and vc.max() <= r - 1
    # scale-free: the normalization divides by the cloud's own radius
    torch.testing.assert_close(P.normalize_voxel_coords(coords * 7 + 3, r), vc)
    grid = P.avg_voxelize(feats, vc, r)
    for b in range(2):
        cells = {}
        for i in range(64):
            key = tuple(int(v) for v in torch.round(vc[b, :, i]))
            cells.setdefault(key, []).append(feats[b, :, i])
        for (x, y, z), members in cells.items():
            torch.testing.assert_close(grid[b, :, x, y, z], torch.stack(members).mean(0))
        assert (grid[b].abs().sum(0) > 0).sum() == len(cells)  # every other voxel is empty


def test_trilinear_devoxelize_interpolates_corners():
    r = 3
    grid = torch.randn(1, 2, r, r, r, generator=torch.Generator().manual_seed(2))
    pts = torch.tensor([[[0.0, 1.25, 2.0], [0.0, 0.5, 2.0], [0.0, 1.75, 2.0]]])  # [1,3,3]
    out = P.trilinear_devoxelize(grid, pts, r)
    torch.testing.assert_close(out[0, :, 0], grid[0, :, 0, 0, 0])
    torch.testing.assert_close(out[0, :, 2], grid[0, :, 2, 2, 2])  # the upper corner clamps
    x, y, z = 1.25, 0.5, 1.75
    expect = 0
    for ix, wx in ((1, 0.75), (2, 0.25)):
        for iy, wy in ((0, 0.5), (1, 0.5)):
            for iz, wz in ((1, 0.25), (2, 0.75)):
                expect = expect + grid[0, :, ix, iy, iz] * wx * wy * wz
    torch.testing.assert_close(out[0, :, 1], expect)


def naive_fps(pts, m):
    chosen = [0]
    dist = np.full(len(pts), np.inf)
    for _ in range(1, m):
        dist = np.minimum(dist, ((pts - pts[chosen[-1]]) ** 2).sum(1))
        chosen.append(int(np.argmax(dist)))
    return chosen


def test_furthest_point_sample_matches_the_greedy_definition():
    coords = cloud(2, 100, seed=3)
    got = P.furthest_point_sample(coords, 17)
    for b in range(2):
        idx = naive_fps(coords[b].T.double().numpy(), 17)
        torch.testing.assert_close(got[b], coords[b][:, idx])


def test_ball_query_takes_the_first_points_in_range():
    coords = cloud(1, 80, seed=4)
    centers = coords[:, :, :6]
    idx = P.ball_query(centers, coords, radius=1.0, num_neighbors=5)
    for m in range(6):
        d = ((coords[0] - centers[0, :, m:m + 1]) ** 2).sum(0)
        inside = [i for i in range(80) if d[i] < 1.0][:5]
        expect = inside + [inside[0]] * (5 - len(inside))
        assert idx[0, m].tolist() == expect
    far = torch.full((1, 3, 1), 100.0)
    assert P.ball_query(far, coords, 0.1, 4).tolist() == [[[0, 0, 0, 0]]]


def test_three_nn_interpolation_weights_by_inverse_squared_distance():
    pts, ctr = cloud(1, 10, seed=5), cloud(1, 7, seed=6)
    feats = torch.randn(1, 4, 7, generator=torch.Generator().manual_seed(7))
    out = P.three_nn_interpolate(pts, ctr, feats)
    for j in range(10):
        d = ((ctr[0] - pts[0, :, j:j + 1]) ** 2).sum(0)
        near = d.argsort()[:3]
        w = 1 / d[near]
        torch.testing.assert_close(out[0, :, j], (feats[0][:, near] * (w / w.sum())).sum(1))
    # a point on a centre takes that centre's features
    torch.testing.assert_close(P.three_nn_interpolate(ctr[:, :, :1], ctr, feats)[0, :, 0], feats[0, :, 0])


def test_pvcnn2_has_pvd_structure_and_keys():
    m = PVCNN2(PVCNN2Config())
    keys = set(m.state_dict())
    # SA stage 1: two PVConvs then the SA module; later stages: one PVConv (the original's quirk)
    assert "sa_layers.0.1.voxel_layers.0.weight" in keys and "sa_layers.0.2.mlps.0.layers.0.weight" in keys
    assert "sa_layers.1.0.voxel_layers.0.weight" in keys and "sa_layers.1.1.mlps.0.layers.0.weight" in keys
    assert not any(k.startswith("sa_layers.1.2") for k in keys)
    assert "sa_layers.3.mlps.0.layers.0.weight" in keys  # no conv in the last stage
    # voxel attention only in SA stage 2; global attention at the bottleneck
    assert {k for k in keys if k.endswith(".q.weight")} == {"sa_layers.1.0.voxel_layers.6.q.weight",
                                                             "global_att.q.weight"}
    # channel bookkeeping: input widths of the first layers of each FP stage
    assert m.state_dict()["fp_layers.0.0.mlp.layers.0.weight"].shape[1] == 512 + 256 + 64
    assert m.state_dict()["fp_layers.3.0.mlp.layers.0.weight"].shape[1] == 128 + 0 + 64
    assert m.state_dict()["sa_layers.1.0.voxel_layers.0.weight"].shape[1] == 64 + 64  # features + time
    assert m.state_dict()["classifier.2.weight"].shape == (3, 128, 1)


def test_tiny_pvcnn2_forward_backward_and_time_conditioning():
    torch.manual_seed(0)
    m = PVCNN2(tiny_config()).eval()
    x = torch.randn(2, 128, 3)
    t = torch.tensor([0.1, 0.9])
    y = m(x, t)
    assert y.shape == (2, 128, 3) and torch.isfinite(y).all()
    # the time matters, and each cloud is processed independently of the batch
    assert not torch.allclose(m(x, t.flip(0))[0], y[0])
    torch.testing.assert_close(m(x[1:], t[1:]), y[1:], atol=1e-5, rtol=1e-4)
    m.train()
    loss = m(x, t).pow(2).mean()
    loss.backward()
    grads = [p.grad for p in m.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    # the original forward (channels first, pre-scaled time) is the same function
    m.eval()
    torch.testing.assert_close(m.forward_channels_first(x.transpose(1, 2), t * 999).transpose(1, 2), m(x, t))


@pytest.mark.parametrize("grouping", ["ball", "knn"])
def test_grouping_option(grouping):
    m = PVCNN2(tiny_config().replace(grouping=grouping)).eval()
    assert m(torch.randn(1, 128, 3), torch.tensor([0.5])).shape == (1, 128, 3)


def test_flattened_group_norm_equals_torch_group_norm_on_voxel_grids():
    from zoo.models.psf.pvcnn import GroupNorm

    g = torch.Generator().manual_seed(4)
    ours, ref = GroupNorm(4, 16), torch.nn.GroupNorm(4, 16)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(16, generator=g))
        ours.bias.copy_(torch.randn(16, generator=g))
    ref.load_state_dict(ours.state_dict())  # same keys
    for shape in ((2, 16, 5, 6, 7), (2, 16, 9, 4), (2, 16, 11)):
        x = torch.randn(shape, generator=g) * 3 + 1
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
