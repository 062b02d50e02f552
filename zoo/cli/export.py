"""`zoo export`: ONNX and CoreML files, verified, published together with their report."""
from __future__ import annotations

from pathlib import Path


def _cmd_export(args) -> int:
    """Export one model to every asked format; publish all files and the report together."""
    import shutil

    import torch

    import zoo
    from zoo.errors import ConfigError
    from zoo.export import to_coreml, to_onnx
    from zoo.export.files import make_stage, publish
    from zoo.io import atomic_write_json
    from zoo.registry import model_card
    from zoo.tables import format_table

    from zoo.cli.models import apply_model_config

    apply_model_config(args)
    card = model_card(args.name)  # unknown names fail before anything is written
    if card.task == "3d-detection":
        return _export_detector(args)
    int8_onnx = _check_compression_flags(args, card)
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError("--batch-size must be at least 1.")
    shape = None
    if card.input.kind != "image" and args.img_size is not None:
        raise ConfigError(f"--img-size is for image models; {args.name} takes {card.input.kind} {card.input.shape}.")
    if card.input.kind != "image" and args.batch_size is not None:
        shape = (args.batch_size, *card.input.shape)
    elif args.img_size is not None or args.batch_size is not None:
        c, h, w = card.input.shape
        if args.img_size is not None:
            h = w = args.img_size
        shape = (args.batch_size or 1, c, h, w)
    calib = _calibration_images(args, card, shape) if int8_onnx else None  # read before anything is built
    out = Path(args.out)
    stage = make_stage(out)
    reports, int8 = [], None
    try:
        for fmt in dict.fromkeys(args.format):
            if fmt == "onnx":
                r = to_onnx(args.name, stage / f"{args.name}.onnx", pretrained=args.pretrained, input_shape=shape,
                            opset=args.opset, dynamic_batch=args.batch_size is None or args.dynamic_batch,
                            exporter=args.exporter,
                            fp16=args.fp16, reparam=not args.no_reparam, verbose=False)
                if int8_onnx:
                    from zoo.export import quantize_onnx

                    images, val, labels = calib
                    int8 = quantize_onnx(stage / f"{args.name}.onnx", stage / f"{args.name}.int8.onnx", images, val,
                                         labels=labels, min_agreement=args.min_agreement,
                                         rule=_quant_rule(args.name))
            else:
                labels = args.class_labels
                r = to_coreml(args.name, stage / f"{args.name}.mlpackage", pretrained=args.pretrained,
                              input_shape=shape, precision="fp16" if args.fp16 else args.coreml_precision,
                              image_input=not args.tensor_input and card.input.kind == "image", class_labels=labels,
                              minimum_target=args.coreml_target, quantize=args.quantize, palettize=args.palettize,
                              reparam=not args.no_reparam, verbose=False)
            reports.append(r)
        for r in reports:
            r.relocate(stage, Path("."))  # the report lists files relative to its own folder
        extra = {}
        if int8 is not None:
            int8.path, int8.source = f"{args.name}.int8.onnx", f"{args.name}.onnx"
            int8.files = [{**f, "path": Path(f["path"]).name} for f in int8.files]
            extra["int8_onnx"] = int8.to_dict()
        atomic_write_json(stage / "export-report.json", {
            "model": args.name, "pretrained": args.pretrained, "zoo_version": zoo.__version__,
            "torch_version": torch.__version__, "exports": [r.to_dict() for r in reports], **extra,
        })
        publish(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    rows = []
    for r in reports:
        worst = max((c.rel_diff for c in r.comparisons), default=None)
        batches = ",".join(str(c.batch_size) for c in r.comparisons)
        check = f"rel {worst:.1e} at batch {batches}" if worst is not None else "structural only"
        size = sum(f["bytes"] for f in r.files) / 1e6
        rows.append((r.format, str(out / r.path), f"{size:.1f}", r.precision, check, f"{r.seconds:.1f}"))
    if int8 is not None:
        acc = (f", top-1 {int8.top1_fp32:.1f} -> {int8.top1_int8:.1f}" if int8.top1_int8 is not None else "")
        rows.append(("onnx int8", str(out / int8.path), f"{sum(f['bytes'] for f in int8.files) / 1e6:.1f}", "int8",
                     f"top-1 agrees on {int8.top1_agreement:.1%} of {int8.val_images}{acc}", f"{int8.seconds:.1f}"))
    print(format_table(rows, ("format", "file", "MB", "precision", "verification", "seconds")))
    print(f"\nwrote {out / 'export-report.json'}")
    return 0


def _check_compression_flags(args, card) -> bool:
    """Check --quantize / --palettize / --calib-data before anything is built; True when an
    int8 ONNX file is asked for."""
    from zoo.errors import ConfigError
    from zoo.export.coreml_export import check_compression

    check_compression(args.quantize, args.palettize)
    if args.palettize and "coreml" not in args.format:
        raise ConfigError("--palettize compresses CoreML weights: add --format coreml.")
    int8_onnx = args.quantize == "int8" and "onnx" in args.format
    if int8_onnx:
        if card.task != "image-classification":
            raise ConfigError(f"int8 ONNX is verified on a classifier's top-1; {args.name} is a {card.task} model.")
        if args.fp16:
            raise ConfigError("--quantize int8 quantizes the fp32 export: drop --fp16.")
        if not args.calib_data:
            raise ConfigError("ONNX --quantize int8 calibrates on images: give --calib-data DIR (a folder of images "
                              "or an ImageFolder like the deployment's), or --calib-data synthetic to calibrate on "
                              "random images knowingly.")
    elif args.calib_data or args.val_data:
        raise ConfigError("--calib-data / --val-data are for ONNX --quantize int8.")
    if args.calib_size < 1:
        raise ConfigError("--calib-size must be at least 1.")
    return int8_onnx


def _calibration_images(args, card, shape):
    """(calibration images, held-out images, their labels or None), each image ``[1, 3, H, W]``
    float32 through the model's eval transform; a fifth held out unless --val-data."""
    import random

    import numpy as np

    from zoo.data.images import eval_transform, image_files
    from zoo.errors import DataError

    size = shape[-1] if shape else card.input.shape[-1]
    if args.calib_data == "synthetic":
        rng = np.random.default_rng(0)
        n = args.calib_size + max(args.calib_size // 4, 8)
        images = [rng.standard_normal((1, 3, size, size)).astype(np.float32) for _ in range(n)]
        return images[: args.calib_size], images[args.calib_size:], None
    transform = eval_transform(card.input, size)

    def load(paths, what):
        from PIL import Image

        out, bad = [], []
        for p in paths:
            try:
                with Image.open(p) as f:
                    out.append(transform(f.convert("RGB"))[None].numpy())
            except (OSError, ValueError):
                bad.append(p)
        if not out:
            raise DataError(f"{what}: none of the {len(paths)} images could be read (e.g. {paths[0]}).")
        return out, bad

    files, _ = image_files(args.calib_data, "--calib-data")
    files = list(files)
    random.Random(0).shuffle(files)
    if args.val_data:
        val_files, val_labels = image_files(args.val_data, "--val-data")
    else:
        if len(files) < 2:
            raise DataError(f"--calib-data {args.calib_data} has {len(files)} image: a fifth is held out to verify "
                            "the int8 model, so give at least 2 (or --val-data DIR).")
        n_val = max(1, len(files) // 5)
        val_files, val_labels, files = files[:n_val], None, files[n_val:]
    calib, _ = load(files[: args.calib_size], "--calib-data")
    val, bad = load(val_files, "--val-data" if args.val_data else "--calib-data")
    if val_labels is not None:
        keep = [i for i, p in enumerate(val_files) if p not in set(bad)]
        val_labels = [val_labels[i] for i in keep]
    return calib, val, val_labels


def _quant_rule(name: str):
    """The model's own int8 rule (``int8_rule`` on its class), else the default."""
    from zoo.export import QuantRule
    from zoo.registry import model_card

    return QuantRule.from_model(getattr(model_card(name).builder, "int8_rule", None))


def _export_detector(args) -> int:
    """A detector's dense parts (the BEV backbone with the head, and the image branch of a camera
    model) as verified ONNX files; the sparse stages do not export (see the report's note)."""
    import shutil

    import torch

    import zoo
    from zoo.cli.detect import load_detector
    from zoo.errors import ExportError
    from zoo.export import to_onnx
    from zoo.export.files import make_stage, publish
    from zoo.io import atomic_write_json
    from zoo.models.pathfusion.export_parts import NOT_EXPORTED, export_parts
    from zoo.registry import create_model

    if "onnx" not in args.format:
        raise ExportError(f"{args.name} is a 3D detector: its parts export to ONNX only (--format onnx).")
    if args.pretrained and Path(args.pretrained).is_file():
        model = load_detector(args.name, args.pretrained, False)
    else:
        model = create_model(args.name, pretrained=args.pretrained or False).eval()
    image_size = tuple(zoo.model_card(args.name).input.shape[2:]) or (375, 1242)
    out = Path(args.out)
    stage = make_stage(out)
    reports = []
    try:
        for part, (module, shape) in export_parts(model, image_size).items():
            r = to_onnx(module, stage / f"{args.name}.{part}.onnx", input_shape=shape, opset=args.opset,
                        exporter="dynamo" if args.exporter == "auto" else args.exporter, verbose=False)
            r.relocate(stage, Path("."))
            reports.append((part, r))
        atomic_write_json(stage / "export-report.json", {
            "model": args.name, "pretrained": args.pretrained, "zoo_version": zoo.__version__,
            "torch_version": torch.__version__, "exports": [{"part": p, **r.to_dict()} for p, r in reports],
            "not_exported": NOT_EXPORTED,
        })
        publish(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    for part, r in reports:
        worst = max(c.rel_diff for c in r.comparisons)
        print(f"{part:<13} {out / r.path}  rel {worst:.1e} in onnxruntime")
    print(NOT_EXPORTED.split(":")[0] + " (see export-report.json)")
    print(f"wrote {out / 'export-report.json'}")
    return 0


def register(sub) -> None:
    s = sub.add_parser("export", help="export a model to ONNX and/or CoreML, verified, with export-report.json")
    s.add_argument("name", nargs="?", default="")
    s.add_argument("--model-config", default="", help="a model-config file (zoo slim writes them); its model")
    s.add_argument("--pretrained", default=None, help="weight tag or local file (default: random init)")
    s.add_argument("--format", nargs="+", choices=("onnx", "coreml"), default=["onnx", "coreml"])
    s.add_argument("--out", required=True, help="output folder; files appear only when every export passed")
    s.add_argument("--img-size", type=int, default=None, help="square input side (default: the model's)")
    s.add_argument("--batch-size", type=int, default=None,
                   help="trace and verify at this batch; it fixes the ONNX batch unless --dynamic-batch (default: "
                        "batch 1, dynamic ONNX batch; CoreML always takes the traced batch)")
    s.add_argument("--dynamic-batch", action="store_true",
                   help="with --batch-size: keep the ONNX batch dimension symbolic (without it, it already is)")
    s.add_argument("--opset", type=int, default=20,
                   help="ONNX opset (dynamo: 18+, torchscript: 7-20); 20 writes GELU as one Gelu op, which onnxruntime "
                        "runs fused; below 20 it is decomposed into Erf, Div, Mul, Add")
    s.add_argument("--exporter", choices=("auto", "dynamo", "torchscript"), default="auto",
                   help="auto: the one the model names (PSF: torchscript), else dynamo")
    s.add_argument("--fp16", action="store_true", help="fp16 ONNX (float16 input/output) and fp16 CoreML")
    s.add_argument("--coreml-precision", choices=("fp16", "fp32"), default="fp16",
                   help="CoreML compute precision when --fp16 is not given (default fp16, as the Neural Engine runs)")
    s.add_argument("--coreml-target", default="iOS16", help="minimum deployment target (iOS15 or newer)")
    s.add_argument("--class-labels", default=None, help="text file, one label per line: CoreML classifier output")
    s.add_argument("--tensor-input", action="store_true", help="CoreML takes a normalised tensor instead of an image")
    s.add_argument("--no-reparam", action="store_true", help="export the training form (no BatchNorm folding)")
    s.add_argument("--quantize", choices=("int8",), default=None,
                   help="ONNX: also write NAME.int8.onnx (static QDQ, per-channel weights, calibrated on "
                        "--calib-data, verified against fp32); CoreML: int8 weights (no data needed)")
    s.add_argument("--palettize", type=int, default=None, metavar="BITS", help="CoreML: 4, 6 or 8-bit palette weights")
    s.add_argument("--calib-data", default="", help="images for int8 calibration (a folder or an ImageFolder; "
                                                      "'synthetic': random images)")
    s.add_argument("--calib-size", type=int, default=128, help="calibration images used (default 128)")
    s.add_argument("--val-data", default="", help="held-out images for the int8 check (default: a fifth of --calib-data); "
                                                    "class folders also give top-1 accuracies")
    s.add_argument("--min-agreement", type=float, default=0.99,
                   help="int8 must agree with fp32's top-1 on at least this share of held-out images")
    s.set_defaults(func=_cmd_export)
