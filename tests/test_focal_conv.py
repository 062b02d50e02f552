"""Focals Conv's focal sparse convolution: its key names, the foreground split and dilation
against a per-site reference written from the official code's rules, and its auxiliary loss."""
from __future__ import annotations

import itertools
from functools import partial

import pytest
import torch
import torch.nn as nn

from zoo.models.pathfusion import SparseTensor
from zoo.models.pathfusion.focal import FocalSparseConv, focal_importance_loss
from zoo.models.pathfusion.sparse import SparseModule

NORM = partial(nn.BatchNorm1d, eps=1e-3, momentum=0.01)


class Fixed(SparseModule):
    """Stands in for conv_imp: returns the given logits."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return x.replace_feature(self.logits)


class Capture(SparseModule):
    def forward(self, x):
        self.seen = x
        return x


def sites(seed=0, batch=2, shape=(6, 7, 8), n=18, channels=3):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(batch):
        flat = torch.randperm(shape[0] * shape[1] * shape[2], generator=g)[:n]
        z, y, x = flat // (shape[1] * shape[2]), (flat // shape[2]) % shape[1], flat % shape[2]
        rows.append(torch.stack([torch.full_like(z, b), z, y, x], 1))
    idx = torch.cat(rows).int()
    return SparseTensor(torch.randn(len(idx), channels, generator=g), idx, shape, batch)


def reference(x, logits, threshold=0.5):
    """The official split, dilation and merge, site by site (exact coordinates, bounds >= 0)."""
    site_imp, kernel_imp = logits[:, -1].sigmoid(), logits[:, :-1].sigmoid()
    offsets = [o for o in itertools.product((-1, 0, 1), repeat=3) if o != (0, 0, 0)]
    out = {}
    for b in range(x.batch_size):
        rows = [i for i in range(len(x.indices)) if x.indices[i, 0] == b]
        rows.sort(key=lambda i: -float(site_imp[i]))
        n_fore = int(len(rows) * threshold)
        fore, back = rows[:n_fore], rows[n_fore:]
        acc = {}
        for i in fore:
            key = tuple(x.indices[i].tolist())
            f, m = acc.get(key, (torch.zeros(x.features.shape[1]), []))
            acc[key] = (f + x.features[i], m + [1.0])
            for k, o in enumerate(offsets):
                if kernel_imp[i, k] >= threshold:
                    c = (b, *(int(x.indices[i, 1 + a]) + o[a] for a in range(3)))
                    if all(0 <= c[1 + a] < x.spatial_shape[a] for a in range(3)):
                        f, m = acc.get(c, (torch.zeros(x.features.shape[1]), []))
                        acc[c] = (f, m + [float(kernel_imp[i, k])])
        for key, (f, m) in acc.items():
            out[key] = f * (sum(m) / len(m))
        for i in back:
            key = tuple(x.indices[i].tolist())
            out[key] = out.get(key, torch.zeros(x.features.shape[1])) + x.features[i]
    return out


def test_key_names_and_shapes_are_focals_convs():
    lidar = FocalSparseConv(16, 16, voxel_stride=1, norm_fn=NORM, indice_key="focal1")
    shapes = {k: tuple(v.shape) for k, v in lidar.state_dict().items()}
    assert shapes["conv.weight"] == (16, 3, 3, 3, 16) and shapes["conv_imp.weight"] == (27, 3, 3, 3, 16)
    assert {"bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked"} <= set(shapes)
    assert not any(k.startswith("conv_enlarge") for k in shapes)
    multi = FocalSparseConv(16, 16, voxel_stride=1, norm_fn=NORM, indice_key="spconv_focal_multimodal",
                            image_channel=16, use_img=True)
    assert tuple(multi.state_dict()["conv_imp.weight"].shape) == (27, 3, 3, 3, 32)
    wide = FocalSparseConv(16, 16, 1, NORM, "f", enlarge_voxel_channels=24)
    assert tuple(wide.state_dict()["conv_enlarge.0.weight"].shape) == (24, 3, 3, 3, 16)


@pytest.mark.parametrize("seed", [0, 1])
def test_split_dilation_and_merge_follow_the_official_rules(seed):
    x = sites(seed)
    logits = torch.randn(len(x.indices), 27, generator=torch.Generator().manual_seed(seed + 10)) * 2
    layer = FocalSparseConv(3, 3, 1, NORM, "f")
    layer.conv_imp, layer.conv = Fixed(logits), Capture()
    layer.eval()(x)
    seen = layer.conv.seen
    got = {tuple(i.tolist()): f for i, f in zip(seen.indices, seen.features)}
    ref = reference(x, logits)
    assert set(got) == set(ref)
    assert len(seen.indices) > len(x.indices)  # the foreground grew
    for k in ref:
        assert torch.allclose(got[k], ref[k], atol=1e-6), k


def test_threshold_mode_and_skipping_the_mask():
    x = sites(3)
    logits = torch.full((len(x.indices), 27), -5.0)
    logits[:4, -1] = 5.0  # four confident sites; no neighbour is important
    layer = FocalSparseConv(3, 3, 1, NORM, "f", topk=False, skip_mask_kernel=True)
    layer.conv_imp, layer.conv = Fixed(logits), Capture()
    layer.eval()(x)
    seen = layer.conv.seen
    assert len(seen.indices) == len(x.indices)  # nothing added
    got = {tuple(i.tolist()): f for i, f in zip(seen.indices, seen.features)}
    assert all(torch.equal(got[tuple(i.tolist())], f) for i, f in zip(x.indices, x.features))


def test_auxiliary_loss_targets_sites_in_boxes_and_trains_the_importance():
    x = sites(4, batch=1)
    layer = FocalSparseConv(3, 4, 1, NORM, "f", voxel_size=(1.0, 1.0, 1.0), point_range_min=(0.0, 0.0, 0.0))
    # one box around the corner (x, y, z) of the first site; the padding row contains nothing
    z, y, xx = x.indices[0, 1:].float().tolist()
    gt = torch.tensor([[[xx + 0.25, y + 0.25, z + 0.25, 0.8, 0.8, 0.8, 0.0, 1.0], [0.0] * 8]])
    out, loss = layer.train()(x, gt_boxes=gt)
    imp = layer.conv_imp(x).features[:, -1].sigmoid()
    target = torch.zeros(len(x.indices), dtype=torch.bool)
    target[0] = True
    assert torch.allclose(loss, focal_importance_loss(imp, target))
    # the formula: softmax over [1 - m, m], focal weight (1 - p)^2, mean over both entries
    m = imp[0]
    p1 = torch.exp(m) / (torch.exp(1 - m) + torch.exp(m))
    term0 = -torch.log(p1) * (1 - p1) ** 2
    assert torch.allclose(focal_importance_loss(imp[:1], target[:1]), term0 / 2)
    loss.backward()
    assert layer.conv_imp.weight.grad.abs().sum() > 0
    assert out.features.shape[1] == 4 and (out.features >= 0).all()


def test_multimodal_layer_reads_the_image_before_and_after_the_conv():
    x = sites(5)
    calls = []

    def lift_fn(t):
        calls.append(len(t.indices))
        return torch.ones(len(t.indices), 3)

    layer = FocalSparseConv(3, 3, 1, NORM, "m", image_channel=3, use_img=True).eval()
    out, _ = layer(x, lift_fn=lift_fn)
    assert calls[0] == len(x.indices) and calls[1] == len(out.indices) >= len(x.indices)
    with pytest.raises(ValueError, match="lift_fn"):
        layer(x)
