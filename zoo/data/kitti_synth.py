"""A synthetic world in the KITTI object format, for tests and the demo.

Each frame is a procedural street: a ground plane, building walls on both sides, parked and
driving cars (and the odd van), pedestrians and cyclists with KITTI's size statistics (means
and spreads of h, w, l per class), each a few boxes (a car's body, a cabin over its rear
half, boot and wheels; a person's legs, torso, head and feet; a bike, its handlebar and its
rider), so that every class shows which way it faces. From it come

- a 64-beam LiDAR scan by ray casting (HDL-64E-like elevations +2 to -24.8 degrees, the front
  100 degrees of azimuth, range noise, dropouts, reflectance per material), in the LiDAR frame
  1.73 m above the ground;
- the camera image, rendered through `zoo.render` with the frame's own calibration (P2 and
  Tr_velo_to_cam, so image and points correspond exactly), at KITTI's 1242 x 375 by default;
- labels: the 3D box in the camera frame, the 2D box of the object's unoccluded silhouette in
  the render (clipped to the image), truncation as the share of its projected box outside the
  image, and occlusion from the share of its silhouette that nearer things hide (0: >= 75 %
  visible, 1: >= 40 %, 2: >= 10 %, 3: less). Objects no LiDAR beam and no pixel sees are not
  labelled; ones under 15 px tall become DontCare regions, as KITTI marks far objects.

`write_world(root, num_frames)` writes ``root/training/{velodyne,image_2,calib,label_2}`` and
``root/ImageSets/{train,val}.txt``, which `zoo.data.kitti` reads like the real dataset. The
calibration is zoo's own (a KITTI-like rig: focal 720 px, camera 1.65 m up, 0.27 m behind the
LiDAR), with a small random perturbation per frame.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from zoo.boxes import bev_iou
from zoo.data.kitti import (Calib, KittiObject, image_boxes, lidar_to_camera_boxes, points_in_boxes,
                            write_calib, write_labels, write_points)
from zoo.errors import DataError
from zoo.io import atomic_write

__all__ = ["SIZE_STATS", "Scene", "make_scene", "make_calib", "cast_lidar", "render_frame", "make_frame",
           "write_world"]

# KITTI training-set statistics of (h, w, l) in metres: mean and standard deviation
SIZE_STATS = {
    "Car": ((1.53, 1.63, 3.88), (0.14, 0.10, 0.43)),
    "Van": ((2.21, 1.90, 5.08), (0.32, 0.15, 0.57)),
    "Pedestrian": ((1.76, 0.66, 0.84), (0.11, 0.14, 0.23)),
    "Cyclist": ((1.74, 0.60, 1.76), (0.09, 0.12, 0.18)),
}
LIDAR_HEIGHT = 1.73
IMAGE_SIZE = (375, 1242)  # (H, W)
_COLOURS = {"Car": [(0.7, 0.1, 0.1), (0.1, 0.2, 0.6), (0.8, 0.8, 0.8), (0.15, 0.15, 0.15), (0.5, 0.5, 0.55)],
            "Van": [(0.9, 0.9, 0.9), (0.3, 0.4, 0.3)], "Pedestrian": [(0.2, 0.3, 0.5), (0.5, 0.2, 0.2), (0.3, 0.3, 0.3)],
            "Cyclist": [(0.1, 0.5, 0.2), (0.6, 0.5, 0.1)]}
_REFLECT = {"Car": 0.35, "Van": 0.35, "Pedestrian": 0.2, "Cyclist": 0.25, "wall": 0.15, "ground": 0.08}
# the camera-matters split: labelled cars are painted in vivid colours, and unlabelled decoys of
# the same shape and reflectance in neutral ones, so only the image tells a car from a decoy
_VIVID_CARS = [(0.8, 0.1, 0.1), (0.1, 0.25, 0.75), (0.1, 0.6, 0.2), (0.85, 0.7, 0.1)]
_DECOY_COLOURS = [(0.75, 0.75, 0.75), (0.15, 0.15, 0.15), (0.45, 0.45, 0.48)]
DECOY = "Decoy"  # an object of the scene that is not labelled


@dataclass
class Scene:
    """Objects (class names and LiDAR boxes ``[K, 7]``) and their parts, the walls, and the
    ground height; parts are oriented boxes ``[P, 7]`` with the index of their owner (-1 for
    walls), a colour and a reflectance."""

    names: list[str]
    boxes: np.ndarray
    parts: np.ndarray
    owner: np.ndarray
    colour: np.ndarray
    reflect: np.ndarray
    ground_z: float = -LIDAR_HEIGHT


def _parts(cls: str, box: np.ndarray) -> list[np.ndarray]:
    """Oriented sub-boxes of one object (LiDAR boxes), spanning its label box."""
    x, y, z, l, w, h, yaw = box
    bottom = z - h / 2
    c, s = math.cos(yaw), math.sin(yaw)

    def part(fx, fy, z0, z1, pl, pw):  # centre offset along length / width, height range, size
        return np.array([x + c * fx - s * fy, y + s * fx + c * fy, bottom + (z0 + z1) / 2 * h, pl, pw, (z1 - z0) * h, yaw])

    if cls in ("Car", DECOY):
        # body, a cabin over the rear half and a raised boot: the shape tells front from back,
        # as a real car's does (a symmetric box would leave the heading ambiguous by pi)
        out = [part(0, 0, 0.18, 0.5, l, w), part(-0.1 * l, 0, 0.5, 1.0, 0.5 * l, 0.9 * w),
               part(-0.42 * l, 0, 0.5, 0.62, 0.16 * l, w)]
        for fx in (0.32 * l, -0.32 * l):
            for fy in (0.38 * w, -0.38 * w):
                out.append(part(fx, fy, 0.0, 0.2, 0.2 * l, 0.22 * w))
        return out
    if cls == "Van":
        out = [part(0, 0, 0.18, 0.55, l, w), part(-0.08 * l, 0, 0.55, 1.0, 0.84 * l, 0.95 * w)]
        for fx in (0.32 * l, -0.32 * l):
            for fy in (0.38 * w, -0.38 * w):
                out.append(part(fx, fy, 0.0, 0.2, 0.2 * l, 0.22 * w))
        return out
    if cls == "Pedestrian":
        return [part(0, 0, 0.0, 0.5, 0.6 * l, 0.55 * w), part(0, 0, 0.5, 0.85, 0.55 * l, w),
                part(0, 0, 0.86, 1.0, 0.35 * l, 0.35 * w), part(0.25 * l, 0, 0.0, 0.2, 0.5 * l, 0.4 * w)]
    # cyclist: the bike along the length, the rider above its middle
    return [part(0, 0, 0.0, 0.55, l, 0.2 * w), part(0.05 * l, 0, 0.5, 0.85, 0.35 * l, w),
            part(0.05 * l, 0, 0.86, 1.0, 0.2 * l, 0.35 * w), part(0.4 * l, 0, 0.5, 0.6, 0.1 * l, w)]


def _size(rng: np.random.Generator, cls: str) -> tuple[float, float, float]:
    mean, std = SIZE_STATS[cls]
    h, w, l = (np.array(mean) + np.array(std) * np.clip(rng.normal(size=3), -2, 2)).tolist()
    return h, w, l


def make_scene(rng: np.random.Generator, max_range: float = 50.0, decoys: float = 0.0) -> Scene:
    """A random street in front of the sensor (LiDAR frame). With `decoys` > 0, that fraction of
    the cars are decoys (``"Decoy"``: a car's shape and reflectance in a neutral colour, never
    labelled) and the labelled cars are vividly painted: the camera-matters split."""
    half_road = rng.uniform(5.0, 9.0)
    names, boxes = [], []
    ground = -LIDAR_HEIGHT

    def place(cls, x, y, yaw, tries=1):
        h, w, l = _size(rng, cls)
        box = np.array([x, y, ground + h / 2, l, w, h, yaw])
        if boxes:
            near = bev_iou(torch.from_numpy(box[[0, 1, 3, 4, 6]][None] * [1, 1, 1.15, 1.3, 1]),
                           torch.from_numpy(np.stack(boxes)[:, [0, 1, 3, 4, 6]]))
            if (near > 0).any():
                return False
        names.append(cls)
        boxes.append(box)
        return True

    for _ in range(int(rng.integers(3, 11))):  # cars: parked along the kerbs or in lanes
        kind = rng.random()
        if kind < 0.5:
            side = rng.choice([-1, 1])
            y, yaw = side * (half_road - rng.uniform(1.0, 1.6)), rng.choice([0.0, math.pi]) + rng.normal(0, 0.05)
        else:
            y, yaw = rng.uniform(-half_road + 2, half_road - 2), rng.choice([0.0, math.pi]) + rng.normal(0, 0.15)
        if place("Van" if rng.random() < 0.08 else "Car", rng.uniform(4, max_range), y, yaw) and decoys > 0 \
                and names[-1] == "Car" and rng.random() < decoys:
            names[-1] = DECOY
    for _ in range(int(rng.integers(0, 6))):  # pedestrians: pavements and crossings
        y = rng.choice([-1, 1]) * rng.uniform(half_road - 0.5, half_road + 2.5) if rng.random() < 0.7 \
            else rng.uniform(-half_road, half_road)
        place("Pedestrian", rng.uniform(3, max_range * 0.7), y, rng.uniform(-math.pi, math.pi))
    for _ in range(int(rng.integers(0, 4))):  # cyclists: near the kerbs, along the road
        y = rng.choice([-1, 1]) * (half_road - rng.uniform(0.5, 2.0))
        place("Cyclist", rng.uniform(4, max_range * 0.8), y, rng.choice([0.0, math.pi]) + rng.normal(0, 0.2))

    parts, owner, colour, reflect = [], [], [], []
    for k, (cls, box) in enumerate(zip(names, boxes)):
        palette = _DECOY_COLOURS if cls == DECOY else _VIVID_CARS if cls == "Car" and decoys > 0 else _COLOURS[cls]
        col = np.array(palette[int(rng.integers(len(palette)))])
        vehicle = cls in ("Car", "Van", DECOY)
        for j, p in enumerate(_parts(cls, box)):
            parts.append(p)
            owner.append(k)
            shade = col if j < 2 or not vehicle else np.array([0.05, 0.05, 0.05])  # dark wheels
            colour.append(np.clip(shade * rng.uniform(0.9, 1.1), 0, 1))
            reflect.append(_REFLECT["Car" if cls == DECOY else cls] + (0.5 if vehicle and j == 0 and rng.random() < 0.3 else 0.0))
    # building fronts: a row of blocks on each side, with gaps
    for side in (-1, 1):
        x = -5.0
        while x < max_range + 30:
            length = rng.uniform(6, 20)
            if rng.random() < 0.8:
                depth, height = rng.uniform(4, 10), rng.uniform(3, 12)
                off = half_road + rng.uniform(2.5, 5.0)
                parts.append(np.array([x + length / 2, side * (off + depth / 2), ground + height / 2, length, depth, height, 0.0]))
                owner.append(-1)
                colour.append(np.array([rng.uniform(0.4, 0.8), rng.uniform(0.35, 0.7), rng.uniform(0.3, 0.6)]))
                reflect.append(_REFLECT["wall"] + rng.uniform(-0.05, 0.1))
            x += length + rng.uniform(0, 4)
    return Scene(names, np.array(boxes, dtype=np.float64).reshape(-1, 7), np.array(parts, dtype=np.float64),
                 np.array(owner), np.array(colour, dtype=np.float64), np.array(reflect, dtype=np.float64), ground)


def make_calib(rng: np.random.Generator | None = None, image_size: tuple[int, int] = IMAGE_SIZE) -> Calib:
    """A KITTI-like rig (zoo's own numbers): cam2 1.65 m above the ground, 0.27 m behind and
    0.06 m left of the LiDAR, focal 720 px, principal point near the image centre; `rng`
    perturbs it slightly, as the rig differs between KITTI drives. Another `image_size` than
    KITTI's scales the intrinsics with the width (the principal point's row with the height),
    so a smaller image sees the same horizontal field of view at a lower resolution."""
    j = (lambda s: rng.normal(0, s)) if rng is not None else (lambda s: 0.0)
    axes = np.array([[0.0, -1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])  # LiDAR (x fwd, y left, z up) -> cam
    a, b, c = j(0.004), j(0.004), j(0.004)
    rot = np.array([[1, -c, b], [c, 1, -a], [-b, a, 1]])
    u, _, vt = np.linalg.svd(rot @ axes)
    r_v2c = u @ vt
    t = -r_v2c @ np.array([0.27, -0.06 + j(0.01), LIDAR_HEIGHT - 1.65 - 0.08 + j(0.01)])
    tr = np.concatenate([r_v2c, t[:, None]], axis=1)
    r0 = np.eye(3)
    r0[0, 1], r0[1, 0] = 0.0098 + j(0.001), -0.0098 + j(0.001)
    u, _, vt = np.linalg.svd(r0)
    r0 = u @ vt
    f, cu, cv = 720.0 + j(2.0), 609.5 + j(3.0), 172.8 + j(2.0)
    if tuple(image_size) != IMAGE_SIZE:
        sx, sy = image_size[1] / IMAGE_SIZE[1], image_size[0] / IMAGE_SIZE[0]
        f, cu, cv = f * sx, (cu + 0.5) * sx - 0.5, (cv + 0.5) * sy - 0.5
    k = np.array([[f, 0, cu], [0, f, cv], [0, 0, 1.0]])

    def proj(tx):  # the camera tx metres to the right of cam0
        return np.concatenate([k, (k @ np.array([-tx, 0.0, 0.0]))[:, None]], axis=1)

    imu = np.concatenate([np.eye(3), np.array([[-0.81], [0.32], [-0.80]])], axis=1)
    return Calib(P0=proj(0.0), P1=proj(0.537), P2=proj(-0.06), P3=proj(0.47), R0_rect=r0, Tr_velo_to_cam=tr,
                 Tr_imu_to_velo=imu)


def _ray_box(origin: torch.Tensor, dirs: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Entry distance ``[R, P]`` of rays into oriented boxes ``[P, 7]`` (inf where missed)."""
    c, s = torch.cos(boxes[:, 6]), torch.sin(boxes[:, 6])
    rel = origin[None] - boxes[:, :3]  # [P, 3]
    # into each box's frame (rotate by -yaw)
    o = torch.stack([c * rel[:, 0] + s * rel[:, 1], -s * rel[:, 0] + c * rel[:, 1], rel[:, 2]], 1)
    d = torch.stack([c[None] * dirs[:, :1] + s[None] * dirs[:, 1:2], -s[None] * dirs[:, :1] + c[None] * dirs[:, 1:2],
                     dirs[:, 2:3].expand(-1, boxes.shape[0])], -1)  # [R, P, 3]
    half = boxes[:, 3:6] / 2
    inv = 1.0 / torch.where(d.abs() < 1e-12, torch.full_like(d, 1e-12), d)
    t0 = (-half - o) * inv
    t1 = (half - o) * inv
    tmin = torch.minimum(t0, t1).amax(-1)
    tmax = torch.maximum(t0, t1).amin(-1)
    hit = (tmax >= tmin) & (tmax > 0)
    return torch.where(hit, tmin.clamp_min(0), torch.full_like(tmin, math.inf))


