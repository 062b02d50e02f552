"""The synthetic KITTI world and the detection dataset: a KITTI folder the reader loads, points
and image that correspond, augmentations that undo, ground-truth sampling without collisions."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from zoo.data import kitti as K
from zoo.data.kitti_dataset import (GtSampler, KittiDetection, build_gt_database, collate, points_in_boxes,
                                    undo_augmentation)
from zoo.data.kitti_synth import SIZE_STATS, make_frame, write_world
from zoo.errors import DataError


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_world(tmp_path_factory.mktemp("world"), 10, seed=3)


def test_world_is_a_kitti_folder(world):
    ids = K.read_split(world / "ImageSets" / "train.txt") + K.read_split(world / "ImageSets" / "val.txt")
    assert ids == [f"{i:06d}" for i in range(10)]
    counts = {}
    for idx in ids:
        p = K.frame_paths(world / "training", idx)
        pts, calib, objs, img = K.read_points(p["velodyne"]), K.read_calib(p["calib"]), K.read_labels(p["label_2"]), \
            K.read_image(p["image_2"])
        assert pts.shape[1] == 4 and len(pts) > 20000 and img.shape == (375, 1242, 3)
        assert calib.Tr_imu_to_velo is not None
        for o in objs:
            counts[o.type] = counts.get(o.type, 0) + 1
    assert counts.get("Car", 0) >= 20 and counts.get("Pedestrian", 0) >= 3 and counts.get("Cyclist", 0) >= 3


def test_points_and_image_correspond():
    """Each labelled object's LiDAR returns project inside its 2D box, and the image there is
    the object's, not the sky: the image is rendered with the frame's calibration."""
    points, image, calib, objects = make_frame(11)
    cars = [o for o in objects if o.type == "Car" and o.occluded == 0 and o.truncated == 0]
    assert cars
    boxes = K.camera_to_lidar_boxes(np.stack([o.camera_box for o in cars]), calib)
    inside = points_in_boxes(points, boxes)
    checked = 0
    for k, o in enumerate(cars):
        own = points[inside[:, k]]
        if len(own) < 10:
            continue
        uv, _ = calib.lidar_to_image(own)
        l, t, r, b = o.bbox
        hit = (uv[:, 0] >= l - 2) & (uv[:, 0] <= r + 2) & (uv[:, 1] >= t - 2) & (uv[:, 1] <= b + 2)
        assert hit.mean() > 0.95
        px = image[np.clip(uv[:, 1].astype(int), 0, 374), np.clip(uv[:, 0].astype(int), 0, 1241)].astype(float)
        sky = np.array([0.55 * 255, 0.75 * 255, 0.95 * 255])
        assert (np.abs(px - sky).sum(1) > 60).mean() > 0.9
        checked += 1
    assert checked >= 1


def test_labels_follow_kitti_statistics_and_rules():
    heights = {c: [] for c in SIZE_STATS}
    truncated = occluded = 0
    for seed in range(12):
        _, _, calib, objects = make_frame(100 + seed, render=False)
        for o in objects:
            if o.type in heights:
                heights[o.type].append(o.dimensions[0])
                truncated += o.truncated > 0
                occluded += o.occluded > 0
                assert o.location[2] > 1.0
                assert -math.pi <= o.rotation_y <= math.pi
    for c in ("Car", "Pedestrian"):
        mean, std = SIZE_STATS[c][0][0], SIZE_STATS[c][1][0]
        assert abs(np.mean(heights[c]) - mean) < 2 * std
    assert truncated >= 1


def test_augmentations_are_recorded_and_undo(world):
    plain = KittiDetection(world, "train", point_range=(-130, -130, -10, 130, 130, 10))
    aug = KittiDetection(world, "train", point_range=(-130, -130, -10, 130, 130, 10), augment=True, seed=5)
    seen_flip = set()
    for i in range(len(aug)):
        a, p = aug[i], plain[i]
        seen_flip.add(a["aug"]["flip"])
        back = undo_augmentation(a["points"], a["aug"])
        # the same points as the un-augmented sample, up to order and float32 rounding
        from scipy.spatial import cKDTree

        assert back.shape == p["points"].shape
        dist, _ = cKDTree(p["points"][:, :3].numpy()).query(back[:, :3].numpy())
        assert dist.max() < 1e-4
        assert abs(a["aug"]["rotation"]) <= math.pi / 4 and 0.95 <= a["aug"]["scale"] <= 1.05
        assert not a["aug"]["pasted"].any()
    assert seen_flip == {True, False}
    # the same sample twice is the same; another epoch differs
    assert torch.equal(aug[0]["points"], aug[0]["points"])
    aug.set_epoch(1)
    assert not torch.equal(aug[0]["points"], KittiDetection(world, "train", augment=True, seed=5)[0]["points"])


def test_gt_sampling_pastes_without_collisions(world):
    index = build_gt_database(world, "train")
    sampler = GtSampler(index, {"Car": 25, "Pedestrian": 10, "Cyclist": 10}, min_points={"Car": 5, "Pedestrian": 5, "Cyclist": 5})
    data = KittiDetection(world, "train", point_range=(-80, -80, -10, 80, 80, 10), augment=True, sampler=sampler,
                          flip=False, rotation_range=(0, 0), scale_range=(1, 1))
    s = data[0]
    plain = KittiDetection(world, "train", point_range=(-80, -80, -10, 80, 80, 10))[0]
    assert len(s["gt_boxes"]) > len(plain["gt_boxes"])
    assert s["aug"]["pasted"].any()
    from zoo.boxes import bev_iou

    b = s["gt_boxes"].double()[:, [0, 1, 3, 4, 6]]
    iou = bev_iou(b, b)
    iou.fill_diagonal_(0)
    assert iou.max() == 0
    # pasted points lie in pasted boxes, and no scene point is left inside one
    new = s["gt_boxes"][len(plain["gt_boxes"]):].numpy().astype(np.float64)
    inside = points_in_boxes(s["points"].numpy().astype(np.float64), new, margin=-1e-3).any(1)
    assert (inside <= s["aug"]["pasted"].numpy()).all()
    batch = collate([s, plain])
    assert batch["points"].shape[1] == 5 and set(batch["points"][:, 0].tolist()) == {0.0, 1.0}
    assert batch["gt_boxes"].shape[0] == 2 and (batch["gt_boxes"][0, : len(s["gt_boxes"]), 7] >= 1).all()


def test_dataset_errors(tmp_path, world):
    with pytest.raises(DataError, match="no training/ folder"):
        KittiDetection(tmp_path)
    with pytest.raises(DataError, match="no ground-truth database"):
        GtSampler(tmp_path / "none.json", {"Car": 5})
    with pytest.raises(DataError, match="at least one frame"):
        write_world(tmp_path / "w", 0)


def test_camera_matters_split_has_unlabelled_decoys_only_colour_tells_apart():
    import numpy as np

    from zoo.data.kitti_synth import DECOY, make_frame, make_scene

    rng = np.random.default_rng(3)
    scenes = [make_scene(rng, 36.0, decoys=0.5) for _ in range(6)]
    names = [n for s in scenes for n in s.names]
    assert names.count(DECOY) > 0 and names.count("Car") > 0
    for s in scenes:
        for k, n in enumerate(s.names):
            body = s.colour[np.nonzero(s.owner == k)[0][0]]
            spread = body.max() - body.min()
            if n == DECOY:
                assert spread < 0.05  # grey
            elif n == "Car":
                assert spread > 0.3  # vivid
        decoy_parts = np.isin(s.owner, [k for k, n in enumerate(s.names) if n == DECOY])
        car_parts = np.isin(s.owner, [k for k, n in enumerate(s.names) if n == "Car"])
        if decoy_parts.any() and car_parts.any():  # the LiDAR sees the same material
            assert set(np.round(s.reflect[decoy_parts], 3)) <= set(np.round(s.reflect[car_parts], 3)) | {0.35, 0.85}
    points, _, _, objects = make_frame(5, render=False, max_range=36.0, decoys=0.5)
    assert all(o.type != DECOY for o in objects)
