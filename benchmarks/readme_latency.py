"""The README's CPU latency table: every image model in timm eager, zoo deploy form and onnxruntime.

    .venv/bin/python benchmarks/readme_latency.py [--threads 2] [--reps 100] [NAME_OR_FAMILY ...]

One `zoo.benchmark` run per backend (``torch``, then ``onnxruntime``), each with
``compare="timm"``: timm's model of the same name gets the same random weights and is timed
interleaved with ours. Prints a markdown table (batch 1, fp32, the models' default input);
``zoo benchmark NAMES --backend torch onnxruntime --compare timm`` gives the same figures
as a long table. Not a test: nothing here asserts on time.
"""
from __future__ import annotations

import argparse
import platform
import sys

import onnxruntime
import timm
import torch

import zoo
from zoo.benchmark import benchmark, expand_names
from zoo.tables import format_table, human_count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10)
    args = p.parse_args()
    names = expand_names(args.names) if args.names else zoo.list_models(task="image-classification")
    kw = dict(threads=args.threads, compare="timm", reps=args.reps, warmup=args.warmup,
              progress=lambda r: print(f"  {r.model} {r.backend}: {r.median_ms:.2f} ms, timm {r.peer_median_ms:.2f} ms",
                                       file=sys.stderr))
    eager = {r.model: r for r in benchmark(names, backend="torch", **kw)}
    ort = {r.model: r for r in benchmark(names, backend="onnxruntime", **kw)}
    rows = []
    for name in eager:
        e, o = eager[name], ort[name]
        rows.append((name, human_count(e.params), human_count(e.macs), f"{e.peer_median_ms:.2f}",
                     f"{e.median_ms:.2f}", f"{e.ratio:.2f}", f"{o.peer_median_ms:.2f}", f"{o.median_ms:.2f}",
                     f"{o.ratio:.2f}"))
    print(f"<!-- {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}, "
          f"timm {timm.__version__}, onnxruntime {onnxruntime.__version__}; median of {args.reps} interleaved "
          "rounds, batch 1, fp32 -->")
    print(format_table(rows, ("model", "params", "MACs", "timm eager ms", "zoo deploy ms", "zoo / timm",
                              "ORT timm ms", "ORT zoo ms", "ORT zoo / timm"), "markdown"))


if __name__ == "__main__":
    main()