def cast_lidar(scene: Scene, rng: np.random.Generator, beams: int = 64, azimuth_step: float = 0.16,
               azimuth_range: float = 50.0, max_range: float = 120.0) -> np.ndarray:
    """A scan ``[N, 4]`` float32 (x, y, z, reflectance) of the front ``2 * azimuth_range`` degrees."""
    elev = torch.linspace(math.radians(2.0), math.radians(-24.8), beams, dtype=torch.float64)
    elev = elev + torch.from_numpy(rng.normal(0, 0.0007, beams))
    az = torch.arange(-azimuth_range, azimuth_range, azimuth_step, dtype=torch.float64).deg2rad()
    e, a = torch.meshgrid(elev, az, indexing="ij")
    dirs = torch.stack([torch.cos(e) * torch.cos(a), torch.cos(e) * torch.sin(a), torch.sin(e)], -1).reshape(-1, 3)
    origin = torch.zeros(3, dtype=torch.float64)
    parts = torch.from_numpy(scene.parts)
    t_parts = _ray_box(origin, dirs, parts) if len(parts) else torch.full((len(dirs), 0), math.inf, dtype=torch.float64)
    t_best, which = (t_parts.min(1) if t_parts.shape[1] else (torch.full((len(dirs),), math.inf, dtype=torch.float64),
                                                               torch.zeros(len(dirs), dtype=torch.long)))
    down = dirs[:, 2] < -1e-6
    t_ground = torch.where(down, scene.ground_z / dirs[:, 2].clamp(max=-1e-6), torch.full_like(t_best, math.inf))
    on_ground = t_ground < t_best
    t = torch.where(on_ground, t_ground, t_best)
    ok = torch.isfinite(t) & (t < max_range) & (t > 1.0)
    ok &= torch.from_numpy(rng.random(len(t)) > 0.04)  # dropouts
    t = t + torch.from_numpy(rng.normal(0, 0.015, len(t)))
    pts = dirs * t[:, None]
    refl = torch.where(on_ground, torch.full_like(t, _REFLECT["ground"]),
                       torch.from_numpy(scene.reflect)[which] if len(parts) else torch.zeros_like(t))
    refl = (refl + torch.from_numpy(rng.normal(0, 0.03, len(t)))).clamp(0, 0.99)
    return torch.cat([pts, refl[:, None]], 1)[ok].numpy().astype(np.float32)


