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
    out = Path(args.out)
    stage = make_stage(out)
    reports = []
    try:
        for fmt in dict.fromkeys(args.format):
            if fmt == "onnx":
                r = to_onnx(args.name, stage / f"{args.name}.onnx", pretrained=args.pretrained, input_shape=shape,
                            opset=args.opset, dynamic_batch=args.batch_size is None or args.dynamic_batch,
                            exporter=args.exporter,
                            fp16=args.fp16, reparam=not args.no_reparam, verbose=False)
            else:
                labels = args.class_labels
                r = to_coreml(args.name, stage / f"{args.name}.mlpackage", pretrained=args.pretrained,
                              input_shape=shape, precision="fp16" if args.fp16 else args.coreml_precision,
                              image_input=not args.tensor_input and card.input.kind == "image", class_labels=labels,
                              minimum_target=args.coreml_target, reparam=not args.no_reparam, verbose=False)
            reports.append(r)
        for r in reports:
            r.relocate(stage, Path("."))  # the report lists files relative to its own folder
        atomic_write_json(stage / "export-report.json", {
            "model": args.name, "pretrained": args.pretrained, "zoo_version": zoo.__version__,
            "torch_version": torch.__version__, "exports": [r.to_dict() for r in reports],
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
    print(format_table(rows, ("format", "file", "MB", "precision", "verification", "seconds")))
    print(f"\nwrote {out / 'export-report.json'}")
    return 0


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
    s.add_argument("--opset", type=int, default=18, help="ONNX opset (dynamo: 18+, torchscript: 7-20)")
    s.add_argument("--exporter", choices=("auto", "dynamo", "torchscript"), default="auto",
                   help="auto: the one the model names (PSF: torchscript), else dynamo")
    s.add_argument("--fp16", action="store_true", help="fp16 ONNX (float16 input/output) and fp16 CoreML")
    s.add_argument("--coreml-precision", choices=("fp16", "fp32"), default="fp16",
                   help="CoreML compute precision when --fp16 is not given (default fp16, as the Neural Engine runs)")
    s.add_argument("--coreml-target", default="iOS16", help="minimum deployment target (iOS15 or newer)")
    s.add_argument("--class-labels", default=None, help="text file, one label per line: CoreML classifier output")
    s.add_argument("--tensor-input", action="store_true", help="CoreML takes a normalised tensor instead of an image")
    s.add_argument("--no-reparam", action="store_true", help="export the training form (no BatchNorm folding)")
    s.set_defaults(func=_cmd_export)
