"""``zoo detect`` (one frame: boxes, a result file and a picture) and ``zoo evaluate`` (a split:
KITTI result files and the AP table) for the 3D detectors."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from zoo.errors import ConfigError, DataError

__all__ = ["register", "load_detector"]


def load_detector(name: str, weights: str | None, random_init: bool, model_config: str = ""):
    """A registered detector with weights from a file (a training checkpoint, a safetensors
    file or an OpenPCDet checkpoint), or random ones when asked for explicitly."""
    from zoo.registry import create_model, model_card

    card = model_card(name)
    if card.task != "3d-detection":
        raise ConfigError(f"{name} is a {card.task} model; zoo detect takes a 3D detector (zoo list --task 3d-detection).")
    overrides = {"config": model_config} if model_config else {}
    if weights:
        from zoo.hub import read_state_dict
        from zoo.models.pathfusion import load_openpcdet_state

        model = create_model(name, **overrides)
        path = Path(weights)
        if not path.is_file():
            raise DataError(f"--pretrained {path}: no such file.")
        load_openpcdet_state(model, read_state_dict(path, prefer_ema=True))
        return model.eval()
    if not random_init and card.default_tag is None:
        raise ConfigError(f"{name} ships no weights: give --pretrained FILE (a checkpoint from zoo train) or "
                          "--random to run it with random weights.")
    return create_model(name, pretrained=not random_init, **overrides).eval()


def _cmd_detect(args) -> int:
    import numpy as np
    import torch

    from zoo.data.kitti import frame_paths, predictions_to_objects, read_calib, read_image, read_labels, read_points
    from zoo.data.kitti import camera_to_lidar_boxes, in_image, write_labels
    from zoo.data.kitti_dataset import augmented_lidar_to_image
    from zoo.data.kitti_vis import frame_picture
    from zoo.train.detection import detect_batch

    model = load_detector(args.name, args.pretrained, args.random, args.model_config)
    paths = frame_paths(args.frame, args.index)
    points = read_points(paths["velodyne"])
    calib = read_calib(paths["calib"])
    image = read_image(paths["image_2"])
    fov = points[in_image(points, calib, image.shape[:2])]
    if len(fov) == 0:
        raise DataError(f"{paths['velodyne']}: no point of the scan lies in the camera's field of view.")
    batch = {"points": torch.cat([torch.zeros(len(fov), 1), torch.from_numpy(fov)], 1), "batch_size": 1,
             "image": [image], "lidar_to_image": torch.from_numpy(augmented_lidar_to_image(calib, {}))[None]}
    pred = detect_batch(model, batch)[0]
    keep = pred["pred_scores"] >= args.score_threshold
    boxes, scores, labels = (pred[k][keep].numpy() for k in ("pred_boxes", "pred_scores", "pred_labels"))
    names = [model.class_names[int(i) - 1] for i in labels]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    objs = predictions_to_objects(boxes, scores, labels, model.class_names, calib, image.shape[:2])
    write_labels(out / f"{args.index}.txt", objs, decimals=4)
    gt = None
    if paths["label_2"].is_file():
        gt_objs = [o for o in read_labels(paths["label_2"]) if o.type in model.class_names]
        gt = camera_to_lidar_boxes(np.stack([o.camera_box for o in gt_objs]), calib) if gt_objs else np.zeros((0, 7))
    png = frame_picture(out / f"{args.index}_detections.png", image, fov, calib, boxes, names, model.point_cloud_range,
                        scores, gt, title=f"{args.name}: {len(boxes)} boxes >= {args.score_threshold:g} "
                                          "(ground truth thin green)")
    print(f"{args.name} on {paths['velodyne']}: {len(boxes)} boxes with score >= {args.score_threshold:g}")
    for n, s, b in zip(names, scores, boxes):
        print(f"  {n:<10} {s:.2f}  centre ({b[0]:.1f}, {b[1]:.1f}, {b[2]:.1f}) m  size {b[3]:.1f} x {b[4]:.1f} x {b[5]:.1f}")
    print(f"wrote {out / (args.index + '.txt')} and {png}")
    return 0


def _cmd_evaluate(args) -> int:
    from zoo.data.kitti_dataset import KittiDetection
    from zoo.io import atomic_write_json
    from zoo.metrics.kitti import format_results
    from zoo.train.detection import evaluate_detector, summarize

    model = load_detector(args.name, args.pretrained, args.random, args.model_config)
    data = KittiDetection(args.data_dir, args.split, model.class_names, model.point_cloud_range, augment=False,
                          load_image="image" in getattr(model, "batch_keys", ()))
    out = Path(args.out)
    results = out / "results"
    results.mkdir(parents=True, exist_ok=True)
    ap = evaluate_detector(model, data, args.batch_size, args.workers, results_dir=results, progress=True)
    classes = [c for c in model.class_names if c in ("Car", "Pedestrian", "Cyclist")]
    ap["summary"] = summarize(ap, classes)
    atomic_write_json(out / "ap.json", ap)
    print(format_results(ap))
    print(json.dumps(ap["summary"], indent=1))
    print(f"wrote {len(data)} result files to {results} and the AP to {out / 'ap.json'}")
    return 0


def _common(s: argparse.ArgumentParser) -> None:
    s.add_argument("name", help="a registered 3D detector (zoo list --task 3d-detection)")
    w = s.add_mutually_exclusive_group()
    w.add_argument("--pretrained", default=None, help="weights file: a zoo train checkpoint, safetensors, or OpenPCDet's")
    w.add_argument("--random", action="store_true", help="random weights (to try the pipeline)")
    s.add_argument("--model-config", default="", help="the detector's YAML, if it was trained with its own")


def register(sub) -> None:
    s = sub.add_parser("detect", help="3D boxes on one KITTI frame: a result file and a picture")
    _common(s)
    s.add_argument("--frame", required=True, help="a KITTI split folder (ROOT/training) with velodyne/, image_2/, calib/")
    s.add_argument("--index", required=True, help="the frame's six-digit index, e.g. 000008")
    s.add_argument("--out", default="detections")
    s.add_argument("--score-threshold", type=float, default=0.3)
    s.set_defaults(func=_cmd_detect)

    # `zoo evaluate` is one command for every task: the point cloud generators' parser
    # (zoo.cli.generate, registered first) gains the detectors' options and routes by task
    s = sub.choices["evaluate"]
    s.description = "generators: MMD/COV/1-NNA and JSD against references; 3D detectors: KITTI AP on a split"
    s.add_argument("--model-config", default="", help="3D detectors: the YAML it was trained with, if its own")
    s.add_argument("--data-dir", default="", help="3D detectors: a KITTI root with training/ and ImageSets/")
    s.add_argument("--split", default="val", help="3D detectors: the ImageSets split (default val)")
    s.add_argument("--out", default="evaluation", help="3D detectors: folder for results/ and ap.json")
    s.add_argument("-b", "--batch-size", type=int, default=4)
    s.add_argument("--workers", "-j", type=int, default=0)
    generators = s.get_default("func")

    def evaluate(args) -> int:
        from zoo.registry import model_card

        if model_card(args.name).task != "3d-detection":
            return generators(args)
        if not args.data_dir:
            raise ConfigError(f"zoo evaluate {args.name} needs --data-dir: a KITTI root with training/ and ImageSets/.")
        return _cmd_evaluate(args)

    s.set_defaults(func=evaluate)
