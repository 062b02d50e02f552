"""int8 ONNX against fp32 on a fine-tuned task (not a test): for each model, `make demo`'s
fine-tune (two pattern classes, 32 px, its flags) with 100 held-out images per class, then `zoo export --format onnx --quantize int8` calibrated on the
training images and verified on the held-out ones: top-1 agreement with fp32, the mean
absolute logit difference, and both top-1 accuracies against the labels.

    .venv/bin/python benchmarks/int8_accuracy.py [NAME ...] [--img-size 32] [--epochs 6]

Writes ``docs/results/int8_accuracy.md``. Speed is in ``docs/results/latency_cpu.md``
(``benchmarks/readme_latency.py``).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import yaml

from zoo.cli import main as zoo_main
from zoo.tables import format_table, results_file

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results" / "int8_accuracy.md"
DEFAULT = ["efficientformer_l1", "efficientformer_l3", "efficientformer_l7", "efficientformerv2_s0", "efficientvit_m0"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", default=DEFAULT)
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--out", default=str(RESULTS), help="results file; '' for none")
    args = p.parse_args()
    from zoo.cli.train import parse_train_args, run_train
    from zoo.data.patterns import make_pattern_folder

    work = Path(tempfile.mkdtemp(prefix="zoo-int8-"))
    data = make_pattern_folder(work / "patterns", num_classes=2, train_per_class=32, val_per_class=100,
                               size=args.img_size, seed=5)
    rows = []
    for name in args.names:
        best = run_train(parse_train_args([
            "--model", name, "--data-dir", str(data), "--img-size", str(args.img_size), "-b", "8", "--lr", "3e-3",
            "--epochs", str(args.epochs), "--workers", "0", "--scale", "0.6", "1.0", "--color-jitter", "0",
            "--smoothing", "0", "--log-interval", "0", "--output", str(work), "--experiment", name, "--device", "cpu",
            "--seed", "0"]))
        out = work / f"{name}-export"
        config = work / f"{name}_patterns.yaml"  # the fine-tuned model: 4 classes at img_size, its checkpoint
        config.write_text(yaml.safe_dump({"name": f"{name}_patterns", "base": name,
                                          "config": {"num_classes": 2, "img_size": args.img_size},
                                          "weights": str(work / name / "model_best.pth.tar")}))
        zoo_main(["export", "--model-config", str(config), "--pretrained", "config", "--format", "onnx", "--quantize",
                  "int8", "--calib-data", str(data / "train"), "--val-data", str(data / "val"), "--min-agreement", "0",
                  "--out", str(out)])
        q = json.loads((out / "export-report.json").read_text())["int8_onnx"]
        rows.append((name, f"{best['top1']:.1f}", f"{q['top1_fp32']:.1f}", f"{q['top1_int8']:.1f}",
                     f"{q['top1_int8'] - q['top1_fp32']:+.1f}", f"{q['top1_agreement']:.1%}",
                     f"{q['mean_abs_logit_diff']:.3g}", str(q["int8_weight_nodes"]), str(q["calib_images"])))
    with results_file(args.out or None, "int8 ONNX against fp32 on a fine-tuned task"):
        print(f"Each model fine-tuned from random initialisation for {args.epochs} epochs on `make demo`'s task (the "
              f"built-in pattern images, 2 classes, {args.img_size} px, 64 training images, the demo's flags), "
              "exported by `zoo export --format onnx --quantize int8`, calibrated on the training images and "
              "checked on 200 held-out images it never saw. Top-1 in percent; agreement: the share of held-out "
              "images whose int8 and fp32 top-1 classes agree.\n")
        print(format_table(rows, ["model", "val top-1 (torch)", "fp32 ONNX top-1", "int8 top-1", "int8 - fp32",
                                  "top-1 agreement", "mean |logit diff|", "int8-weight ops", "calibration images"],
                           "markdown"))


if __name__ == "__main__":
    main()
