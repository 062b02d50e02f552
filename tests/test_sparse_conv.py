"""Sparse convolution in plain PyTorch against dense conv3d, and the voxelizer against the
first-occurrence rule of spconv's PointToVoxel."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from zoo.errors import ConfigError, WeightsError
from zoo.models.pathfusion import (MeanVFE, SparseConv3d, SparseInverseConv3d, SparseSequential, SparseTensor,
                                   SubMConv3d, convert_spconv_weight, voxelize)

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "kitti" / "training" / "velodyne" / "000008.bin"
LAYERS = [("subm", 1, 1), ("conv", 1, 0), ("conv", 1, 1), ("conv", 2, 0), ("conv", 2, 1)]


def random_sparse(seed=0, batch=2, channels=3, shape=(7, 8, 9), density=0.15, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(batch, channels, *shape, generator=g, dtype=dtype)
    dense = dense * (torch.rand(batch, 1, *shape, generator=g) < density)
    return dense, SparseTensor.from_dense(dense)


def at_sites(dense, indices):
    i = indices.long()
    return dense.permute(0, 2, 3, 4, 1)[i[:, 0], i[:, 1], i[:, 2], i[:, 3]]


def build(kind, stride, padding, cin=3, cout=4):
    if kind == "subm":
        return SubMConv3d(cin, cout, 3, indice_key="s").double()
    return SparseConv3d(cin, cout, 3, stride=stride, padding=padding, indice_key="k").double()


@pytest.mark.parametrize("kind,stride,padding", LAYERS)
def test_values_and_gradients_equal_dense_conv3d(kind, stride, padding):
    dense, x = random_sparse()
    layer = build(kind, stride, padding)
    feats = x.features.clone().requires_grad_(True)
    y = layer(SparseTensor(feats, x.indices, x.spatial_shape, x.batch_size))
    w = layer.weight.permute(0, 4, 1, 2, 3)  # spconv 2.x [Cout, k, k, k, Cin] -> conv3d's
    dd = dense.clone().requires_grad_(True)
    ref = F.conv3d(dd, w, layer.bias, stride=stride, padding=1 if kind == "subm" else padding)
    assert tuple(y.spatial_shape) == tuple(ref.shape[2:])
    assert torch.allclose(y.features, at_sites(ref, y.indices), atol=1e-12)
    g = torch.randn_like(y.features)
    (y.features * g).sum().backward()
    grad_dense = y.replace_feature(g).dense()  # the same gradient placed at the output sites
    w_grad_sparse = layer.weight.grad.clone()
    layer.weight.grad = None
    (ref * grad_dense).sum().backward()
    assert torch.allclose(feats.grad, at_sites(dd.grad, x.indices), atol=1e-12)
    assert torch.allclose(w_grad_sparse, layer.weight.grad, atol=1e-10)
    if kind == "subm":
        assert torch.equal(y.indices, x.indices)


@pytest.mark.parametrize("stride,padding", [(1, 0), (1, 1), (2, 0), (2, 1)])
def test_output_sites_follow_spconvs_rule(stride, padding):
    dense, x = random_sparse(seed=1, shape=(9, 10, 11), density=0.1)
    y = SparseConv3d(3, 4, 3, stride=stride, padding=padding).double()(x)
    # a site wherever the window holds an active input: the occupancy convolved with ones
    occ = (dense != 0).any(1, keepdim=True).double()
    rule = F.conv3d(occ, torch.ones(1, 1, 3, 3, 3, dtype=torch.float64), stride=stride, padding=padding)[:, 0] > 0
    assert set(map(tuple, rule.nonzero().tolist())) == set(map(tuple, y.indices.tolist()))
    assert len(y.indices) == int(rule.sum())


@pytest.mark.parametrize("stride,padding", [(1, 0), (1, 1), (2, 0), (2, 1)])
def test_inverse_conv_is_the_transpose_at_the_forward_inputs(stride, padding):
    dense, x = random_sparse(seed=2)
    down = SparseConv3d(3, 4, 3, stride=stride, padding=padding, indice_key="d").double()
    up = SparseInverseConv3d(4, 5, 3, indice_key="d").double()
    y = down(x)
    feats = y.features.detach().clone().requires_grad_(True)
    z = up(SparseTensor(feats, y.indices, y.spatial_shape, y.batch_size, y.rules))
    assert torch.equal(z.indices, x.indices) and tuple(z.spatial_shape) == tuple(x.spatial_shape)
    out_pad = tuple(s - ((o - 1) * stride - 2 * padding + 3) for s, o in zip(x.spatial_shape, y.spatial_shape))
    yd = y.dense().detach().requires_grad_(True)
    ref = F.conv_transpose3d(yd, up.weight.permute(4, 0, 1, 2, 3), up.bias, stride=stride, padding=padding,
                             output_padding=out_pad)
    assert torch.allclose(z.features, at_sites(ref, x.indices), atol=1e-12)
    g = torch.randn_like(z.features)
    (z.features * g).sum().backward()
    (ref * z.replace_feature(g).dense()).sum().backward()
    assert torch.allclose(feats.grad, at_sites(yd.grad, y.indices), atol=1e-12)


def _sorted_by_site(t: SparseTensor):
    key = t.indices.long() @ torch.tensor([10**9, 10**6, 10**3, 1])
    order = key.argsort()
    return t.indices[order], t.features[order]


@pytest.mark.parametrize("threads", [1, 2])
def test_results_do_not_depend_on_input_order_or_threads(threads):
    _, x = random_sparse(seed=3, shape=(12, 14, 16), density=0.2, dtype=torch.float32)
    torch.manual_seed(0)
    net = SparseSequential(SubMConv3d(3, 8, 3, indice_key="a"), torch.nn.ReLU(),
                           SparseConv3d(8, 8, 3, stride=2, padding=1, indice_key="b"),
                           SubMConv3d(8, 8, 3, indice_key="c"),
                           SparseInverseConv3d(8, 4, 3, indice_key="b"))
    perm = torch.randperm(len(x.indices), generator=torch.Generator().manual_seed(4))
    feats = x.features.clone().requires_grad_(True)
    shuffled_feats = x.features[perm].clone().requires_grad_(True)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        y = net(SparseTensor(feats, x.indices, x.spatial_shape, x.batch_size))
        (y.features ** 2).sum().backward()
        ref = _sorted_by_site(y)
        torch.set_num_threads(threads)
        y = net(SparseTensor(shuffled_feats, x.indices[perm], x.spatial_shape, x.batch_size))
        (y.features ** 2).sum().backward()
        got = _sorted_by_site(y)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(ref[0], got[0])
    # bitwise, values and input gradients: each site's sum runs in one fixed order
    assert torch.equal(shuffled_feats.grad, feats.grad[perm])
    assert torch.equal(ref[1], got[1])


def test_rules_are_cached_by_indice_key():
    _, x = random_sparse(seed=5)
    a, b = SubMConv3d(3, 3, 3, indice_key="k1"), SubMConv3d(3, 3, 3, indice_key="k1")
    y = a(x.replace_feature(x.features.float()))
    first = x.rules[("subm", "k1", (3, 3, 3))]
    b(y)
    assert x.rules[("subm", "k1", (3, 3, 3))] is first and y.rules is x.rules


def test_spconv_weight_layouts_load():
    layer = SubMConv3d(3, 5, 3, bias=False)
    w2 = torch.randn(5, 3, 3, 3, 3)  # spconv 2.2+: [Cout, k, k, k, Cin]
    v1 = w2.permute(1, 2, 3, 4, 0)  # 1.x: [k, k, k, Cin, Cout]
    v20 = w2.permute(1, 2, 3, 0, 4)  # 2.0/2.1: [k, k, k, Cout, Cin]
    for w in (w2, v1, v20):
        layer.load_state_dict({"weight": w.clone()})
        assert torch.equal(layer.weight.data, w2)
    assert torch.equal(convert_spconv_weight(v1, 3, 5, (3, 3, 3)), w2)
    with pytest.raises(WeightsError, match=r"\(4, 4\)"):
        layer.load_state_dict({"weight": torch.zeros(4, 4)})


def test_an_empty_grid_passes_through_every_layer_with_gradients():
    """A frame with no points in range: every layer returns no sites, and backward still runs."""
    empty = SparseTensor(torch.zeros(0, 3, dtype=torch.float64, requires_grad=True),
                         torch.zeros(0, 4, dtype=torch.int32), (5, 6, 7), 1)
    net = SparseSequential(SubMConv3d(3, 4, 3, indice_key="a"), SparseConv3d(4, 4, 3, stride=2, indice_key="b"),
                           SparseInverseConv3d(4, 2, 3, indice_key="b")).double()
    y = net(empty)
    assert y.features.shape == (0, 2) and y.indices.shape == (0, 4) and tuple(y.spatial_shape) == (5, 6, 7)
    y.features.sum().backward()
    assert all(p.grad is not None and not p.grad.any() for p in net.parameters())


def test_bad_configurations():
    _, x = random_sparse(seed=6)
    with pytest.raises(ConfigError, match="no SparseConv3d"):
        SparseInverseConv3d(3, 3, 3, indice_key="nope").double()(x)
    with pytest.raises(ConfigError, match="leaves no output"):
        SparseConv3d(3, 3, 9, stride=1).double()(x)
    with pytest.raises(ConfigError, match=r"\[N, 4\]"):
        SparseTensor(torch.zeros(3, 2), torch.zeros(3, 3, dtype=torch.int32), (4, 4, 4), 1)


# ----------------------------------------------------------------------------- voxels

def first_occurrence_reference(points, voxel_size, point_range, max_points, max_voxels):
    """The rule written as a loop over points in order."""
    lo = np.array(point_range[:3], np.float32)
    vs = np.array(voxel_size, np.float32)
    grid = np.array([round((point_range[i + 3] - point_range[i]) / voxel_size[i]) for i in range(3)])
    cells = np.floor((points[:, :3] - lo) / vs).astype(np.int64)
    members: dict = {}
    order = []
    for i, c in enumerate(cells):
        if (c < 0).any() or (c >= grid).any():
            continue
        k = tuple(c)
        if k not in members:
            if len(order) >= max_voxels:
                continue
            members[k] = []
            order.append(k)
        if len(members[k]) < max_points:
            members[k].append(i)
    return order, members


def check_against_reference(points, vs, pr, p, m):
    voxels, coords, num = voxelize(torch.from_numpy(points), vs, pr, p, m)
    order, members = first_occurrence_reference(points, vs, pr, p, m)
    assert coords.dtype == torch.int32 and coords.shape == (len(order), 3)
    assert coords.tolist() == [[k[2], k[1], k[0]] for k in order]  # z, y, x in first-occurrence order
    assert num.tolist() == [len(members[k]) for k in order]
    for j, k in enumerate(order):
        assert np.array_equal(voxels[j, :len(members[k])].numpy(), points[members[k]])
        assert not voxels[j, len(members[k]):].any()
    return voxels, coords, num


@pytest.mark.skipif(not REAL.is_file(), reason="the real KITTI frame (../shared/data/kitti) is absent")
def test_voxelizer_on_the_real_frame_equals_first_occurrence():
    from zoo.data.kitti import read_points

    pts = read_points(REAL)
    vs, pr = [0.05, 0.05, 0.1], [0, -40, -3, 70.4, 40, 1]
    _, coords, _ = check_against_reference(pts, vs, pr, 5, 16000)
    assert len(coords) > 10000
    # the arithmetic matters: float64 puts points of this frame in other voxels
    c64 = np.floor((pts[:, :3].astype(np.float64) - np.array(pr[:3])) / np.array(vs))
    c32 = np.floor((pts[:, :3] - np.array(pr[:3], np.float32)) / np.array(vs, np.float32))
    assert (c64 != c32).any()


def test_voxelizer_limits_and_mean_vfe():
    rng = np.random.default_rng(0)
    pts = np.concatenate([rng.uniform([-1, -1, -1], [5, 5, 3], (3000, 3)), rng.normal(size=(3000, 1))], 1).astype(np.float32)
    vs, pr = [0.5, 0.5, 0.5], [0, 0, 0, 4, 4, 2]
    voxels, coords, num = check_against_reference(pts, vs, pr, 3, 50)  # both caps bind
    assert len(coords) == 50 and num.max() == 3
    voxels, coords, num = check_against_reference(pts, vs, pr, 100, 10**6)
    assert (num > 3).any()
    mean = MeanVFE(4)(voxels, num)
    j = 7
    assert torch.allclose(mean[j], voxels[j, : num[j]].mean(0))