# ----------------------------------------------------------------------------- rendering

def _box_mesh(boxes: np.ndarray):
    """Flat-shaded meshes of oriented boxes: vertices ``[P * 24, 3]``, normals, triangles
    ``[P * 12, 3]`` and the part index of each triangle."""
    faces = [((0, 1, 2, 3), (0, 0, -1)), ((4, 7, 6, 5), (0, 0, 1)), ((0, 4, 5, 1), (0, -1, 0)),
             ((1, 5, 6, 2), (-1, 0, 0)), ((2, 6, 7, 3), (0, 1, 0)), ((3, 7, 4, 0), (1, 0, 0))]
    corner = np.array([[1, -1, -1], [-1, -1, -1], [-1, 1, -1], [1, 1, -1], [1, -1, 1], [-1, -1, 1], [-1, 1, 1], [1, 1, 1]]) / 2
    verts, normals, tris, owner = [], [], [], []
    for p, box in enumerate(boxes):
        c, s = math.cos(box[6]), math.sin(box[6])
        rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
        pts = (corner * box[3:6]) @ rot.T + box[:3]
        for idx, n in faces:
            base = len(verts)
            verts.extend(pts[list(idx)])
            normals.extend([rot @ np.array(n, float)] * 4)
            tris.extend([[base, base + 1, base + 2], [base, base + 2, base + 3]])
            owner.extend([p, p])
    return np.array(verts), np.array(normals), np.array(tris, dtype=np.int32), np.array(owner)


