"""Lifting image features onto voxels: the recorded augmentations undone in the projection,
site positions, bilinear and Focals Conv's nearest sampling, masks; and the image branches."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from zoo.data.kitti import read_calib, read_points, write_points
from zoo.data.kitti_dataset import KittiDetection, collate
from zoo.data.kitti_synth import write_world
from zoo.errors import ConfigError, WeightsError
from zoo.models.pathfusion import voxelize
from zoo.models.pathfusion.image_branch import DeepLabV3Branch, ZooImageBranch
from zoo.models.pathfusion.lifting import lift, project_to_image, sample_at_pixels, site_positions


@pytest.fixture(scope="module")
def tagged_world(tmp_path_factory):
    """A one-frame world whose reflectance column numbers the points, so an augmented point can
    be matched with the point it came from."""
    root = write_world(tmp_path_factory.mktemp("lift"), 1, seed=5, val_fraction=0.0, image_size=(96, 320))
    path = root / "training" / "velodyne" / "000000.bin"
    pts = read_points(path)
    pts[:, 3] = np.arange(len(pts), dtype=np.float32)
    write_points(path, pts)
    return root


AUGS = {
    "flip": dict(flip=True, rotation_range=(0.0, 0.0), scale_range=(1.0, 1.0)),
    "rotation": dict(flip=False, rotation_range=(0.6, 0.6), scale_range=(1.0, 1.0)),
    "scale": dict(flip=False, rotation_range=(0.0, 0.0), scale_range=(1.04, 1.04)),
    "all": dict(flip=True, rotation_range=(-0.7, 0.7), scale_range=(0.95, 1.05)),
}


@pytest.mark.parametrize("which", list(AUGS))
def test_augmented_points_project_where_the_originals_did(tagged_world, which):
    original = read_points(tagged_world / "training" / "velodyne" / "000000.bin")
    calib = read_calib(tagged_world / "training" / "calib" / "000000.txt")
    ds = KittiDetection(tagged_world, ["000000"], augment=True, fov_only=True, **AUGS[which])
    for epoch in range(20):  # the flip fires with probability 1/2: find an epoch where it did
        ds.set_epoch(epoch)
        sample = ds[0]
        if sample["aug"]["flip"] == AUGS[which]["flip"]:
            break
    aug = sample["aug"]
    assert aug["flip"] == AUGS[which]["flip"]
    if which != "flip":
        assert aug["rotation"] != 0.0 or aug["scale"] != 1.0
    pts = sample["points"]
    assert not torch.allclose(pts[:, :3], torch.from_numpy(original[pts[:, 3].long().numpy(), :3]))  # it moved
    batch = collate([sample])
    uv, depth = project_to_image(pts[:, :3], torch.zeros(len(pts), dtype=torch.long), batch["lidar_to_image"])
    ref_uv, _ = calib.lidar_to_image(original[pts[:, 3].long().numpy()])
    assert np.abs(uv.numpy() - ref_uv).max() < 1e-4
    assert (depth > 0).all()


def test_site_positions_centre_and_corner():
    pts = torch.tensor([[1.23, -3.41, -0.72, 0.0], [10.01, 5.55, 0.31, 0.0]])
    size, rng = [0.05, 0.05, 0.1], [0, -40, -3, 70.4, 40, 1]
    _, coords, _ = voxelize(pts, size, rng, 5, 100)
    idx = torch.cat([torch.zeros(len(coords), 1, dtype=torch.int32), coords], 1)
    centre = site_positions(idx, 1, size, rng, "centre")
    corner = site_positions(idx, 1, size, rng, "corner")
    half = torch.tensor(size, dtype=torch.float64) / 2
    assert torch.all((pts[:, :3].double() - centre).abs() <= half + 1e-6)
    assert torch.allclose(centre - corner, half)
    # a coarser stride: a site's cell holds the finer sites it covers
    coarse = site_positions(idx // torch.tensor([1, 8, 8, 8], dtype=torch.int32), 8, size, rng, "corner")
    assert torch.all(corner >= coarse - 1e-9) and torch.all(corner < coarse + 8 * torch.tensor(size, dtype=torch.float64))
    with pytest.raises(ConfigError, match="centre"):
        site_positions(idx, 1, size, rng, "middle")


def test_bilinear_sampling_reads_a_linear_map_exactly_and_nearest_is_focals_convs_rule():
    h_img, w_img, h, w = 40, 120, 10, 30
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    fmap = torch.stack([xs * (w_img / w), ys * (h_img / h), torch.randn(h, w)])[None].double()  # [1, 3, h, w]
    uv = torch.tensor([[17.3, 9.2], [60.0, 21.7], [101.9, 30.05], [3.5, 2.5]], dtype=torch.float64)
    valid = torch.ones(4, dtype=torch.bool)
    got = sample_at_pixels(fmap, uv, torch.zeros(4, dtype=torch.long), (h_img, w_img), valid, "bilinear")
    inside = (uv[:, 0] > 2) & (uv[:, 0] < w_img - 2) & (uv[:, 1] > 2) & (uv[:, 1] < h_img - 2)
    assert torch.allclose(got[inside, :2], uv[inside], atol=1e-9)
    # Focals Conv: resize the map to the image bilinearly, then read the truncated pixel
    resized = F.interpolate(fmap, size=(h_img, w_img), mode="bilinear", align_corners=False)[0]
    ref = resized[:, uv[:, 1].long(), uv[:, 0].long()].t()
    near = sample_at_pixels(fmap, uv, torch.zeros(4, dtype=torch.long), (h_img, w_img), valid, "nearest")
    assert torch.allclose(near, ref, atol=1e-12)


def test_lift_masks_sites_outside_their_image_or_behind_the_camera_and_passes_gradients():
    # a pinhole looking along +x of the LiDAR: u = 50 + 100 * (-y / x), v = 20 + 100 * (-z / x)
    m = torch.tensor([[[50.0, -100.0, 0.0, 0.0], [20.0, 0.0, -100.0, 0.0], [1.0, 0.0, 0.0, 0.0]]] * 2,
                     dtype=torch.float64)
    size, rng = [1.0, 1.0, 1.0], [-20, -20, -5, 20, 20, 5]
    # sites (batch, z, y, x), centres x = -20 + x_i + 0.5 and so on
    idx = torch.tensor([[0, 5, 20, 30], [0, 5, 20, 5], [1, 5, 0, 30], [1, 5, 20, 30], [1, 5, 17, 30], [0, 5, 17, 30]],
                       dtype=torch.int32)
    fmap = torch.randn(2, 4, 8, 20, dtype=torch.float64, requires_grad=True)
    feats, mask = lift(fmap, idx, 1, size, rng, m, (40, 100), [(40, 100), (40, 60)])
    # 0: u = 45 inside; 1: behind the camera; 2: u = 236, right of the image; 3: as 0 in sample 1;
    # 4: u = 74, inside the padded batch image but beyond sample 1's own 60 columns; 5: as 4 in sample 0
    assert mask.tolist() == [True, False, False, True, False, True]
    assert torch.equal(feats[~mask], torch.zeros_like(feats[~mask]))
    feats.sum().backward()
    assert fmap.grad[0].abs().sum() > 0 and fmap.grad[1].abs().sum() > 0


def test_deeplab_branch_has_focals_conv_names_and_loads_torchvision_weights(tmp_path):
    from safetensors.torch import save_file
    from torchvision.models.segmentation import deeplabv3_resnet50

    branch = DeepLabV3Branch(["layer1"], [16])
    keys = branch.state_dict().keys()
    assert "ifn.model.backbone.conv1.weight" in keys and "ifn.model.backbone.layer1.2.conv3.weight" in keys
    assert "reduce_blocks.0.conv.weight" in keys and not any("layer2" in k for k in keys)
    assert tuple(branch.state_dict()["reduce_blocks.0.conv.weight"].shape) == (16, 256, 1, 1)
    full = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=21, aux_loss=None)
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(tmp_path / "deeplab.safetensors"))
    unused = branch.load_weights(tmp_path / "deeplab.safetensors")
    assert torch.equal(branch.ifn.model.backbone.layer1[0].conv1.weight, full.backbone.layer1[0].conv1.weight)
    assert unused and all(".layer2." in k or ".layer3." in k or ".layer4." in k or "classifier" in k for k in unused)
    x = torch.rand(1, 3, 64, 96)
    full.eval(), branch.eval()
    ref = full.backbone.layer1(full.backbone.maxpool(full.backbone.relu(full.backbone.bn1(full.backbone.conv1(
        branch.normalize(x))))))
    with torch.no_grad():
        out = branch.reduce_blocks[0](ref)
        assert torch.allclose(branch(x)[0], out, atol=1e-6)
    assert branch(x)[0].shape == (1, 16, 16, 24)
    save_file({"backbone.conv1.weight": torch.zeros(64, 3, 7, 7)}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(WeightsError, match="missing"):
        branch.load_weights(tmp_path / "partial.safetensors")


def test_zoo_backbone_weights_load_from_a_local_file(tmp_path):
    import zoo
    from safetensors.torch import save_file

    torch.manual_seed(3)
    src = zoo.create_model("efficientformerv2_s0", img_size=64)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "s0.safetensors"))
    branch = ZooImageBranch("efficientformerv2_s0", img_size=64, pretrained=tmp_path / "s0.safetensors")
    own = branch.backbone.model.state_dict()
    shared = [k for k in own if k in src.state_dict()]
    assert len(shared) > 50 and all(torch.equal(own[k], src.state_dict()[k]) for k in shared)


def test_zoo_backbones_serve_as_image_branches_and_others_are_refused():
    branch = ZooImageBranch("efficientformer_l1", out_channels=[8, 16, 16, 32], img_size=64)
    out = branch(torch.rand(2, 3, 48, 160))  # resized to 64 x 64 first
    assert [tuple(f.shape) for f in out] == [(2, 8, 16, 16), (2, 16, 8, 8), (2, 16, 4, 4), (2, 32, 2, 2)]
    assert branch.channels == [8, 16, 16, 32]
    with pytest.raises(ConfigError, match="features_only"):
        ZooImageBranch("psf_tiny")
    with pytest.raises(ConfigError, match="layer1"):
        DeepLabV3Branch(["layer3", "layer1"])
