"""PSF completion: one step against 100 steps and against the partial cloud alone, on held-out shapes.

    .venv/bin/python benchmarks/psf_completion.py [--pretrained FILE] [--num 64] [--threads 2]

Held-out shapes: ``--num`` procedural shapes of a seed no training run uses, each cut by a
plane through its centroid with a fixed random normal; the half it keeps (all its points,
about 500) is the partial input, and 512 other points of the whole shape are the truth.

1. Chamfer distance (squared, PSF's) and exact EMD (L2, PointFlow's) of the completed
   clouds to the truth, for the one-step completion, the 100-step Euler sampler of the
   same model and noise, and the partial cloud alone (tiled to 512 points for EMD).
2. Whether the given points are kept: every input point's distance to the nearest output
   point, as a fraction of the true shape's extent (bounding-box diagonal).
3. Wall time of one completion call (``--timing-num`` clouds) at 1, 100 and 1000 steps.

Not a test: nothing asserts on time.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import zoo
from zoo.data.pointclouds import ProceduralShapes, crop_half
from zoo.metrics.pointcloud import chamfer_distance, emd
from zoo.tables import format_table, results_file

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results" / "psf_completion.md"


def held_out(num: int, seed: int) -> tuple[list[np.ndarray], torch.Tensor]:
    """``num`` partial clouds (each its own size) and their true shapes ``[num, 512, 3]``."""
    shapes = ProceduralShapes(num, tr_sample_size=512, te_sample_size=512, seed=seed, random_subsample=False)
    partials, truths = [], []
    for i in range(num):
        rng = np.random.default_rng([seed, i, 11])
        pool, test = shapes.points[i, :shapes.half], shapes.points[i, shapes.half:]
        partials.append(crop_half(pool, rng.normal(size=3)))
        truths.append(test[rng.choice(shapes.half, 512, replace=False)])
    return partials, torch.from_numpy(np.stack(truths)).float()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="psf_tiny_completion")
    p.add_argument("--pretrained", default=None, help="weights (default: the model's own)")
    p.add_argument("--num", type=int, default=64)
    p.add_argument("--seed", type=int, default=4321, help="shapes of a seed no training used")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timing-num", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=str(RESULTS), help="results file; '' for none")
    args = p.parse_args()
    with results_file(args.out or None, f"{args.model}: one-step completion against 100 steps and the partial cloud"):
        run(args)


def run(args) -> None:
    torch.set_num_threads(args.threads)
    model = zoo.create_model(args.model, pretrained=args.pretrained if args.pretrained else True)
    partials, truth = held_out(args.num, args.seed)
    print(f"{args.model}, {args.threads} threads: {args.num} held-out procedural shapes (seed {args.seed}), each cut "
          f"in half by a random plane through its centroid; partial clouds of {min(map(len, partials))}-"
          f"{max(map(len, partials))} points in, {model.num_points} out ({model.num_given} given).\n")
    outputs = {}
    for steps in (1, 100):
        outputs[f"PSF completion, {steps} step{'s' * (steps > 1)}"] = model.complete(partials, steps=steps,
                                                                                    seed=args.seed)
    tiled = torch.stack([torch.from_numpy(part[np.arange(512) % len(part)]).float() for part in partials])
    rows, cds = [], {}
    for name, out in outputs.items():
        cd, em = chamfer_distance(out, truth), emd(out, truth, exact=True, squared=False)
        cds[name] = float(cd.mean())
        rows.append((name, f"{cd.mean():.5f}", f"{em.mean():.4f}"))
    part_cd = torch.cat([chamfer_distance(torch.from_numpy(part)[None].float(), truth[i:i + 1])
                         for i, part in enumerate(partials)])
    rows.append(("partial cloud alone", f"{part_cd.mean():.5f}",
                 f"{emd(tiled, truth, exact=True, squared=False).mean():.4f}"))
    print(format_table(rows, ("completion", "CD to truth (squared)", "EMD to truth (L2, exact)")))
    one, hundred = cds["PSF completion, 1 step"], cds["PSF completion, 100 steps"]
    print(f"\none-step CD / 100-step CD: {one / hundred:.2f}; one-step CD / partial-only CD: "
          f"{one / float(part_cd.mean()):.2f}")

    gaps = []
    out1 = outputs["PSF completion, 1 step"]
    for i, part in enumerate(partials):
        t = truth[i].numpy()
        extent = float(np.linalg.norm(t.max(0) - t.min(0)))
        d = np.sqrt(((part[:, None] - out1[i].numpy()[None]) ** 2).sum(-1)).min(1)
        gaps.append(d / extent)
    gaps = np.concatenate(gaps)
    print(f"\ngiven points kept (one step): every input point's distance to the nearest output point is at most "
          f"{gaps.max():.2%} of the shape's extent (median {np.median(gaps):.2%}); "
          f"{(gaps <= 0.05).mean():.1%} of them within 5%\n")

    batch = partials[0]
    times = {s: [] for s in (1, 100, 1000)}
    model.complete(batch, steps=1, num=args.timing_num)  # warm-up
    for _ in range(args.reps):
        for s in times:
            if s == 1000 and times[s]:
                continue  # one 1000-step call shows the ratio
            start = time.perf_counter()
            model.complete(batch, steps=s, num=args.timing_num, seed=0)
            times[s].append((time.perf_counter() - start) * 1e3)
    base = statistics.median(times[1])
    print(format_table([(f"{s}-step Euler", f"{statistics.median(v):.0f}", f"{statistics.median(v) / base:.0f}")
                        for s, v in times.items()], ("sampler", f"ms per {args.timing_num} completions",
                                                     "time / 1-step")))


if __name__ == "__main__":
    main()
