"""The voxel LiDAR detector: OpenPCDet's names and shapes, targets that decode back to their
boxes, losses, and config errors."""
from __future__ import annotations

import math

import pytest
import torch

import zoo
from zoo.errors import ConfigError, WeightsError
from zoo.models.pathfusion import build_lidar_detector, load_config, load_openpcdet_state
from zoo.models.pathfusion.center_head import focal_loss, gaussian_radius


def test_kitti_config_has_openpcdets_shapes_and_names():
    m = build_lidar_detector("pathfusion_lidar_kitti")
    assert m.grid_size == (1408, 1600, 40) and m.backbone_3d.sparse_shape == (41, 1600, 1408)
    sd = m.state_dict()
    # spconv 2.x layout [Cout, k, k, k, Cin] under OpenPCDet's keys
    assert sd["backbone_3d.conv_input.0.weight"].shape == (16, 3, 3, 3, 4)
    assert sd["backbone_3d.conv2.0.0.weight"].shape == (32, 3, 3, 3, 16)
    assert sd["backbone_3d.conv_out.0.weight"].shape == (128, 3, 1, 1, 64)
    assert sd["backbone_2d.blocks.0.1.weight"].shape == (128, 256, 3, 3)
    assert sd["backbone_2d.deblocks.1.0.weight"].shape == (256, 256, 2, 2)
    assert sd["dense_head.shared_conv.0.weight"].shape == (64, 512, 3, 3)
    assert sd["dense_head.heads_list.0.hm.1.weight"].shape == (3, 64, 3, 3)
    assert "dense_head.heads_list.0.rot.0.1.running_mean" in sd


def test_openpcdet_state_loads_with_old_spconv_layouts():
    m = build_lidar_detector("pathfusion_lidar_tiny")
    src = build_lidar_detector("pathfusion_lidar_tiny")
    state = {k: v.clone() for k, v in src.state_dict().items()}
    w = state["backbone_3d.conv_input.0.weight"]
    state["backbone_3d.conv_input.0.weight"] = w.permute(1, 2, 3, 4, 0).contiguous()  # spconv 1.x
    load_openpcdet_state(m, {"model_state": state})
    assert torch.equal(m.state_dict()["backbone_3d.conv_input.0.weight"], w)
    with pytest.raises(WeightsError, match="no place for"):
        load_openpcdet_state(m, {**src.state_dict(), "roi_head.x": torch.zeros(1)})
    partial = dict(src.state_dict())
    partial.pop("dense_head.shared_conv.0.weight")
    with pytest.raises(WeightsError, match="lacks 1"):
        load_openpcdet_state(m, partial)


def scene_points(seed=0, n=6000):
    g = torch.Generator().manual_seed(seed)
    pts = torch.rand(n, 4, generator=g)
    pts[:, :3] = pts[:, :3] * torch.tensor([38.0, 38.0, 3.5]) + torch.tensor([0.1, -19.0, -2.9])
    return torch.cat([torch.zeros(n, 1), pts], 1)


def test_targets_decode_back_to_the_boxes():
    m = build_lidar_detector("pathfusion_lidar_tiny").eval()
    head = m.dense_head
    boxes = torch.tensor([[[10.3, -2.2, -0.9, 3.9, 1.6, 1.5, 0.4, 1], [22.7, 6.1, -0.8, 0.8, 0.6, 1.7, -2.0, 2],
                           [30.2, -10.4, -0.8, 1.8, 0.6, 1.7, 3.0, 3]]])
    (t,) = head.assign_targets(boxes, (64, 64))
    # heatmap peaks of exactly 1 at each box's cell, on its class channel
    for k in range(3):
        cell = int(t["inds"][0, k])
        cls = int(boxes[0, k, 7]) - 1
        assert t["heatmap"][0, cls].reshape(-1)[cell] == 1.0 and t["mask"][0, k] == 1
    assert int(t["mask"].sum()) == 3
    # predictions that equal the targets at those cells decode to the boxes
    pred = {"hm": torch.full((1, 3, 64, 64), -20.0)}
    maps = torch.zeros(1, 8, 64 * 64)
    for k in range(3):
        maps[0, :, t["inds"][0, k]] = t["target"][0, k]
        pred["hm"][0, int(boxes[0, k, 7]) - 1].view(-1)[t["inds"][0, k]] = 5.0
    maps = maps.view(1, 8, 64, 64)
    pred.update(center=maps[:, 0:2], center_z=maps[:, 2:3], dim=maps[:, 3:6], rot=maps[:, 6:8])
    (out,) = head.decode([pred])
    order = out["pred_labels"].argsort()
    got = out["pred_boxes"][order]
    assert out["pred_labels"][order].tolist() == [1, 2, 3]
    assert torch.allclose(got[:, :6], boxes[0, :, :6], atol=1e-4)
    assert all(abs(math.remainder(float(a - b), 2 * math.pi)) < 1e-4 for a, b in zip(got[:, 6], boxes[0, :, 6]))


