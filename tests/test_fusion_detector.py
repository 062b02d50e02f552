"""The LiDAR-camera detectors: Focals Conv-F's checkpoint into pathfusion_kitti, training losses,
bad input, and `zoo train` / `evaluate` / `detect` for pathfusion_tiny."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

import zoo
from zoo.cli import main
from zoo.data.kitti_synth import write_world
from zoo.errors import DataError, WeightsError
from zoo.models.pathfusion import build_fusion_detector, load_focals_conv_state

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "kitti" / "training"


def focals_conv_f_checkpoint() -> dict:
    """The tensors a Focals Conv-F KITTI checkpoint (voxel_rcnn_car_focal_multimodal: USE_IMG,
    USE_STAGES [1, 2, 3]) holds, named and shaped as dvlab-research/FocalsConv's
    VoxelBackBone8xFocal builds them (spconv 2.x weight layout), plus the first tensors of its
    Voxel R-CNN heads."""
    from torchvision.models.segmentation import deeplabv3_resnet50

    g = torch.Generator().manual_seed(0)
    sd = {}

    def subm(name, cin, cout, k=(3, 3, 3)):
        sd[name + ".weight"] = torch.randn(cout, *k, cin, generator=g)

    def bn(name, c):
        sd.update({name + ".weight": torch.rand(c, generator=g), name + ".bias": torch.randn(c, generator=g),
                   name + ".running_mean": torch.randn(c, generator=g), name + ".running_var": torch.rand(c, generator=g),
                   name + ".num_batches_tracked": torch.tensor(7)})

    def block(name, cin, cout):
        subm(name + ".0", cin, cout)
        bn(name + ".1", cout)

    def focal(name, c, imp_in):
        subm(name + ".conv", c, c)
        bn(name + ".bn1", c)
        subm(name + ".conv_imp", imp_in, 27)

    p = "backbone_3d."
    block(p + "conv_input", 4, 16)
    block(p + "conv1.0", 16, 16)
    focal(p + "conv1.1", 16, 16)
    for stage, cin, c in ((2, 16, 32), (3, 32, 64), (4, 64, 64)):
        block(p + f"conv{stage}.0", cin, c)
        block(p + f"conv{stage}.1", c, c)
        block(p + f"conv{stage}.2", c, c)
        if stage < 4:
            focal(p + f"conv{stage}.3", c, c)
    subm(p + "conv_out.0", 64, 128, k=(3, 1, 1))
    bn(p + "conv_out.1", 128)
    focal(p + "conv_focal_multimodal", 16, 32)
    for k, v in deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=21, aux_loss=None).state_dict().items():
        sd[p + "semseg.ifn.model." + k] = v
    sd[p + "semseg.reduce_blocks.0.conv.weight"] = torch.randn(16, 256, 1, 1, generator=g)
    bn(p + "semseg.reduce_blocks.0.bn", 16)
    sd["dense_head.conv_cls.weight"] = torch.randn(2, 512, 1, 1, generator=g)
    sd["roi_head.shared_fc_layer.0.weight"] = torch.randn(256, 27648, 1, generator=g)
    return {"model_state": sd}


def test_focals_conv_f_checkpoint_loads_into_pathfusion_kitti():
    model = build_fusion_detector("pathfusion_kitti")
    ckpt = focals_conv_f_checkpoint()
    report = load_focals_conv_state(model, ckpt)
    sd = ckpt["model_state"]
    backbone = [k for k in sd if k.startswith("backbone_3d.")]
    assert set(report["loaded"]) == {k for k in backbone if ".classifier." not in k}
    assert set(report["unused"]) == {k for k in sd if ".classifier." in k or not k.startswith("backbone_3d.")}
    assert all(k.startswith(("backbone_3d.deep_fusion.", "backbone_3d.semseg.reduce_blocks.", "backbone_2d.",
                             "dense_head.")) for k in report["new"])
    assert "backbone_3d.semseg.reduce_blocks.0.conv.weight" not in report["new"]
    own = model.state_dict()
    for k in ("backbone_3d.conv2.3.conv_imp.weight", "backbone_3d.conv_focal_multimodal.bn1.running_var",
              "backbone_3d.semseg.ifn.model.backbone.layer3.2.conv2.weight"):
        assert torch.equal(own[k], sd[k]), k
    del sd["backbone_3d.conv1.1.conv_imp.weight"]
    with pytest.raises(WeightsError, match="lacks 1"):
        load_focals_conv_state(model, ckpt)


def _batch(name="pathfusion_tiny", batch_size=2):
    (b,) = zoo.model_card(name).input.example(batch_size)
    b["gt_boxes"] = torch.tensor([[[12.0, 0.5, -1.0, 4.0, 1.8, 1.5, 0.2, 1.0]]]).repeat(batch_size, 1, 1)
    return b


def test_tiny_fusion_detector_trains_with_all_its_losses_and_detects():
    model = zoo.create_model("pathfusion_tiny").train()
    out = model(_batch())
    losses = out["losses"]
    assert {"hm_loss", "loc_loss", "focal_loss", "consistency_loss"} <= set(losses)
    parts = losses["hm_loss"] + losses["loc_loss"] + losses["focal_loss"] + losses["consistency_loss"]
    assert torch.allclose(losses["loss"], parts)
    assert losses["focal_loss"] > 0 and losses["consistency_loss"] > 0
    losses["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone_3d.semseg.parameters())
    model.eval()
    with torch.no_grad():
        dets = model(_batch())["final_box_dicts"]
    assert len(dets) == 2 and all(d["pred_boxes"].shape[1] == 7 for d in dets)


def test_bad_camera_input_is_a_data_error():
    model = zoo.create_model("pathfusion_tiny").eval()
    b = _batch()
    del b["image"]
    with pytest.raises(DataError, match="image"):
        model(b)
    b = _batch()
    del b["lidar_to_image"]
    with pytest.raises(DataError, match="lidar_to_image"):
        model(b)
    b = _batch()
    b["lidar_to_image"] = -b["lidar_to_image"]  # a camera looking backwards: every point behind it
    with pytest.raises(DataError, match="none of its"):
        model(b)


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    return write_world(tmp_path_factory.mktemp("fworld"), 4, seed=21, val_fraction=0.25, image_size=(128, 416),
                       max_range=30.0)


def test_train_evaluate_and_detect_from_the_command_line(small_world, tmp_path, capsys):
    out = tmp_path / "runs"
    argv = ["train", "--model", "pathfusion_tiny", "--data-dir", str(small_world), "--epochs", "1", "-b", "2",
            "--output", str(out), "--experiment", "f", "--log-interval", "0", "--device", "cpu", "--seed", "0"]
    assert main(argv) == 0
    rows = list(csv.DictReader(open(out / "f" / "summary.csv")))
    assert {"train_focal_loss", "train_consistency_loss", "eval_Car_3d_moderate"} <= set(rows[0])
    assert float(rows[0]["train_consistency_loss"]) > 0
    ckpt = out / "f" / "last.pth.tar"
    assert main(["evaluate", "pathfusion_tiny", "--pretrained", str(ckpt), "--data-dir", str(small_world),
                 "--split", "val", "--out", str(tmp_path / "ev")]) == 0
    assert (tmp_path / "ev" / "ap.json").is_file()
    assert main(["detect", "pathfusion_tiny", "--pretrained", str(ckpt), "--frame", str(small_world / "training"),
                 "--index", "000003", "--out", str(tmp_path / "det")]) == 0
    assert (tmp_path / "det" / "000003_detections.png").is_file()
    (small_world / "training" / "image_2" / "000003.png").rename(tmp_path / "moved.png")
    try:
        assert main(["detect", "pathfusion_tiny", "--pretrained", str(ckpt), "--frame", str(small_world / "training"),
                     "--index", "000003", "--out", str(tmp_path / "det2")]) != 0
        assert "no such image" in capsys.readouterr().err
    finally:
        (tmp_path / "moved.png").rename(small_world / "training" / "image_2" / "000003.png")


@pytest.mark.skipif(not REAL.is_dir(), reason="the real KITTI frame is not present")
def test_detect_runs_on_the_real_frame(tmp_path):
    assert main(["detect", "pathfusion_tiny", "--random", "--frame", str(REAL), "--index", "000008",
                 "--out", str(tmp_path)]) == 0
    assert (tmp_path / "000008_detections.png").is_file()


def test_lidar_weights_start_the_fusion_model():
    from safetensors.torch import load_file

    shipped = Path(zoo.models.pathfusion.__file__).parent / "weights" / "pathfusion_lidar_tiny_synthetic.safetensors"
    if not shipped.is_file():
        pytest.skip("the shipped LiDAR weights are absent")
    state = load_file(str(shipped))
    model = zoo.create_model("pathfusion_tiny")
    fresh = model.load_lidar_weights(state)
    own = model.state_dict()
    assert all(torch.equal(own[k], v.to(own[k].dtype)) for k, v in state.items())
    assert fresh and all(k.startswith(("backbone_3d.semseg.", "backbone_3d.deep_fusion.",
                                       "backbone_3d.conv_focal_multimodal.")) for k in fresh)
    assert not set(fresh) & set(state)
    wrong = zoo.create_model("pathfusion_lidar_kitti").state_dict()
    with pytest.raises(WeightsError, match="not the weights"):
        model.load_lidar_weights(wrong)


def test_export_writes_the_image_branch_and_the_bev_head(tmp_path):
    import json

    assert main(["export", "pathfusion_tiny", "--format", "onnx", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "export-report.json").read_text())
    parts = {e["part"]: e for e in report["exports"]}
    assert set(parts) == {"bev_head", "image_branch"}
    assert all(c["rel_diff"] < 1e-4 for e in parts.values() for c in e["comparisons"])
    assert [o["shape"][1] for o in parts["image_branch"]["outputs"]] == [8, 16, 32, 32]
