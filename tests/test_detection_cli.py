"""Training, evaluating and running the LiDAR detector from the command line, on the synthetic
world (and the real frame where it is present)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from zoo.cli import main
from zoo.data.kitti_synth import write_world

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "kitti" / "training"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_world(tmp_path_factory.mktemp("world"), 6, seed=11, val_fraction=0.34, max_range=30.0)


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    """Two epochs through `zoo train`: the command's plumbing, not a useful detector."""
    out = tmp_path_factory.mktemp("runs")
    argv = ["train", "--model", "pathfusion_lidar_tiny", "--data-dir", str(world), "--epochs", "2", "-b", "2",
            "--output", str(out), "--experiment", "t", "--log-interval", "0", "--device", "cpu", "--seed", "0"]
    assert main(argv) == 0
    return out / "t"


def test_training_logs_named_losses_and_ap(trained, world):
    rows = list(csv.DictReader(open(trained / "summary.csv")))
    assert len(rows) == 2
    assert {"train_loss", "train_hm_loss", "train_loc_loss", "eval_Car_3d_moderate", "eval_Car_bev_moderate"} <= set(rows[0])
    # the head's two losses add up to the logged loss
    for r in rows:
        assert abs(float(r["train_hm_loss"]) + float(r["train_loc_loss"]) - float(r["train_loss"])) < 1e-3 * float(r["train_loss"])
    assert (world / "gt_database" / "kitti_dbinfos_train.json").is_file()  # built on first use


def test_short_overfit_lowers_the_loss_and_lifts_ap(tmp_path):
    """The default suite's short version of the training run: 45 steps on two frames (the
    evaluation frames), no augmentation. The loss must fall and the AP leave chance (zero: a
    box without training never reaches BEV IoU 0.7 with a car)."""
    import torch

    from zoo.data.kitti_dataset import KittiDetection, collate
    from zoo.models.pathfusion import build_lidar_detector
    from zoo.train.detection import evaluate_detector

    torch.manual_seed(0)
    world = write_world(tmp_path / "w", 2, seed=11, val_fraction=0.0, max_range=30.0)
    model = build_lidar_detector("pathfusion_lidar_tiny")
    data = KittiDetection(world, "train", model.class_names, model.point_cloud_range)
    batch = collate([data[0], data[1]])
    opt = torch.optim.AdamW(model.parameters(), lr=0.005, weight_decay=0.01)
    before = evaluate_detector(model, data, 2)["ap"]["Car"]["R40"]["bev"]["moderate"]
    losses = []
    model.train()
    for _ in range(45):
        loss = model({k: batch[k] for k in ("points", "gt_boxes", "batch_size")})["losses"]["loss"]
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10)
        opt.step()
        losses.append(float(loss.detach()))
    after = evaluate_detector(model, data, 2)["ap"]
    assert before == 0.0
    assert sum(losses[-5:]) < 0.4 * sum(losses[:5])
    assert after["Car"]["R40"]["bev"]["moderate"] > 1.0


def test_evaluate_writes_results_and_ap(world, trained, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["evaluate", "pathfusion_lidar_tiny", "--pretrained", str(trained / "model_best.pth.tar"),
                 "--data-dir", str(world), "--split", "train", "--out", str(out)]) == 0
    ap = json.loads((out / "ap.json").read_text())
    assert set(ap["summary"]) >= {"Car_bev_moderate", "Car_3d_moderate", "mAP_3d_moderate"}
    assert set(ap["ap"]["Car"]["R40"]) == {"bbox", "bev", "3d", "aos"}
    assert sorted(p.name for p in (out / "results").glob("*.txt")) == [f"{i:06d}.txt" for i in range(4)]
    assert "Car AP_R40" in capsys.readouterr().out


def test_shipped_tiny_weights_find_the_cars(world, tmp_path):
    """pathfusion_lidar_tiny's default weights (trained on another synthetic world) on this one."""
    import zoo
    from zoo.data.kitti_dataset import KittiDetection
    from zoo.train.detection import evaluate_detector

    assert zoo.model_card("pathfusion_lidar_tiny").default_tag == "synthetic"
    model = zoo.create_model("pathfusion_lidar_tiny", pretrained=True)
    data = KittiDetection(world, ["000000", "000001", "000002", "000003", "000004", "000005"], model.class_names,
                          model.point_cloud_range)
    ap = evaluate_detector(model, data, 3)["ap"]["Car"]["R40"]["bev"]["moderate"]
    assert ap > 5.0  # far above the zero of untrained weights; few cars cap R40 well below 100


