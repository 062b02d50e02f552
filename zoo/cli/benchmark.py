"""`zoo benchmark`: params, MACs, latency and throughput, optionally beside timm."""
from __future__ import annotations

import json
import sys


PEER_LABELS = {"jit": "timm jit.freeze", "compile": "timm compile+freeze", "ort": "timm ORT", "zoo-ort": "zoo ORT",
               "zoo-int8": "zoo ORT int8"}


def _cmd_benchmark(args) -> int:
    from zoo.cli.models import apply_model_config

    apply_model_config(args, "names")
    from zoo.benchmark import benchmark
    from zoo.io import atomic_write
    from zoo.tables import format_table, human_count

    extra = [p for p in dict.fromkeys(args.peers) if p != "eager"]
    headers = ["model", "backend", "params", "MACs", "batch", "median ms", "p90 ms", "img/s"]
    if args.compare:
        headers += ["timm median ms", "timm p90 ms", "zoo/timm"]
        for p in extra:
            headers += [f"{PEER_LABELS[p]} ms", f"zoo/{PEER_LABELS[p]}"]

    def row(r):
        cells = [r.model, r.backend, human_count(r.params), human_count(r.macs), str(r.batch_size),
                 f"{r.median_ms:.2f}", f"{r.p90_ms:.2f}", f"{r.throughput:.1f}"]
        if args.compare:
            cells += [f"{r.peer_median_ms:.2f}", f"{r.peer_p90_ms:.2f}", f"{r.ratio:.2f}"]
            for p in extra:
                o = r.others.get(p)
                cells += [f"{o['median_ms']:.2f}", f"{o['ratio']:.2f}"] if o else ["not run", "-"]
        return cells

    def progress(r):
        if not args.quiet and args.format == "table":
            print(f"  {r.model} on {r.backend}: {r.median_ms:.2f} ms" + (
                f" (timm {r.peer_median_ms:.2f} ms, ratio {r.ratio:.2f}, outputs agree to {r.max_rel_diff:.1e})"
                if r.ratio is not None else ""), file=sys.stderr)

    results = []
    for backend in dict.fromkeys(args.backend):
        results += benchmark(args.names, backend=backend, threads=args.threads, batch_size=args.batch_size,
                             img_size=args.img_size, compare=args.compare, reps=args.reps, warmup=args.warmup,
                             dtype=args.dtype, channels_last=args.channels_last,
                             peers=args.peers if backend == "torch" else ("eager",), progress=progress)
    rows = [row(r) for r in results]
    import torch

    if args.format == "table":
        print(f"torch {torch.__version__}, {results[0].threads} threads, fp32 unless noted; "
              f"{args.reps} interleaved rounds after {args.warmup} warm-up calls")
    if args.format == "json":
        print(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        print(format_table(rows, headers, args.format))
    compiled = [f"{r.model} {r.others['compile']['setup_s']:.0f} s" for r in results if "compile" in r.others]
    if compiled and args.format == "table":
        print("torch.compile time (not in the medians): " + ", ".join(compiled))
    if args.csv:
        import csv

        with atomic_write(args.csv, "w") as f:
            w = csv.DictWriter(f, fieldnames=list(results[0].to_dict()))
            w.writeheader()
            for r in results:
                w.writerow(r.to_dict())
        print(f"wrote {args.csv}", file=sys.stderr)
    return 0


def register(sub) -> None:
    s = sub.add_parser("benchmark", help="params, MACs, latency and throughput; --compare timm for the ratio")
    s.add_argument("names", nargs="*", help="model names, family names or patterns")
    s.add_argument("--model-config", default="", help="a model-config file (zoo slim writes them): benchmark it too")
    s.add_argument("--backend", nargs="+", choices=("torch", "onnxruntime", "cuda"), default=["torch"])
    s.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's setting)")
    s.add_argument("--batch-size", type=int, default=1)
    s.add_argument("--img-size", type=int, default=None)
    s.add_argument("--compare", choices=("timm",), default=None, help="time timm's model too, interleaved")
    s.add_argument("--peers", nargs="+", choices=("eager", "jit", "compile", "ort", "zoo-ort", "zoo-int8"), default=["eager"],
                   help="with --compare timm on the torch backend: also time timm through jit.freeze, torch.compile "
                        "with freezing (compile time reported apart), onnxruntime on timm's export, zoo's ORT export and "
                        "its int8 version")
    s.add_argument("--reps", type=int, default=100)
    s.add_argument("--warmup", type=int, default=10)
    s.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="cuda backend only")
    s.add_argument("--channels-last", action="store_true", help="cuda backend only")
    s.add_argument("--format", choices=("table", "markdown", "json"), default="table")
    s.add_argument("--csv", default=None, help="also write every figure to this CSV file")
    s.add_argument("--quiet", action="store_true", help="no per-model progress lines")
    s.set_defaults(func=_cmd_benchmark)
