"""Train pathfusion_lidar_tiny on the synthetic KITTI world and report its KITTI AP (CPU).

    .venv/bin/python benchmarks/train_lidar_tiny.py [--out runs/lidar_tiny] [--frames 400] [--epochs 16]

Writes the world (``--out/world``: ``--frames`` frames, the last fifth the val split, objects
within 36 m so that the model's 38.4 m range covers every label) unless it is there, trains with `zoo train`'s detection defaults (OpenPCDet's KITTI recipe, ground-truth
sampling to Car:15, Pedestrian:10, Cyclist:10 in the 38 m range), evaluates KITTI AP on the
held-out frames every epoch, and writes the per-epoch log (``curve.json``), a picture of the
curves (``curve.png``, also docs/results/lidar_tiny_training.png) and
docs/results/lidar_tiny_training.md. About an hour on 2 CPU cores
with the defaults; ``--quick`` is a smoke run. ``--install`` then writes the best checkpoint's
weights (the EMA-free model, float16 safetensors) over the package's
``models/pathfusion/weights/pathfusion_lidar_tiny_synthetic.safetensors`` and prints the sha256
to put in ``models/pathfusion/__init__.py``; ``--install-only`` does that for a finished run.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def plot(path: Path, rows: list[dict]) -> None:
    """Training loss and the validation AP per epoch, two panels, PIL only."""
    from PIL import Image, ImageDraw

    w, h, pad = 900, 330, 50
    im = Image.new("RGB", (w, 2 * h), "white")
    d = ImageDraw.Draw(im)
    panels = [("train loss", [("loss", "train_loss", (200, 40, 40)), ("heatmap", "train_hm_loss", (240, 150, 40)),
                              ("box", "train_loc_loss", (120, 60, 200))]),
              ("val AP (R40, moderate), %", [("Car BEV", "Car_bev_moderate", (30, 90, 220)),
                                             ("Car 3D", "Car_3d_moderate", (20, 160, 60)),
                                             ("Ped 3D", "Pedestrian_3d_moderate", (200, 120, 0)),
                                             ("Cyc 3D", "Cyclist_3d_moderate", (150, 0, 150))])]
    n = len(rows)
    for p, (title, series) in enumerate(panels):
        top = p * h
        vals = [r[k] for _, k, _ in series for r in rows if k in r]
        lo, hi = (0.0, 100.0) if p else (0.0, max(vals + [1e-6]) * 1.05)
        d.rectangle([pad, top + 25, w - 20, top + h - 35], outline=(0, 0, 0))
        d.text((pad, top + 6), title, fill=(0, 0, 0))
        for t in range(5):
            v = lo + (hi - lo) * t / 4
            y = top + h - 35 - (h - 60) * t / 4
            d.text((5, y - 6), f"{v:.3g}", fill=(80, 80, 80))
        for i, (name, key, col) in enumerate(series):
            pts = [(pad + (w - 20 - pad) * (j / max(n - 1, 1)), top + h - 35 - (h - 60) * (r[key] - lo) / (hi - lo))
                   for j, r in enumerate(rows) if key in r]
            if len(pts) > 1:
                d.line(pts, fill=col, width=2)
            for x, y in pts:
                d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=col)
            d.text((w - 170, top + 30 + 14 * i), name, fill=col)
        d.text((w // 2 - 20, top + h - 28), "epoch", fill=(0, 0, 0))
    im.save(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/lidar_tiny")
    p.add_argument("--frames", type=int, default=400)
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="a tiny world and two epochs (checks the script only)")
    p.add_argument("--install", action="store_true", help="install the best weights into the package afterwards")
    p.add_argument("--install-only", action="store_true", help="install the best weights of the run in --out")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.install_only:
        install(Path(args.out) / "train" / "model_best.pth.tar")
        return 0
    from zoo.cli.train import parse_train_args, run_train
    from zoo.data.kitti_synth import write_world
    from zoo.tables import results_file

    out = Path(args.out)
    frames, epochs = (24, 2) if args.quick else (args.frames, args.epochs)
    world = out / "world"
    if not (world / "ImageSets" / "val.txt").is_file():
        start = time.time()
        # objects within the tiny model's 38.4 m range: KITTI AP counts every labelled object
        write_world(world, frames, seed=7, progress=True, max_range=36.0)
        print(f"wrote {frames} synthetic frames in {time.time() - start:.0f} s")
    rows: list[dict] = []
    train_start = time.time()

    def record(engine, epoch, metrics):
        summary = list(csv_rows(engine.out_dir / "summary.csv"))[-1]
        summary = {k: float(v) for k, v in summary.items() if k.startswith("train_")}
        rows.append({"epoch": epoch, "minutes": (time.time() - train_start) / 60, **summary, **metrics})
        (out / "curve.json").write_text(json.dumps(rows, indent=1))
        plot(out / "curve.png", rows)

    best = run_train(parse_train_args([
        "--model", "pathfusion_lidar_tiny", "--data-dir", str(world), "--epochs", str(epochs), "--warmup-epochs",
        "0" if args.quick else "1", "--gt-sample", "Car:15,Pedestrian:10,Cyclist:10", "--output", str(out),
        "--experiment", "train", "--log-interval", "0", "--device", "cpu", "--seed", "0"]), callbacks=[record])
    final = rows[-1]
    if args.quick:
        print(f"quick run done: {out / 'curve.png'}")
        return
    with results_file(ROOT / "docs" / "results" / "lidar_tiny_training.md", "pathfusion_lidar_tiny on the synthetic KITTI world"):
        print(f"{frames} synthetic frames ({frames - round(frames * 0.2)} train, {round(frames * 0.2)} held-out val), "
              f"{epochs} epochs, {final['minutes']:.0f} minutes on {args.threads} CPU threads.\n")
        print("| epoch | minutes | train loss | Car BEV | Car 3D | Pedestrian 3D | Cyclist 3D |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['epoch']} | {r['minutes']:.0f} | {float(r['train_loss']):.3f} | {r['Car_bev_moderate']:.1f} | "
                  f"{r['Car_3d_moderate']:.1f} | {r['Pedestrian_3d_moderate']:.1f} | {r['Cyclist_3d_moderate']:.1f} |")
        print(f"\nKITTI AP R40 at moderate difficulty on the held-out frames (official thresholds: Car 0.7, "
              f"Pedestrian and Cyclist 0.5). Best Car 3D {best['Car_3d_moderate']:.1f} at epoch {best['epoch']}. "
              "Curves: [lidar_tiny_training.png](lidar_tiny_training.png).")
    plot(ROOT / "docs" / "results" / "lidar_tiny_training.png", rows)
    print(f"wrote {out / 'curve.png'} and docs/results/lidar_tiny_training.{{md,png}}")
    if args.install:
        install(out / "train" / "model_best.pth.tar")


def install(ckpt: Path) -> None:
    """The checkpoint's model weights as float16 safetensors in the package, with their sha256."""
    from safetensors.torch import save_file

    from zoo.hub import read_state_dict
    from zoo.io import atomic_write, sha256_file

    sd = read_state_dict(ckpt)
    half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    dest = ROOT / "models" / "pathfusion" / "weights" / "pathfusion_lidar_tiny_synthetic.safetensors"
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".part")
    save_file(half, str(tmp))
    with atomic_write(dest, "wb") as f:
        f.write(tmp.read_bytes())
    tmp.unlink()
    print(f"installed {dest} ({dest.stat().st_size / 1e6:.2f} MB); set TINY_SHA256 = \"{sha256_file(dest)}\"")


def csv_rows(path: Path):
    import csv

    with open(path) as f:
        yield from csv.DictReader(f)


if __name__ == "__main__":
    sys.exit(main())
