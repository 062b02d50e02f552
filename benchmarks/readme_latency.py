"""CPU latency of every image model against what a user would pick instead; writes docs/results/latency_cpu.md.

    .venv/bin/python benchmarks/readme_latency.py [--threads 2] [--reps 100] [--no-compile] [NAME_OR_FAMILY ...]

One `zoo.benchmark` run (``compare="timm"`` on the torch backend, every peer): timm's model of
the same name gets the same random weights, the outputs are checked to agree, and in one
process, interleaved round by round, it times

- zoo's deploy form in eager PyTorch (the CPU kernels of `zoo.models.cpu_kernels`);
- timm eager (the 1.00 of every ratio);
- timm through ``torch.jit.freeze`` + ``optimize_for_inference``;
- timm under ``torch.compile`` with inductor freezing (compile time printed apart);
- onnxruntime on timm's export (TorchScript exporter, opset 17, static batch 1), on what
  ``zoo export`` writes (default flags), and on that file quantized to int8.

The header names the CPU's vector instruction sets (int8 speed depends on VNNI); file sizes of
the ONNX files are listed after the table.

Batch 1, fp32, the models' default input. Not a test: nothing here asserts on time.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import zoo
from zoo.benchmark import benchmark, expand_names, has_cxx_compiler
from zoo.tables import format_table, human_count, results_file

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results" / "latency_cpu.md"
COLUMNS = (("zoo deploy", None), ("timm jit.freeze", "jit"), ("timm compile+freeze", "compile"),
           ("ORT on timm's export", "ort"), ("ORT on zoo's export", "zoo-ort"), ("ORT on zoo's int8", "zoo-int8"))


def cpu_features() -> str:
    """The vector instruction sets of this CPU that matter to these kernels (Linux /proc/cpuinfo)."""
    try:
        flags = next(line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown (no /proc/cpuinfo)"
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")
    return ", ".join(f for f in wanted if f in flags) or "none of AVX2/AVX-512/VNNI"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (about a minute per model)")
    p.add_argument("--out", default=str(RESULTS), help="results file (default docs/results/latency_cpu.md); '' for none")
    args = p.parse_args()
    names = expand_names(args.names) if args.names else zoo.list_models(task="image-classification")
    peers = ["eager", "jit", "ort", "zoo-ort", "zoo-int8"] + ([] if args.no_compile or not has_cxx_compiler()
                                                             else ["compile"])
    with results_file(args.out or None, "CPU latency: zoo's deploy form against timm's deployment routes"):
        results = benchmark(names, backend="torch", threads=args.threads, compare="timm", reps=args.reps,
                            warmup=args.warmup, peers=peers,
                            progress=lambda r: print(f"  {r.model}: zoo {r.median_ms:.2f} ms, timm {r.peer_median_ms:.2f} ms",
                                                     file=sys.stderr))
        rows = []
        for r in results:
            cells = [r.model, human_count(r.params), human_count(r.macs), f"{r.peer_median_ms:.2f}"]
            for _, kind in COLUMNS:
                if kind is None:
                    cells.append(f"{r.median_ms / r.peer_median_ms:.2f}")
                else:
                    o = r.others.get(kind)
                    cells.append(f"{o['median_ms'] / r.peer_median_ms:.2f}" if o else "not run")
            rows.append(cells)
        print(f"CPU instruction sets: {cpu_features()}.\n")
        print(f"Batch 1, fp32 (int8: the last column), 224x224, {results[0].threads} threads; median of {args.reps} "
              "interleaved rounds after "
              f"{args.warmup} warm-up calls. Each route's time as a ratio to timm eager (1.00; below 1 is faster), "
              "all from the same process and the same weights.\n")
        print(format_table(rows, ["model", "params", "MACs", "timm eager ms"] + [c for c, _ in COLUMNS], "markdown"))
        compiled = [f"{r.model} {r.others['compile']['setup_s']:.0f} s" for r in results if "compile" in r.others]
        if compiled:
            print("\ntorch.compile time (not in the medians): " + ", ".join(compiled) + ".")
        worst = max(max([r.max_rel_diff] + [o["max_rel_diff"] for k, o in r.others.items() if k != "zoo-int8"])
                    for r in results)
        print(f"\nEvery fp32 route's output agrees with zoo's deploy form to a relative {worst:.1e} or better. "
              "int8 against fp32 on random images, top-1 agreement: "
              + ", ".join(f"{r.model} {r.others['zoo-int8']['int8_agreement']:.0%}" for r in results
                          if "zoo-int8" in r.others) + " (real-image agreement: `zoo export --quantize int8`).")
        sizes = [(r.model, *(f"{r.others[k]['file_bytes'] / 1e6:.1f}" if k in r.others else "-"
                             for k in ("ort", "zoo-ort", "zoo-int8"))) for r in results]
        print("\nONNX file sizes (MB):\n")
        print(format_table(sizes, ["model", "timm's export", "zoo's export", "zoo's int8"], "markdown"))


if __name__ == "__main__":
    main()
