"""Export every registered image model to ONNX and CoreML with `zoo export`, and tabulate the checks.

    .venv/bin/python benchmarks/export_all.py [--out export-all] [NAME_OR_FAMILY ...]

The tests export one model per family; this covers the rest (a few minutes per family on
two cores). Each model goes through the same code as ``zoo export NAME --format onnx coreml``
(random weights: what is checked is the conversion, not the accuracy). Exits non-zero if
any export fails, after trying them all.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import zoo
from zoo.benchmark import expand_names
from zoo.cli import main as zoo_main
from zoo.tables import format_table, results_file

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results" / "export_all.md"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", default=None)
    p.add_argument("--out", default="export-all")
    p.add_argument("--results", default=str(RESULTS), help="results file (default docs/results/export_all.md); '' for none")
    args = p.parse_args()
    with results_file(args.results or None, "ONNX and CoreML export of every image model"):
        return run(args)


def run(args) -> int:
    names = expand_names(args.names) if args.names else zoo.list_models(task="image-classification")
    rows, failed = [], []
    for name in names:
        out = Path(args.out) / name
        start = time.perf_counter()
        status = zoo_main(["export", name, "--format", "onnx", "coreml", "--out", str(out)])
        seconds = time.perf_counter() - start
        if status != 0:
            failed.append(name)
            rows.append((name, "FAILED", "", "", "", f"{seconds:.0f}"))
            continue
        onnx_r, coreml_r = json.loads((out / "export-report.json").read_text())["exports"]
        worst = max(c["rel_diff"] for c in onnx_r["comparisons"])
        batches = ",".join(str(c["batch_size"]) for c in onnx_r["comparisons"])
        mb = lambda r: sum(f["bytes"] for f in r["files"]) / 1e6  # noqa: E731
        rows.append((name, f"{worst:.1e} (batch {batches})", f"{mb(onnx_r):.1f}",
                     f"{len(coreml_r['checks'])} passed", f"{mb(coreml_r):.1f}", f"{seconds:.0f}"))
    print(format_table(rows, ("model", "ONNX vs torch, rel", "ONNX MB", "CoreML structural checks",
                              "CoreML MB (fp16)", "seconds"), "markdown"))
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
