"""Train lsv_mannequin's shipped weights: LSV-GAN on the built-in synthetic humans (CPU).

Runs `zoo.train.gan` through the shared engine (the recipe of its docstring with a shorter
blur fade-in, since a CPU run sees a few thousand images, not millions), then measures the EMA
generator against the initial one on the same held-out labels: FID and KID on the small
feature network, silhouette IoU, multi-view consistency, and how much alpha the outer shells
carry where the data's hair and skirt are. Writes the run folder (sample grids per epoch,
``curves.png``), ``docs/results/lsv_gan_cpu.md`` with the curves and the last sample grid
beside it (``lsv_gan_curves.png``, ``lsv_gan_samples.png``), and the generator's weights in float16
safetensors; ``--install`` copies them to ``models/lsv/weights/`` and prints the sha256 to put
in ``models/lsv/__init__.py``. ``--quick`` is a smoke run.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

import zoo
from zoo.io import atomic_write, sha256_file
from zoo.tables import results_file
from zoo.train.engine import Engine, TrainConfig, setup_distributed
from zoo.train.gan import GANConfig, LSVGANTask

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "models" / "lsv" / "weights" / "lsv_mannequin_synthetic.safetensors"


def outer_alpha(gan, task) -> dict:
    """Mean alpha of the two outer shells' textures over the texels the data's outfits mark as
    hair or skirt, and over the rest (where the data has no off-surface layer)."""
    from zoo.models.lsv import procedural_outfit

    g = gan.ema_model()
    ref = procedural_outfit(g, g.texture_size, seed=0, num_layers=g.num_layers)[0, 3] > 0.5  # hair and skirt texels
    with torch.no_grad():
        tex = g(task.eval_z)[:, :2, 3]  # [E, 2, T, T]
    return {"outer_alpha_on_hair_skirt": tex[:, :, ref].mean().item(), "outer_alpha_elsewhere": tex[:, :, ~ref].mean().item()}


def consistency(gan, task) -> dict:
    from zoo.data.humans import split_label
    from zoo.models.lsv.consistency import multiview_consistency
    from zoo.models.lsv.render import opencv_to_clip

    g = gan.ema_model()
    labels = task.data.labels[task.eval_index[:8]]
    parts = split_label(labels)
    a = opencv_to_clip(parts["c2w"], parts["K"])
    turn = torch.tensor([[0.866, 0, 0.5, 0], [0, 1, 0, 0], [-0.5, 0, 0.866, 0], [0, 0, 0, 1.0]])  # 30 degrees about y
    b = opencv_to_clip(turn @ parts["c2w"], parts["K"])
    with torch.no_grad():
        tex = g(task.eval_z[:8])
    ours = multiview_consistency(g, tex, parts["pose"], a, b, task.cfg.resolution)
    other = multiview_consistency(g, tex, parts["pose"], a, b, task.cfg.resolution, mismatched=True)
    return {"multiview_l1": ours["l1"], "multiview_l1_mismatched": other["l1"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/lsv_mannequin")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--num-images", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--install", action="store_true")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--from-checkpoint", default="", help="skip training: measure and export this run's last.pth.tar")
    p.add_argument("--resume", default="", help="continue a run from its last.pth.tar to --epochs")
    args = p.parse_args()
    torch.set_num_threads(2)
    q = args.quick
    cfg = GANConfig(resolution=32 if q else args.resolution, num_images=32 if q else args.num_images,
                    num_outfits=8 if q else 64, batch_size=args.batch_size, blur_sigma=4.0,
                    blur_fade_kimg=0.1 if q else 2.0, ema_kimg=1.0, eval_images=16 if q else 64)
    env = setup_distributed("cpu")
    task = LSVGANTask(cfg, env)
    tc = TrainConfig(epochs=1 if q else args.epochs, sched="none", output=args.out, experiment="gan",
                     log_interval=16, resume=args.resume)
    engine = Engine(task, tc, env=env)
    start = time.perf_counter()
    torch.manual_seed(tc.seed)  # the engine's seed: gan0 is the run's initial generator
    gan0 = task.build_model()
    before = {**task.evaluate(gan0), **outer_alpha(gan0, task), **consistency(gan0, task)}
    if args.from_checkpoint:  # a run stopped early: its last epoch's weights and counters
        ckpt = torch.load(args.from_checkpoint, map_location="cpu", weights_only=True)
        gan = task.build_model()
        gan.load_state_dict(ckpt["state_dict"])
        task.load_state_dict(ckpt["task_state"])
        tc.epochs = int(ckpt["epoch"]) + 1
        minutes = float("nan")
        out_dir = Path(args.from_checkpoint).parent
    else:
        engine.fit()
        minutes = (time.perf_counter() - start) / 60
        gan = engine.model
        out_dir = engine.out_dir
    after = {**task.evaluate(gan), **outer_alpha(gan, task), **consistency(gan, task)}

    from safetensors.torch import save

    g = gan.ema_model()
    half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in g.state_dict().items()}
    dest = out_dir / WEIGHTS.name
    with atomic_write(dest, "wb") as f:
        f.write(save(half, metadata={"model": "lsv_mannequin", "data": "zoo synthetic humans",
                                     "kimg": f"{task.seen / 1000:.1f}"}))
    rows = [f"| {k} | {before[k]:.4g} | {after[k]:.4g} |" for k in before]
    body = "\n".join([
        f"lsv_mannequin, {cfg.resolution}-pixel images, {len(task.data)} training images, batch {cfg.batch_size}, "
        f"{tc.epochs} epochs ({task.seen / 1000:.1f} kimg), "
        f"{f'{minutes:.0f} min of training' if minutes == minutes else 'measured from its last checkpoint'}"
        f"{f' (the epochs after the resume from {args.resume})' if args.resume and minutes == minutes else ''}.", "",
        f"Figures on {len(task.eval_index)} of the training labels (GAN practice: the data distribution itself); "
        "FID and KID on zoo's small feature network (they compare runs of this project, not published numbers). "
        "Initial: the generator before training.", "",
        "| figure | initial | trained (EMA) |", "|---|---|---|", *rows, "",
        "Curves: `curves.png` in the run folder; sample grids `samples_epochNNN.png` (top rows data, bottom rows "
        "the EMA generator in the same poses and cameras)."])
    results = ROOT / "docs" / "results" / ("lsv_gan_cpu_quick.md" if q else "lsv_gan_cpu.md")
    with results_file(results, "LSV-GAN on the built-in synthetic humans (CPU)"):
        print(body)
    if not q:  # the pictures the docs show, from this run
        shutil.copyfile(out_dir / "curves.png", ROOT / "docs" / "results" / "lsv_gan_curves.png")
        last = sorted(out_dir.glob("samples_epoch*.png"))[-1]
        shutil.copyfile(last, ROOT / "docs" / "results" / "lsv_gan_samples.png")
    print(json.dumps({"before": before, "after": after}, indent=1))
    print(f"weights: {dest} (sha256 {sha256_file(dest)})")
    if args.install:
        WEIGHTS.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(dest, WEIGHTS)
        print(f"installed as {WEIGHTS}: set MANNEQUIN_SHA256 in models/lsv/__init__.py to {sha256_file(WEIGHTS)}")


if __name__ == "__main__":
    main()
