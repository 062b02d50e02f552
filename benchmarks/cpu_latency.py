"""CPU batch-1 latency: a zoo model's deploy form against timm's eager model, same run.

    .venv/bin/python benchmarks/cpu_latency.py [--threads 2] [--reps 200] [NAME_OR_FAMILY ...]

Names are zoo model names, which are also timm's; a family name (``efficientvit``,
``efficientformer``) stands for all its models. Default: every model timm also has.

Both models get the same random weights (timm's init, BatchNorm statistics randomised),
outputs are checked to agree, and the two are timed interleaved (one call of each per round,
in alternating order) under ``torch.inference_mode`` with the same thread count, so machine
noise hits both alike. Prints the median and p90 latencies and zoo/timm (lower is better).
Not a test: nothing here asserts on time.
"""
from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

import zoo
from zoo.testing import randomize_, rel_err


def timed(fn, x) -> float:
    start = time.perf_counter()
    fn(x)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", default=["efficientvit", "efficientformer"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, timm {timm.__version__}, threads {args.threads}, batch 1, 224x224, fp32")
    print(f"{'model':<22}{'timm eager ms':>15}{'zoo deploy ms':>15}{'zoo/timm':>10}{'p90 timm':>10}{'p90 zoo':>10}")
    names = [n for arg in args.names for n in (zoo.list_models(family=arg) or [arg])]
    for name in names:
        ref = timm.create_model(name).eval()
        randomize_(ref, scale=0.1)
        ours = zoo.create_model(name)
        ours.load_state_dict(ref.state_dict())
        ours.reparameterize()
        x = torch.randn(1, 3, 224, 224)
        with torch.inference_mode():
            err = rel_err(ours(x), ref(x))
            for _ in range(args.warmup):
                ref(x), ours(x)
            t_ref, t_ours = [], []
            for i in range(args.reps):
                order = ((ref, t_ref), (ours, t_ours)) if i % 2 == 0 else ((ours, t_ours), (ref, t_ref))
                for fn, sink in order:
                    sink.append(timed(fn, x))
        q = lambda ts, f: sorted(ts)[int(f * (len(ts) - 1))] * 1e3  # noqa: E731
        a, b = statistics.median(t_ref) * 1e3, statistics.median(t_ours) * 1e3
        print(f"{name:<22}{a:>15.2f}{b:>15.2f}{b / a:>10.2f}{q(t_ref, .9):>10.2f}{q(t_ours, .9):>10.2f}   (max rel diff {err:.1e})")


if __name__ == "__main__":
    main()
