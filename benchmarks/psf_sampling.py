"""PSF sampling: one step against 1000 Euler steps (same model, same noise, same run), and metrics.

    .venv/bin/python benchmarks/psf_sampling.py [--model psf_tiny] [--num 32] [--gap-num 128]
        [--teacher runs/psf_tiny/reflow/model_best.pth.tar] [--before OLD.safetensors] [--timing-num 16]
        [--threads 2] [--seed S] [--gap-ref-seed R]

1. Wall time of ``--timing-num`` clouds with 1 Euler step and with 1000 (the paper's flow
   baseline's step count), interleaved over ``--reps`` rounds; prints the ratio.
2. Generation metrics (`zoo.metrics.compute_all_metrics`, exact EMD) of 1-, 10- and
   100-step samples from the same noise against ``--num`` procedural reference shapes.
3. The quality gap (the 1-step 1-NNA-CD against the 100-step one's) on
   ``--gap-num`` samples and as many references, Chamfer metrics only (exact EMD is too slow
   at that size), with the binomial standard error of each 1-NNA: at 32 samples it is about
   8 points. With ``--teacher`` (a multi-step checkpoint, e.g. the
   reflow stage the generator was distilled from) its 100-step samples are measured too;
   with ``--before`` (earlier weights) their one-step samples of the same noise.

Not a test: nothing asserts on time.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch

import zoo
from zoo.metrics import compute_all_metrics
from zoo.tables import format_table, results_file
from zoo.data.pointclouds import procedural_references

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results" / "psf_sampling.md"


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
    p.add_argument("--gap-num", type=int, default=128, help="samples (and references) for the 1-NNA-CD gap")
    p.add_argument("--teacher", default=None, help="multi-step checkpoint to compare at 100 steps")
    p.add_argument("--before", default=None, help="earlier weights of the same model: their 1-step row beside")
    p.add_argument("--gap-ref-seed", type=int, default=4321, help="seed of the gap's procedural references")
    p.add_argument("--out", default=str(RESULTS), help="results file (default docs/results/psf_sampling.md); '' for none")
    args = p.parse_args()
    with results_file(args.out or None, f"{args.model}: one-step sampling against many steps"):
        run(args)


def run(args) -> None:
    torch.set_num_threads(args.threads)
    model = zoo.create_model(args.model, pretrained=args.pretrained if args.pretrained else True)
    noise = model.noise(args.num, seed=args.seed)
    timing_noise = noise[:args.timing_num]

    model.sample(noise=timing_noise, steps=2)  # warm-up: the first call pays for allocations and thread start
    times = {1: [], args.long_steps: []}
    for _ in range(args.reps):
        for steps in times:
            start = time.perf_counter()
            model.sample(noise=timing_noise, steps=steps)
            times[steps].append(time.perf_counter() - start)
    t1, tn = statistics.median(times[1]), statistics.median(times[args.long_steps])
    print(f"{args.model}, {args.threads} threads: {len(timing_noise)} clouds of {model.num_points} points per call, "
          f"median of {args.reps}; metrics on {args.num} samples against {args.num} procedural references.\n")
    print(format_table([("1-step Euler", f"{t1 * 1e3:.0f}", "1.0"),
                        (f"{args.long_steps}-step Euler", f"{tn * 1e3:.0f}", f"{tn / t1:.0f}")],
                       ("sampler", "ms", "time / 1-step"), "markdown"))
    print(f"\nspeed-up of one step over {args.long_steps}: {tn / t1:.0f}x\n")

    refs = procedural_references(args.num, model.num_points, seed=1234)
    rows, nna = [], {}
    for steps in (1, 10, 100):
        m = compute_all_metrics(model.sample(noise=noise, steps=steps), refs, emd_exact=True)
        nna[steps] = m["1-NNA-CD"]
        rows.append((steps, *(f"{m[k]:.4g}" for k in ("MMD-CD", "MMD-EMD", "COV-CD", "COV-EMD")),
                     f"{100 * m['1-NNA-CD']:.1f}", f"{100 * m['1-NNA-EMD']:.1f}", f"{m['JSD']:.4f}"))
    print(format_table(rows, ("steps", "MMD-CD", "MMD-EMD", "COV-CD", "COV-EMD", "1-NNA-CD %", "1-NNA-EMD %", "JSD"),
                       "markdown"))
    print(f"\n1-step 1-NNA-CD minus 100-step on these {args.num}: {100 * (nna[1] - nna[100]):+.1f} points")

    # the gap on a larger set, Chamfer only
    gap_noise = model.noise(args.gap_num, seed=args.seed + 1)
    gap_refs = procedural_references(args.gap_num, model.num_points, seed=args.gap_ref_seed)
    print(f"\n{args.gap_num} samples (noise seed {args.seed + 1}) against {args.gap_num} references "
          f"(seed {args.gap_ref_seed}; the training shapes are seed 0), ± one binomial standard error:\n")
    runs = [("psf (distilled)", model, 1), ("psf (distilled)", model, 100)]
    if args.before:
        runs.append((f"before ({Path(args.before).name})", zoo.create_model(args.model, pretrained=args.before), 1))
    if args.teacher:
        teacher = zoo.create_model(args.model, pretrained=args.teacher)
        # a stage checkpoint holds the bare network: it generates in the generator's training coordinates
        teacher.data_mean.copy_(model.data_mean)
        teacher.data_std.copy_(model.data_std)
        runs.append((f"teacher ({Path(args.teacher).parent.name})", teacher, 100))
    rows, gap_nna = [], {}
    for name, net, steps in runs:
        m = compute_all_metrics(net.sample(noise=gap_noise, steps=steps), gap_refs, include_emd=False)
        se = 100 * math.sqrt(m["1-NNA-CD"] * (1 - m["1-NNA-CD"]) / (2 * args.gap_num))
        gap_nna[(name, steps)] = m["1-NNA-CD"]
        rows.append((name, steps, f"{m['MMD-CD']:.4g}", f"{m['COV-CD']:.4g}", f"{100 * m['1-NNA-CD']:.1f} ± {se:.1f}",
                     f"{m['JSD']:.4f}"))
    print(format_table(rows, ("model", "steps", "MMD-CD", "COV-CD", "1-NNA-CD %", "JSD"), "markdown"))
    one = gap_nna[("psf (distilled)", 1)]
    for (name, steps), v in gap_nna.items():
        if steps == 100:
            print(f"\n1-step 1-NNA-CD minus {name} at 100 steps: {100 * (one - v):+.1f} points")


if __name__ == "__main__":
    main()
