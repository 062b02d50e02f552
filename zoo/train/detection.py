"""3D detection on the shared engine: a KITTI root, OpenPCDet's augmentations, the detector's
named losses (logged per epoch), and KITTI AP on the validation split every epoch.

Defaults follow OpenPCDet's KITTI recipe where the engine has them: Adam(W) at lr 0.003 with
weight decay 0.01 (OpenPCDet's adam_onecycle; the schedule here is the engine's, cosine by
default), gradient-norm clipping at 10, ground-truth sampling to Car:20, Pedestrian:15,
Cyclist:15 objects per scene.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from zoo.errors import ConfigError, DataError
from zoo.train.engine import Dist, epoch_loader

__all__ = ["DetectionConfig", "DetectionTask", "detect_batch", "evaluate_detector", "parse_sample_groups"]


@dataclass
class DetectionConfig:
    model: str = ""
    data_dir: str = ""
    model_config: str = ""
    train_split: str = "train"
    val_split: str = "val"
    batch_size: int = 4
    validation_batch_size: int | None = None
    workers: int = 2
    gt_sample: str = "Car:20,Pedestrian:15,Cyclist:15"
    initial_checkpoint: str = ""
    seed: int = 42


def parse_sample_groups(text: str) -> dict[str, int]:
    """``"Car:20,Pedestrian:15"`` -> ``{"Car": 20, "Pedestrian": 15}``; ``none`` or empty -> ``{}``."""
    if not text or text.lower() == "none":
        return {}
    out = {}
    for item in text.split(","):
        name, sep, num = item.strip().partition(":")
        if not sep or not num.strip().isdigit():
            raise ConfigError(f"--gt-sample {text!r}: give CLASS:COUNT pairs separated by commas (or 'none').")
        out[name.strip()] = int(num)
    return out


def model_inputs(model: nn.Module, batch: dict, train: bool = False) -> dict:
    """The part of a collated batch the detector reads (its ``batch_keys``; ``gt_boxes`` to train)."""
    keys = list(getattr(model, "batch_keys", ("points", "batch_size"))) + (["gt_boxes"] if train else [])
    missing = [k for k in keys if k not in batch]
    if missing:
        raise DataError(f"the batch lacks {missing} for {type(model).__name__}; a camera-fusion detector needs the "
                        "dataset built with load_image=True.")
    return {k: batch[k] for k in keys}


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


@torch.no_grad()
def detect_batch(model: nn.Module, batch: dict) -> list[dict]:
    """The detector's boxes for a collated batch, on the CPU: per sample ``pred_boxes``,
    ``pred_scores``, ``pred_labels``."""
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    try:
        out = model(_to_device(model_inputs(model, batch), device))
    finally:
        model.train(was)
    return [{k: v.cpu() for k, v in d.items()} for d in out["final_box_dicts"]]


def evaluate_detector(model: nn.Module, dataset, batch_size: int = 4, workers: int = 0, results_dir: str | Path | None = None,
                      progress: bool = False) -> dict:
    """KITTI AP of `model` on `dataset` (a `KittiDetection` without augmentation); with
    `results_dir`, the KITTI result files are written there too."""
    from zoo.data.kitti import frame_paths, labels_to_arrays, predictions_to_objects, read_labels, write_labels
    from zoo.data.kitti_dataset import collate
    from zoo.metrics.kitti import evaluate_annos

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         collate_fn=collate)
    if progress:
        from tqdm import tqdm

        loader = tqdm(loader, desc="evaluate", unit="batch")
    names = dataset.classes
    gt, dt = [], []
    for batch in loader:
        for b, pred in enumerate(detect_batch(model, batch)):
            objs = predictions_to_objects(pred["pred_boxes"].numpy(), pred["pred_scores"].numpy(),
                                          pred["pred_labels"].numpy(), names, batch["calib"][b], batch["image_shape"][b])
            frame = batch["frame_id"][b]
            if results_dir is not None:
                write_labels(Path(results_dir) / f"{frame}.txt", objs, decimals=4)
            dt.append(labels_to_arrays(objs))
            gt.append(labels_to_arrays(read_labels(frame_paths(dataset.split_dir, frame)["label_2"])))
    classes = [c for c in names if c in ("Car", "Pedestrian", "Cyclist", "Van", "Person_sitting", "Truck")]
    return evaluate_annos(gt, dt, classes)


def summarize(ap: dict, classes) -> dict[str, float]:
    """The R40 moderate figures per class (and their mean) as flat metric names."""
    out = {}
    for c in classes:
        for metric in ("bev", "3d"):
            out[f"{c}_{metric}_moderate"] = ap["ap"][c]["R40"][metric]["moderate"]
    for metric in ("bev", "3d"):
        vals = [out[f"{c}_{metric}_moderate"] for c in classes]
        out[f"mAP_{metric}_moderate"] = float(np.mean(vals)) if vals else math.nan
    return out


class DetectionTask:
    """The engine's task for a registered 3D detector on a KITTI root."""

    higher_is_better = True

    def __init__(self, cfg: DetectionConfig, env: Dist):
        from zoo.data.kitti_dataset import GtSampler, KittiDetection, build_gt_database
        from zoo.registry import model_card

        if not cfg.data_dir:
            raise ConfigError("--data-dir is required: a KITTI root with training/ and ImageSets/.")
        card = model_card(cfg.model)
        if card.task != "3d-detection":
            raise ConfigError(f"{cfg.model} is a {card.task} model, not a 3D detector.")
        self.cfg, self.env = cfg, env
        self.arch = cfg.model
        self.model_config = cfg.model_config or dict(card.config)["config"]
        from zoo.models.pathfusion import is_fusion_config, load_config

        det_cfg = load_config(self.model_config)
        self.classes = list(det_cfg["CLASS_NAMES"])
        self.eval_metric = f"{'Car' if 'Car' in self.classes else self.classes[0]}_3d_moderate"
        point_range = det_cfg["POINT_CLOUD_RANGE"]
        groups = {k: v for k, v in parse_sample_groups(cfg.gt_sample).items() if k in self.classes}
        sampler = None
        root = Path(cfg.data_dir)
        if groups:
            index = root / "gt_database" / f"kitti_dbinfos_{cfg.train_split}.json"
            if not index.is_file():
                if env.is_main:
                    build_gt_database(root, cfg.train_split, self.classes)
                if env.distributed:
                    torch.distributed.barrier()
            sampler = GtSampler(index, groups)
        camera = is_fusion_config(det_cfg)
        self.train_set = KittiDetection(root, cfg.train_split, self.classes, point_range, augment=True,
                                        sampler=sampler, seed=cfg.seed, load_image=camera)
        self.val_set = KittiDetection(root, cfg.val_split, self.classes, point_range, augment=False, load_image=camera)
        self._meters: dict[str, list[float]] = {}

    def build_model(self) -> nn.Module:
        from zoo.registry import create_model

        model = create_model(self.cfg.model, config=self.model_config)
        if self.cfg.initial_checkpoint:
            from zoo.hub import read_state_dict

            path = Path(self.cfg.initial_checkpoint)
            if not path.is_file():
                raise DataError(f"--initial-checkpoint {path}: no such file.")
            from zoo.models.pathfusion import FusionDetector, load_openpcdet_state

            state = read_state_dict(path)
            if isinstance(model, FusionDetector) and not any(k.startswith("backbone_3d.semseg.") for k in state):
                model.load_lidar_weights(state)  # a LiDAR detector's weights: the camera modules start fresh
            else:
                load_openpcdet_state(model, state)
        return model.train()

    def train_loader(self, epoch: int):
        self.train_set.set_epoch(epoch)
        from zoo.data.kitti_dataset import collate

        return epoch_loader(self.train_set, self.cfg.batch_size, epoch, self.cfg.seed, self.env,
                            workers=self.cfg.workers, drop_last=len(self.train_set) > self.cfg.batch_size,
                            collate_fn=collate)

    def train_step(self, model: nn.Module, batch) -> tuple[torch.Tensor, int]:
        batch = _to_device(model_inputs(model, batch, train=True), self.env.device)
        losses = model(batch)["losses"]
        for k, v in losses.items():
            if k != "loss":
                self._meters.setdefault(k, []).append(float(v.detach()))
        return losses["loss"], int(batch["batch_size"])

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        ap = evaluate_detector(model, self.val_set, self.cfg.validation_batch_size or self.cfg.batch_size,
                               self.cfg.workers)
        return summarize(ap, [c for c in self.classes if c in ("Car", "Pedestrian", "Cyclist")])

    def epoch_notes(self) -> dict[str, float]:
        notes = {k: float(np.mean(v)) for k, v in self._meters.items()}
        self._meters = {}
        return notes
