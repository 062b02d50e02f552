"""The fused sparse backbone: Focals Conv-F's module names, shallow and deep fusion, and the path
consistency loss (no gradient into the 3D backbone, BatchNorm statistics untouched, gradients
into the 2D branch and the adapters)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from zoo.errors import ConfigError
from zoo.models.pathfusion import voxelize
from zoo.models.pathfusion.fusion import VoxelBackBone8xFusion, consistency_distance
from zoo.models.pathfusion.image_branch import DeepLabV3Branch

RANGE = [0.0, -6.4, -2.0, 12.8, 6.4, 1.2]
VOXEL = [0.2, 0.2, 0.08]
GRID = [64, 64, 40]


class TinyImageBranch(nn.Module):
    """Four levels at strides 2, 4, 8, 16 (a stand-in for a real backbone, fast to run)."""

    def __init__(self, channels=(4, 6, 8, 8)):
        super().__init__()
        self.channels = list(channels)
        self.reductions = [2, 4, 8, 16]
        ins = [3, *channels[:-1]]
        self.stages = nn.ModuleList(nn.Sequential(nn.Conv2d(i, o, 3, stride=2, padding=1), nn.BatchNorm2d(o), nn.ReLU())
                                    for i, o in zip(ins, channels))

    def forward(self, x):
        out = []
        for s in self.stages:
            x = s(x)
            out.append(x)
        return out


def make_batch(seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    feats, coords = [], []
    for b in range(batch):
        # points on a few vertical surfaces ahead of a pinhole camera looking along +x
        n = 1500
        x = torch.rand(n, generator=g) * 10 + 2
        y = (torch.rand(n, generator=g) - 0.5) * 10
        z = torch.rand(n, generator=g) * 2.5 - 1.8
        pts = torch.stack([x, y, z, torch.rand(n, generator=g)], 1)
        v, c, num = voxelize(pts, VOXEL, RANGE, 5, 20000)
        feats.append(v.sum(1) / num[:, None])
        coords.append(torch.cat([torch.full((len(c), 1), b, dtype=c.dtype), c], 1))
    m = torch.tensor([[32.0, -40.0, 0.0, 0.0], [24.0, 0.0, -40.0, 0.0], [1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    gt = torch.zeros(batch, 2, 8)
    gt[:, 0] = torch.tensor([6.0, 0.0, -0.8, 4.0, 1.8, 1.6, 0.3, 1.0])
    return {"voxel_features": torch.cat(feats), "voxel_coords": torch.cat(coords), "batch_size": batch,
            "images": torch.rand(batch, 3, 48, 64, generator=g), "image_sizes": [(48, 64), (48, 60)],
            "lidar_to_image": m.expand(batch, 3, 4).clone(), "gt_boxes": gt}


def backbone(**kw):
    torch.manual_seed(0)
    args = dict(channels=(4, 8, 8, 8), out_channels=8, bn_momentum=0.1, shallow_level=0,
                deep={2: 1, 3: 2, 4: 3}, consistency_weights={2: 1.0, 3: 1.0}, position="centre", sample="bilinear")
    args.update(kw)
    return VoxelBackBone8xFusion(4, GRID, VOXEL, RANGE, TinyImageBranch(), **args)


def _three_d(net):
    return [(n, p) for n, p in net.named_parameters() if not n.startswith(("semseg.", "deep_fusion."))]


@pytest.mark.parametrize("stop", ["all", "weights"])
def test_consistency_loss_gives_no_gradient_to_the_3d_backbone_and_trains_the_2d_side(stop):
    net = backbone(stop_gradient=stop, focal_stages=(1, 2, 3)).train()
    out = net(make_batch())
    loss = out["backbone_losses"]["consistency_loss"]
    assert loss > 0
    net.zero_grad(set_to_none=True)
    loss.backward()
    for name, p in _three_d(net):
        assert p.grad is None or not p.grad.any(), name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.semseg.parameters())
    # A_{k+1} learns in both variants; A_k (here A_2, the source of the first pair) only without the full stop
    assert net.deep_fusion["3"].adapter.weight.grad.abs().sum() > 0
    a2 = net.deep_fusion["2"].adapter.weight.grad
    assert (a2 is not None and a2.abs().sum() > 0) == (stop == "weights")


def test_consistency_leaves_batchnorm_statistics_as_the_main_path_left_them():
    with_loss = backbone()
    without = copy.deepcopy(with_loss)
    without.consistency_weights = {k: 0.0 for k in without.consistency_weights}
    batch = make_batch(1)
    with_loss.train()(dict(batch))
    without.train()(dict(batch))
    for (n, a), (_, b) in zip(with_loss.named_buffers(), without.named_buffers()):
        assert torch.equal(a, b), n
    assert all(m.training for m in with_loss.modules())  # the loss's eval mode was undone


def test_fusion_changes_the_features_and_only_inside_the_image():
    net = backbone(shallow_level=None, deep={2: 1}).eval()
    batch = make_batch(2)
    fused = net(dict(batch))["multi_scale_3d_features"]["x_conv2"]
    net.deep_fusion["2"].adapter.weight.data.zero_()
    plain = net(dict(batch))["multi_scale_3d_features"]["x_conv2"]
    assert torch.equal(fused.indices, plain.indices)
    changed = (fused.features - plain.features).abs().sum(1) > 0
    from zoo.models.pathfusion.lifting import lift

    _, mask = lift(torch.zeros(2, 1, 4, 4), fused.indices, 2, VOXEL, RANGE, batch["lidar_to_image"], (48, 64),
                   batch["image_sizes"], "centre", "bilinear")
    assert changed.any() and not changed[~mask].any()


def test_training_adds_the_focal_loss_and_concat_fusion_works():
    net = backbone(focal_stages=(1, 2, 3), deep_mode="concat").train()
    out = net(make_batch(3))
    losses = out["backbone_losses"]
    assert losses["focal_loss"] > 0 and torch.isfinite(losses["consistency_loss"])
    assert out["encoded_spconv_tensor"].features.shape[1] == 8
    assert "deep_fusion.2.fuse.0.weight" in net.state_dict()


def test_focals_conv_f_module_names_and_shapes():
    """Focals Conv-F's VoxelBackBone8xFocal (KITTI, USE_IMG) read off its public code: the
    names and shapes its checkpoints hold for the 3D backbone, the image branch and the fusion."""
    branch = DeepLabV3Branch(["layer1"], [16])
    net = VoxelBackBone8xFusion(4, [1408, 1600, 40], [0.05, 0.05, 0.1], [0, -40, -3, 70.4, 40, 1], branch,
                                focal_stages=(1, 2, 3), shallow_level=0)
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    expected = {
        "conv_input.0.weight": (16, 3, 3, 3, 4), "conv1.0.0.weight": (16, 3, 3, 3, 16),
        "conv1.1.conv.weight": (16, 3, 3, 3, 16), "conv1.1.conv_imp.weight": (27, 3, 3, 3, 16),
        "conv1.1.bn1.weight": (16,),
        "conv2.0.0.weight": (32, 3, 3, 3, 16), "conv2.2.0.weight": (32, 3, 3, 3, 32),
        "conv2.3.conv.weight": (32, 3, 3, 3, 32), "conv2.3.conv_imp.weight": (27, 3, 3, 3, 32),
        "conv3.0.0.weight": (64, 3, 3, 3, 32), "conv3.3.conv.weight": (64, 3, 3, 3, 64),
        "conv3.3.conv_imp.weight": (27, 3, 3, 3, 64), "conv4.0.0.weight": (64, 3, 3, 3, 64),
        "conv4.2.1.running_var": (64,), "conv_out.0.weight": (128, 3, 1, 1, 64),
        "conv_focal_multimodal.conv.weight": (16, 3, 3, 3, 16),
        "conv_focal_multimodal.conv_imp.weight": (27, 3, 3, 3, 32), "conv_focal_multimodal.bn1.running_mean": (16,),
        "semseg.ifn.model.backbone.conv1.weight": (64, 3, 7, 7),
        "semseg.ifn.model.backbone.layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "semseg.reduce_blocks.0.conv.weight": (16, 256, 1, 1), "semseg.reduce_blocks.0.bn.running_var": (16,),
    }
    for k, shape in expected.items():
        assert shapes.get(k) == shape, (k, shapes.get(k))
    assert not any(k.startswith("conv4.3") for k in shapes)  # stage 4 has no focal layer
    assert not any(k.startswith("deep_fusion") for k in shapes)  # PathFusion's own, none asked for here


def test_bad_fusion_configs_are_refused():
    with pytest.raises(ConfigError, match="reduce that level"):
        backbone(shallow_level=1)
    with pytest.raises(ConfigError, match="stages 2-4"):
        backbone(deep={1: 0})
    with pytest.raises(ConfigError, match="stop_gradient"):
        backbone(stop_gradient="some")
    net = backbone().eval()
    batch = make_batch()
    del batch["images"]
    with pytest.raises(ConfigError, match="images"):
        net(batch)
    assert consistency_distance(torch.ones(3, 2), torch.ones(3, 2), "cosine").abs() < 1e-6