def test_detect_writes_a_picture_and_a_result_file(world, trained, tmp_path):
    from PIL import Image

    from zoo.data.kitti import read_labels

    out = tmp_path / "det"
    assert main(["detect", "pathfusion_lidar_tiny", "--pretrained", str(trained / "model_best.pth.tar"),
                 "--frame", str(world / "training"), "--index", "000000", "--out", str(out)]) == 0
    im = Image.open(out / "000000_detections.png")
    assert im.width == 1242 and im.height > 375 + 200
    objs = read_labels(out / "000000.txt")
    assert all(o.score is not None and o.score >= 0.3 for o in objs)
    lines = (out / "000000.txt").read_text().splitlines()
    assert all(len(line.split()) == 16 for line in lines)


@pytest.mark.skipif(not (REAL / "velodyne" / "000008.bin").is_file(), reason="the real KITTI frame is absent")
def test_detect_runs_on_the_real_frame_with_random_weights(tmp_path):
    assert main(["detect", "pathfusion_lidar_kitti", "--random", "--frame", str(REAL), "--index", "000008",
                 "--out", str(tmp_path), "--score-threshold", "0.0"]) == 0
    assert (tmp_path / "000008_detections.png").is_file() and (tmp_path / "000008.txt").is_file()


def test_detector_errors(world, tmp_path, capsys):
    assert main(["detect", "pathfusion_lidar_kitti", "--frame", str(world / "training"), "--index", "000000",
                 "--out", str(tmp_path)]) == 2  # ships no weights
    assert "--pretrained FILE" in capsys.readouterr().err
    assert main(["detect", "efficientvit_m0", "--random", "--frame", str(world / "training"), "--index", "000000"]) == 2
    assert "3D detector" in capsys.readouterr().err
    assert main(["detect", "pathfusion_lidar_tiny", "--random", "--frame", str(world / "training"), "--index", "000099",
                 "--out", str(tmp_path)]) == 2
    assert "000099.bin" in capsys.readouterr().err
    assert main(["evaluate", "pathfusion_lidar_tiny", "--random"]) == 2
    assert "--data-dir" in capsys.readouterr().err
    assert main(["train", "--model", "pathfusion_lidar_tiny", "--data-dir", str(world), "--gt-sample", "Car=3"]) == 2
    assert "CLASS:COUNT" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written by the failed runs


def test_detection_defaults_and_yaml_config(tmp_path):
    from zoo.cli.train import parse_train_args

    args = parse_train_args(["--model", "pathfusion_lidar_tiny"])
    assert (args.lr, args.weight_decay, args.clip_grad, args.batch_size) == (0.003, 0.01, 10.0, 4)
    cfg = tmp_path / "det.yaml"
    cfg.write_text("model: pathfusion_lidar_tiny\nlr: 0.001\n")
    args = parse_train_args(["-c", str(cfg), "-b", "2"])
    assert (args.lr, args.weight_decay, args.batch_size) == (0.001, 0.01, 2)
    assert parse_train_args(["--model", "efficientvit_m0"]).lr is None  # classification keeps timm's


def test_export_writes_the_dense_parts_and_benchmark_refuses_detectors(tmp_path, capsys):
    """A detector exports its BEV backbone and head, verified in onnxruntime; the sparse stages
    are named in the report as not exported. CoreML is refused with nothing written."""
    import json

    assert main(["export", "pathfusion_lidar_tiny", "--format", "coreml", "--out", str(tmp_path / "x")]) == 2
    assert "ONNX only" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(["export", "pathfusion_lidar_tiny", "--out", str(tmp_path / "e")]) == 0
    report = json.loads((tmp_path / "e" / "export-report.json").read_text())
    (part,) = report["exports"]
    assert part["part"] == "bev_head" and (tmp_path / "e" / part["path"]).is_file()
    assert all(c["rel_diff"] < 1e-4 for c in part["comparisons"])
    assert "sparse backbone" in report["not_exported"]
    assert main(["benchmark", "pathfusion_lidar_tiny"]) == 2
    assert "sparse_conv.py" in capsys.readouterr().err
