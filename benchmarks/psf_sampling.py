"""PSF sampling: one step against 1000 Euler steps (same model, same noise, same run), and metrics.

    .venv/bin/python benchmarks/psf_sampling.py [--model psf_tiny] [--num 32] [--timing-num 16] [--threads 2]

1. Wall time of ``--timing-num`` clouds with 1 Euler step and with 1000 (the paper's flow
   baseline's step count), interleaved over ``--reps`` rounds; prints the ratio (goal:
   at least 500x).
2. Generation metrics (`zoo.metrics.compute_all_metrics`, exact EMD) of 1-, 10- and
   100-step samples from the same noise against ``--num`` procedural reference shapes,
   with the 1-step 1-NNA-CD gap to 100 steps (goal: within 5 points).

Not a test: nothing asserts on time.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import zoo
from zoo.metrics import compute_all_metrics
from zoo.tables import format_table
from zoo.train.pointcloud_data import procedural_references


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="psf_tiny")
    p.add_argument("--pretrained", default=None, help="weights (default: the model's own)")
    p.add_argument("--num", type=int, default=32, help="clouds for the metrics (and as many references)")
    p.add_argument("--timing-num", type=int, default=16, help="clouds per timed sampling call")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--long-steps", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = zoo.create_model(args.model, pretrained=args.pretrained if args.pretrained else True)
    noise = model.noise(args.num, seed=args.seed)
    timing_noise = noise[:args.timing_num]

    times = {1: [], args.long_steps: []}
    for _ in range(args.reps):
        for steps in times:
            start = time.perf_counter()
            model.sample(noise=timing_noise, steps=steps)
            times[steps].append(time.perf_counter() - start)
    t1, tn = statistics.median(times[1]), statistics.median(times[args.long_steps])
    print(f"<!-- {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}; "
          f"{args.model}, {len(timing_noise)} clouds of {model.num_points} points per call, median of {args.reps}; "
          f"metrics on {args.num} samples against {args.num} procedural references -->")
    print(format_table([("1-step Euler", f"{t1 * 1e3:.0f}", "1.0"),
                        (f"{args.long_steps}-step Euler", f"{tn * 1e3:.0f}", f"{tn / t1:.0f}")],
                       ("sampler", "ms", "time / 1-step"), "markdown"))
    print(f"\nspeed-up of one step over {args.long_steps}: {tn / t1:.0f}x (goal: at least 500x)\n")

    refs = procedural_references(args.num, model.num_points, seed=1234)
    rows, nna = [], {}
    for steps in (1, 10, 100):
        m = compute_all_metrics(model.sample(noise=noise, steps=steps), refs, emd_exact=True)
        nna[steps] = m["1-NNA-CD"]
        rows.append((steps, *(f"{m[k]:.4g}" for k in ("MMD-CD", "MMD-EMD", "COV-CD", "COV-EMD")),
                     f"{100 * m['1-NNA-CD']:.1f}", f"{100 * m['1-NNA-EMD']:.1f}", f"{m['JSD']:.4f}"))
    print(format_table(rows, ("steps", "MMD-CD", "MMD-EMD", "COV-CD", "COV-EMD", "1-NNA-CD %", "1-NNA-EMD %", "JSD"),
                       "markdown"))
    gap = 100 * (nna[1] - nna[100])
    print(f"\n1-step 1-NNA-CD minus 100-step: {gap:+.1f} points (goal: within 5)")


if __name__ == "__main__":
    main()
