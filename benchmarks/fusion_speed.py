"""Camera fusion's cost on the CPU: fused against LiDAR-only frames per second, and what the path
consistency loss adds to a training step.

    .venv/bin/python benchmarks/fusion_speed.py [--threads 2] [--repeats 5]

On a synthetic camera-matters frame at 128 x 416 (written to a temporary folder), times in one
process, interleaved: eval frames per second (voxelization to NMS) of pathfusion_lidar_tiny and
pathfusion_tiny (and the real frame's, with pathfusion_lidar_kitti and pathfusion_kitti, when
``../shared/data/kitti`` is present and ``--kitti`` is given), and the training step
(forward + backward, batch 2) of pathfusion_tiny with and without the consistency loss. Writes
docs/results/fusion_speed.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "kitti" / "training"


def frame_batch(root: Path, index: str, train: bool = False, batch_size: int = 1) -> dict:
    from zoo.data.kitti_dataset import KittiDetection, collate

    ds = KittiDetection(root, [index] * batch_size, load_image=True, augment=train)
    return collate([ds[i] for i in range(batch_size)])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--kitti", action="store_true", help="also the full models on the real frame")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import zoo
    from zoo.data.kitti_synth import write_world
    from zoo.tables import results_file
    from zoo.train.detection import model_inputs as inputs

    tmp = Path(tempfile.mkdtemp(prefix="zoo-fusion-speed-"))
    world = write_world(tmp / "w", 1, seed=13, val_fraction=0.0, image_size=(128, 416), max_range=36.0, decoys=0.5)
    pairs = [("pathfusion_lidar_tiny", "pathfusion_tiny", world / "training", "000000", "synthetic 128 x 416")]
    if args.kitti and REAL.is_dir():
        pairs.append(("pathfusion_lidar_kitti", "pathfusion_kitti", REAL, "000008", "KITTI 000008"))
    fps_rows = []
    for lidar, fused, root, index, where in pairs:
        batch = frame_batch(root.parent, index)
        models = {n: zoo.create_model(n).eval() for n in (lidar, fused)}
        times = {n: [] for n in models}
        for n, m in models.items():  # warm-up
            with torch.no_grad():
                m(inputs(m, batch))
        for _ in range(args.repeats):
            for n, m in models.items():
                start = time.perf_counter()
                with torch.no_grad():
                    m(inputs(m, batch))
                times[n].append(time.perf_counter() - start)
        med = {n: statistics.median(t) for n, t in times.items()}
        fps_rows.append((where, lidar, 1 / med[lidar], fused, 1 / med[fused], med[fused] / med[lidar]))

    # a training step of the fused tiny model with and without the consistency loss
    train_batch = frame_batch(world, "000000", train=True, batch_size=2)
    torch.manual_seed(0)
    with_loss = zoo.create_model("pathfusion_tiny").train()
    without = zoo.create_model("pathfusion_tiny").train()
    without.load_state_dict(with_loss.state_dict())
    without.backbone_3d.consistency_weights = {k: 0.0 for k in without.backbone_3d.consistency_weights}
    steps = {"with the consistency loss": with_loss, "without it": without}
    step_times = {n: [] for n in steps}
    for rep in range(args.repeats + 1):
        for n, m in steps.items():
            start = time.perf_counter()
            m(inputs(m, train_batch, train=True))["losses"]["loss"].backward()
            m.zero_grad(set_to_none=True)
            if rep:  # the first round warms up
                step_times[n].append(time.perf_counter() - start)
    step = {n: statistics.median(t) * 1e3 for n, t in step_times.items()}

    with results_file(ROOT / "docs" / "results" / "fusion_speed.md", "Camera fusion's cost on the CPU"):
        print(f"{args.threads} threads, median of {args.repeats} interleaved calls after a warm-up.\n")
        print("| frame | LiDAR-only | frames/s | fused | frames/s | fused time / LiDAR time |")
        print("|---|---|---|---|---|---|")
        for where, lidar, lf, fused, ff, ratio in fps_rows:
            print(f"| {where} | {lidar} | {lf:.2f} | {fused} | {ff:.2f} | {ratio:.2f} |")
        a, b = step["with the consistency loss"], step["without it"]
        print("\n| pathfusion_tiny training step (batch 2, forward + backward) | ms |")
        print("|---|---|")
        print(f"| with the path consistency loss | {a:.0f} |")
        print(f"| without it | {b:.0f} |")
        print(f"| the loss's share | {(a - b) / a * 100:.0f}% ({a / b:.2f}x the step without it) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
