"""zoo.data.kitti: the KITTI object format, its transforms, and its errors."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from zoo.data import kitti as K
from zoo.errors import DataError

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "kitti" / "training"
needs_real = pytest.mark.skipif(not (REAL / "velodyne" / "000008.bin").is_file(),
                                reason="the real KITTI frame (../shared/data/kitti) is absent")


def iou2d(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@needs_real
def test_real_frame_reads_and_its_cars_project_onto_their_boxes():
    p = K.frame_paths(REAL, "000008")
    points = K.read_points(p["velodyne"])
    calib = K.read_calib(p["calib"])
    objects = K.read_labels(p["label_2"])
    image = K.read_image(p["image_2"])
    assert points.dtype == np.float32 and points.shape == (17238, 4)
    assert calib.P2.shape == (3, 4) and calib.R0_rect.shape == (3, 3) and calib.Tr_imu_to_velo.shape == (3, 4)
    assert calib.P2.dtype == np.float64
    assert image.shape == (375, 1242, 3)
    assert [o.type for o in objects].count("Car") == 6 and [o.type for o in objects].count("DontCare") == 4
    cars = [o for o in objects if o.type == "Car" and o.truncated == 0]
    assert len(cars) == 4
    boxes = K.image_boxes(np.stack([o.camera_box for o in cars]), calib, image.shape[:2])
    for o, b in zip(cars, boxes):
        assert iou2d(o.bbox, b) >= 0.7
    # the LiDAR returns of the nearest car lie inside its LiDAR box
    lidar = K.camera_to_lidar_boxes(np.stack([o.camera_box for o in cars]), calib)
    near = lidar[np.argmin(np.linalg.norm(lidar[:, :2], axis=1))]
    inside = K.points_in_boxes(points, near[None], margin=0.05)[:, 0]
    assert inside.sum() > 100
    assert K.in_image(points, calib, image.shape[:2]).mean() > 0.95  # the demo copy is FOV-cropped


@needs_real
def test_transforms_round_trip():
    calib = K.read_calib(REAL / "calib" / "000008.txt")
    rng = np.random.default_rng(0)
    cam = np.concatenate([rng.uniform([-10, 0.5, 5], [10, 2, 50], (50, 3)),
                          rng.uniform([1, 1, 2], [2, 2, 5], (50, 3)), rng.uniform(-3, 3, (50, 1))], 1)
    back = K.lidar_to_camera_boxes(K.camera_to_lidar_boxes(cam, calib), calib)
    assert np.abs(back - cam).max() < 1e-6
    pts = rng.uniform([0, -20, -2], [60, 20, 2], (500, 3))
    assert np.abs(calib.rect_to_lidar(calib.lidar_to_rect(pts)) - pts).max() < 1e-6
    uv, depth = calib.lidar_to_image(pts)
    assert np.abs(calib.image_to_rect(uv, depth) - calib.lidar_to_rect(pts)).max() < 1e-6
    # a camera box's yaw: rotation_y 0 faces camera +x, which is LiDAR -y
    lid = K.camera_to_lidar_boxes(np.array([[0, 1.5, 10, 1.5, 1.6, 4.0, 0.0]]), calib)
    assert abs(math.remainder(lid[0, 6] + math.pi / 2, 2 * math.pi)) < 1e-9


def test_labels_round_trip_with_and_without_score(tmp_path):
    objs = [K.KittiObject("Car", 0.25, 1, -1.57, (10.5, 20.25, 100.0, 200.0), (1.5, 1.6, 3.9), (1.0, 1.7, 20.0), 0.5),
            K.KittiObject("DontCare", -1, -1, -10, (1, 2, 30, 40))]
    K.write_labels(tmp_path / "a.txt", objs)
    back = K.read_labels(tmp_path / "a.txt")
    assert back == objs
    objs[0].score = 0.875
    K.write_labels(tmp_path / "b.txt", objs[:1], decimals=4)
    line = (tmp_path / "b.txt").read_text().split()
    assert len(line) == 16 and K.read_labels(tmp_path / "b.txt")[0].score == 0.875
    arr = K.labels_to_arrays(back)
    assert arr["bbox"].shape == (2, 4) and list(arr["name"]) == ["Car", "DontCare"]
    assert K.labels_to_arrays([])["bbox"].shape == (0, 4)


def test_points_calib_and_split_round_trip(tmp_path):
    pts = np.random.default_rng(1).normal(size=(100, 4)).astype(np.float32)
    K.write_points(tmp_path / "p.bin", pts)
    assert np.array_equal(K.read_points(tmp_path / "p.bin"), pts)
    eye = np.eye(3, 4)
    calib = K.Calib(eye, eye, eye * 700, eye, np.eye(3), eye, eye)
    K.write_calib(tmp_path / "c.txt", calib)
    got = K.read_calib(tmp_path / "c.txt")
    assert np.array_equal(got.P2, calib.P2) and np.array_equal(got.Tr_imu_to_velo, eye)
    (tmp_path / "train.txt").write_text("000001\n000002\n\n")
    assert K.read_split(tmp_path / "train.txt") == ["000001", "000002"]


def test_crop_and_field_of_view():
    pts = np.array([[0, 0, 0, 1], [70.39, 39.9, 0.9, 1], [70.4, 0, 0, 1], [5, -40, -3, 1]], np.float32)
    kept = K.crop_to_range(pts, [0, -40, -3, 70.4, 40, 1])
    assert kept.shape == (3, 4) and not (kept[:, 0] == 70.4).any()  # max is exclusive
    calib = K.Calib(*(np.eye(3, 4),) * 4, np.eye(3), np.array([[0, -1, 0, 0], [0, 0, -1, 0], [1, 0, 0, 0]], float))
    calib.P2 = np.array([[100, 0, 50, 0], [0, 100, 50, 0], [0, 0, 1, 0]], float)
    front = np.array([[10, 0, 0, 0], [10, 20, 0, 0], [-10, 0, 0, 0]], np.float32)  # centre, far left, behind
    assert K.in_image(front, calib, (100, 100)).tolist() == [True, False, False]


# ----------------------------------------------------------------------------- bad input

def test_bad_files_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\0" * 20)
    with pytest.raises(DataError, match="bad.bin.*multiple of 16"):
        K.read_points(bad)
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(DataError, match="empty.bin.*empty"):
        K.read_points(tmp_path / "empty.bin")
    calib = tmp_path / "calib.txt"
    calib.write_text("P0: " + " ".join(["1"] * 12) + "\nR0_rect: " + " ".join(["1"] * 9) + "\n")
    with pytest.raises(DataError, match="calib.txt.*lacks P1, P2, P3, Tr_velo_to_cam"):
        K.read_calib(calib)
    calib.write_text("P0: 1 2 3\n")
    with pytest.raises(DataError, match="calib.txt:1: P0 has 3 values"):
        K.read_calib(calib)
    label = tmp_path / "label.txt"
    label.write_text("Car 0 0 0 1 2 3 4 1 1 1 0 0 10 0\nCar 0 0 0 1 2 3\n")
    with pytest.raises(DataError, match="label.txt:2: 7 fields"):
        K.read_labels(label)
    label.write_text("Car 0 0 0 1 2 3 4 1 1 1 0 0 10 0\n\nBus 0 0 0 1 2 3 4 1 1 1 0 0 10 0\n")
    with pytest.raises(DataError, match="label.txt:3: unknown object type 'Bus'"):
        K.read_labels(label)
    image = tmp_path / "image.png"
    image.write_bytes(b"not a png")
    with pytest.raises(DataError, match="image.png.*cannot be decoded"):
        K.read_image(image)
    (tmp_path / "split.txt").write_text("000001\nabc\n")
    with pytest.raises(DataError, match="split.txt:2"):
        K.read_split(tmp_path / "split.txt")


def test_failed_writes_leave_nothing(tmp_path):
    with pytest.raises(DataError, match="unknown object type"):
        K.write_labels(tmp_path / "x.txt", [K.KittiObject("Bus")])
    with pytest.raises(DataError, match=r"\[N, 4\]"):
        K.write_points(tmp_path / "x.bin", np.zeros((0, 4)))
    assert list(tmp_path.iterdir()) == []