def test_training_step_gives_finite_losses_and_gradients():
    torch.manual_seed(0)
    m = build_lidar_detector("pathfusion_lidar_tiny").train()
    batch = {"points": torch.cat([scene_points(0), scene_points(1)[:, :] + torch.tensor([1.0, 0, 0, 0, 0])]),
             "batch_size": 2,
             "gt_boxes": torch.tensor([[[10, 0, -1, 3.9, 1.6, 1.5, 0.3, 1], [0, 0, 0, 0, 0, 0, 0, 0]],
                                       [[20, 5, -1, 0.8, 0.6, 1.7, 0.0, 2], [15, -5, -1, 1.7, 0.6, 1.7, 1.0, 3]]])}
    losses = m(batch)["losses"]
    assert set(losses) == {"loss", "hm_loss", "loc_loss"} and torch.isfinite(losses["loss"])
    losses["loss"].backward()
    g = m.backbone_3d.conv_input[0].weight.grad
    assert g is not None and g.abs().sum() > 0


def test_focal_loss_and_radius():
    gt = torch.zeros(1, 1, 5, 5)
    gt[0, 0, 2, 2] = 1
    good, bad = gt.clamp(1e-4, 1 - 1e-4), (1 - gt).clamp(1e-4, 1 - 1e-4)
    assert focal_loss(good, gt) < 1e-3 < focal_loss(bad, gt)
    r = gaussian_radius(torch.tensor([10.0]), torch.tensor([4.0]), 0.1)
    assert 0 < float(r) < 10


def test_registered_and_config_errors(tmp_path):
    assert {"pathfusion_lidar_kitti", "pathfusion_lidar_tiny"} <= set(zoo.list_models(task="3d-detection"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("CLASS_NAMES: [Car]\n")
    with pytest.raises(ConfigError, match="POINT_CLOUD_RANGE"):
        build_lidar_detector(str(bad))
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        build_lidar_detector(str(bad))
    with pytest.raises(ConfigError, match="no such detector config"):
        build_lidar_detector(str(tmp_path / "none.yaml"))
    cfg = load_config("pathfusion_lidar_tiny")
    cfg["MODEL"]["DENSE_HEAD"]["TARGET_ASSIGNER_CONFIG"]["FEATURE_MAP_STRIDE"] = 8
    with pytest.raises(ConfigError, match="stride 4 but FEATURE_MAP_STRIDE is 8"):
        build_lidar_detector(cfg)
    # a user's YAML through create_model's override
    path = tmp_path / "mine.yaml"
    import yaml
    cfg = load_config("pathfusion_lidar_tiny")
    cfg["CLASS_NAMES"] = ["Car"]
    cfg["MODEL"]["DENSE_HEAD"]["CLASS_NAMES_EACH_HEAD"] = [["Car"]]
    path.write_text(yaml.safe_dump(cfg))
    m = zoo.create_model("pathfusion_lidar_tiny", config=str(path))
    assert m.dense_head.heads_list[0].hm[-1].out_channels == 1