def _clip_matrix(calib: Calib, image_size: tuple[int, int], near: float = 0.5, far: float = 200.0) -> np.ndarray:
    """4x4 LiDAR -> clip space of `zoo.render` for cam2's image: KITTI pixel (u, v), integer at a
    pixel centre, row 0 at the top, becomes NDC with row 0 at the bottom."""
    h, w = image_size
    p = np.concatenate([calib.P2, [[0, 0, 0, 1.0]]], axis=0)
    r0, r1, r2, e3 = p[0], p[1], p[2], p[3]
    a, b = (far + near) / (far - near), 2 * far * near / (far - near)
    clip = np.stack([(2 / w) * (r0 + 0.5 * r2) - r2, r2 - (2 / h) * (r1 + 0.5 * r2), a * r2 - b * e3, r2])
    return clip @ calib.lidar_to_rect_matrix


def render_frame(scene: Scene, calib: Calib, image_size: tuple[int, int] = IMAGE_SIZE,
                 rng: np.random.Generator | None = None):
    """The camera image ``[H, W, 3]`` uint8 and, per object, its visible and unoccluded pixel
    counts and the 2D box of its unoccluded silhouette (NaN where it covers no pixel)."""
    import zoo.render as R

    h, w = image_size
    rng = rng or np.random.default_rng(0)
    ground = np.array([[-5, -80, scene.ground_z], [150, -80, scene.ground_z], [150, 80, scene.ground_z],
                       [-5, 80, scene.ground_z]], dtype=np.float64)
    verts, normals, tris, part = _box_mesh(scene.parts) if len(scene.parts) else (
        np.zeros((0, 3)), np.zeros((0, 3)), np.zeros((0, 3), np.int32), np.zeros(0, int))
    g0 = len(verts)
    verts = np.concatenate([verts, ground])
    normals = np.concatenate([normals, np.tile([0, 0, 1.0], (4, 1))])
    tris = np.concatenate([tris, np.array([[g0, g0 + 1, g0 + 2], [g0, g0 + 2, g0 + 3]], dtype=np.int32)])
    m = torch.from_numpy(_clip_matrix(calib, image_size))
    v = torch.from_numpy(verts)
    pos = (torch.cat([v, torch.ones(len(v), 1, dtype=v.dtype)], 1) @ m.T).float()
    tri = torch.from_numpy(tris)
    rast, _ = R.rasterize(pos[None], tri, (h, w), grad_db=False, backend="torch")
    tid = rast[0, ..., 3].long() - 1  # [H, W], -1 empty
    attr = torch.cat([torch.from_numpy(normals), v], 1).float()
    inter, _ = R.interpolate(attr[None], rast, tri, backend="torch")
    n, world = inter[0, ..., :3], inter[0, ..., 3:]
    # colours: parts flat, the ground asphalt with a kerb-side lighter band, the sky a gradient
    part_col = torch.from_numpy(scene.colour).float() if len(scene.parts) else torch.zeros(0, 3)
    tri_part = torch.from_numpy(np.concatenate([part, [-1, -1]]))
    pix_part = torch.where(tid >= 0, tri_part[tid.clamp_min(0)], torch.full_like(tid, -2))
    base = torch.zeros(h, w, 3)
    is_part = pix_part >= 0
    base[is_part] = part_col[pix_part[is_part]]
    is_ground = pix_part == -1
    gx, gy = world[..., 0], world[..., 1]
    noise = (torch.sin(gx * 7.1) * torch.sin(gy * 5.3) * 0.03)
    asphalt = 0.33 + noise
    lane = ((gy.abs() < 0.08) & ((gx % 6.0) < 3.0)).float() * 0.5
    g = (asphalt + lane).clamp(0, 1)
    base[is_ground] = torch.stack([g, g, g * 0.97], -1)[is_ground]
    light = torch.tensor([-0.4, 0.3, 0.85])
    light = light / light.norm()
    shade = (n @ light).abs().clamp(0.25, 1.0) * 0.8 + 0.2
    img = base * shade.unsqueeze(-1)
    rows = torch.linspace(1.0, 0.0, h)[:, None].expand(h, w)  # raster row 0 is the bottom
    sky = torch.stack([0.55 + 0.3 * rows, 0.7 + 0.2 * rows, 0.95 * torch.ones_like(rows)], -1)
    img = torch.where((tid < 0).unsqueeze(-1), sky, img)
    img = img + torch.from_numpy(rng.normal(0, 0.01, img.shape)).float()
    image = (img.clamp(0, 1) * 255).round().byte().flip(0).numpy()
    # per object: visible pixels now, and pixels of its silhouette alone (one image per object)
    owner_of_part = torch.from_numpy(scene.owner) if len(scene.parts) else torch.zeros(0, dtype=torch.long)
    k = len(scene.names)
    visible = np.zeros(k, dtype=np.int64)
    alone = np.zeros(k, dtype=np.int64)
    box2d = np.full((k, 4), np.nan)
    if k:
        pix_owner = torch.where(is_part, owner_of_part[pix_part.clamp_min(0)], torch.full_like(pix_part, -1))
        visible = torch.bincount(pix_owner[pix_owner >= 0], minlength=k).numpy()
        tri_owner = owner_of_part[torch.from_numpy(part)]
        mine = torch.nonzero(tri_owner >= 0).squeeze(1)  # the objects' triangles, not the walls'
        order = mine[torch.argsort(tri_owner[mine], stable=True)]
        counts = torch.bincount(tri_owner[mine], minlength=k)
        starts = torch.cumsum(counts, 0) - counts
        ranges = torch.stack([starts, counts], 1).int()
        rast_k, _ = R.rasterize(pos, tri[order], (h, w), ranges=ranges, grad_db=False, backend="torch")
        cover = (rast_k[..., 3] > 0).flip(1)  # [K, H, W], row 0 at the top again
        alone = cover.sum((1, 2)).numpy()
        for i in range(k):
            if alone[i]:
                ys, xs = torch.nonzero(cover[i], as_tuple=True)
                box2d[i] = [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
    return image, visible, alone, box2d


def make_frame(seed: int, image_size: tuple[int, int] = IMAGE_SIZE, render: bool = True, max_range: float = 50.0,
               decoys: float = 0.0):
    """One frame: ``(points [N, 4] float32, image [H, W, 3] uint8 or None, calib, objects)``;
    objects stand at most `max_range` metres ahead; `decoys` as `make_scene` (decoys get no label)."""
    rng = np.random.default_rng(seed)
    scene = make_scene(rng, max_range, decoys)
    calib = make_calib(rng, image_size)
    points = cast_lidar(scene, rng)
    objects = []
    if len(scene.names):
        cam = lidar_to_camera_boxes(scene.boxes, calib)
        in_front = cam[:, 2] > 1.0
        # LiDAR returns on each object (points inside its box, slightly grown)
        n_points = points_in_boxes(points, scene.boxes, margin=0.05).sum(0)
        if render:
            image, visible, alone, box2d = render_frame(scene, calib, image_size, rng)
        else:
            image, visible, alone, box2d = None, np.ones(len(cam)), np.ones(len(cam)), np.full((len(cam), 4), np.nan)
        proj = np.full((len(cam), 4), np.nan)
        if in_front.any():
            proj[in_front] = image_boxes(cam[in_front], calib)
        h, w = image_size
        for i, cls in enumerate(scene.names):
            if cls == DECOY or not in_front[i] or (visible[i] == 0 and n_points[i] == 0):
                continue
            full = proj[i]
            clipped = np.array([max(full[0], 0), max(full[1], 0), min(full[2], w - 1), min(full[3], h - 1)])
            area = (full[2] - full[0]) * (full[3] - full[1])
            inner = max(clipped[2] - clipped[0], 0) * max(clipped[3] - clipped[1], 0)
            if inner <= 0:
                continue
            trunc = float(np.clip(1 - inner / area, 0, 1))
            bb = box2d[i] if render and not np.isnan(box2d[i]).any() else clipped
            frac = visible[i] / max(alone[i], 1)
            occ = 0 if frac >= 0.75 else 1 if frac >= 0.4 else 2 if frac >= 0.1 else 3
            if bb[3] - bb[1] < 15:
                objects.append(KittiObject("DontCare", -1, -1, -10, tuple(float(v) for v in bb)))
                continue
            hgt, wid, lng, ry = cam[i, 3], cam[i, 4], cam[i, 5], cam[i, 6]
            ry = math.remainder(ry, 2 * math.pi)
            alpha = math.remainder(ry - math.atan2(cam[i, 0], cam[i, 2]), 2 * math.pi)
            objects.append(KittiObject(cls, round(trunc, 2), occ, alpha, tuple(float(v) for v in bb),
                                       (hgt, wid, lng), tuple(float(v) for v in cam[i, :3]), ry))
    else:
        image = render_frame(scene, calib, image_size, rng)[0] if render else None
    return points, image, calib, objects


def write_world(root: str | os.PathLike, num_frames: int, seed: int = 0, val_fraction: float = 0.2,
                image_size: tuple[int, int] = IMAGE_SIZE, progress: bool = False, max_range: float = 50.0,
                decoys: float = 0.0) -> Path:
    """Write `num_frames` frames as a KITTI root (``training/`` and ``ImageSets/``); returns
    `root`. Frame i is made from seed ``seed * 100003 + i`` (the same frame on every machine);
    the last `val_fraction` of the indices form ``val.txt``. Objects stand at most `max_range`
    metres ahead (a detector with a shorter range should get a world that fits it: KITTI's
    evaluation counts every labelled object). `decoys` > 0 writes the camera-matters split
    (see `make_scene`)."""
    from PIL import Image

    if num_frames < 1:
        raise DataError(f"write_world needs at least one frame, not {num_frames}.")
    root = Path(root)
    train = root / "training"
    for sub in ("velodyne", "image_2", "calib", "label_2"):
        (train / sub).mkdir(parents=True, exist_ok=True)
    frames = range(num_frames)
    if progress:
        from tqdm import tqdm

        frames = tqdm(frames, desc="synthetic KITTI", unit="frame")
    for i in frames:
        idx = f"{i:06d}"
        points, image, calib, objects = make_frame(seed * 100003 + i, image_size, max_range=max_range, decoys=decoys)
        write_points(train / "velodyne" / f"{idx}.bin", points)
        with atomic_write(train / "image_2" / f"{idx}.png", "wb") as f:
            Image.fromarray(image).save(f, format="PNG")
        write_calib(train / "calib" / f"{idx}.txt", calib)
        write_labels(train / "label_2" / f"{idx}.txt", objects)
    n_val = int(round(num_frames * val_fraction))
    ids = [f"{i:06d}" for i in range(num_frames)]
    (root / "ImageSets").mkdir(exist_ok=True)
    with atomic_write(root / "ImageSets" / "train.txt", "w") as f:
        f.write("".join(i + "\n" for i in ids[: num_frames - n_val]))
    with atomic_write(root / "ImageSets" / "val.txt", "w") as f:
        f.write("".join(i + "\n" for i in ids[num_frames - n_val:]))
    return root
