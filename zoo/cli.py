"""The ``zoo`` command (also ``python -m zoo``).

Every subcommand is a function taking parsed arguments and returning an exit status. A
`ZooError` is printed as ``error: <message>`` without a traceback, with exit status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from zoo.errors import ZooError

__all__ = ["main", "build_parser"]


def _cmd_list(args) -> int:
    from zoo.registry import list_models
    from zoo.tables import MODEL_HEADERS, format_table, model_rows

    names = list_models(args.pattern, task=args.task)
    if args.format == "json":
        from zoo.registry import model_card

        print(json.dumps([model_card(n).to_dict() for n in names], indent=2))
    elif args.format == "names":
        print("\n".join(names))
    else:
        print(format_table(model_rows(names), MODEL_HEADERS, args.format))
    return 0


def _cmd_info(args) -> int:
    from zoo.registry import model_card

    print(json.dumps(model_card(args.name).to_dict(), indent=2))
    return 0


def _cmd_download(args) -> int:
    from zoo.errors import UnknownModelError
    from zoo.hub import fetch
    from zoo.io import sha256_file
    from zoo.registry import model_card

    card = model_card(args.name)
    tag = args.tag or card.default_tag
    if tag is None:
        raise UnknownModelError(f"{args.name} has no default weights; choose one with --tag: {sorted(card.weights)}")
    if tag not in card.weights:
        raise UnknownModelError(f"{args.name} has no weights tagged {tag!r}; tags: {sorted(card.weights) or 'none'}")
    path = fetch(args.name, card.weights[tag], progress=sys.stderr.isatty())
    print(f"{path}\nsha256 {sha256_file(path)}")
    return 0


def _cmd_demo(args) -> int:
    """Build every registered model on CPU and report params, MACs and one forward's time."""
    import torch

    from zoo.flops import complexity
    from zoo.io import atomic_write_json
    from zoo.registry import create_model, list_models, model_card
    from zoo.tables import format_table, human_count

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = list_models()
    print(f"zoo: {len(names)} registered models\n")
    rows, report = [], {}
    for name in names:
        card = model_card(name)
        model = create_model(name)
        inputs = card.input.example(batch_size=1)
        with torch.inference_mode():
            start = time.perf_counter()
            y = model(*inputs)
            ms = (time.perf_counter() - start) * 1e3
        cx = complexity(name)
        rows.append((name, card.family, human_count(cx["params"]), human_count(cx["macs"]), tuple(y.shape), f"{ms:.1f}"))
        report[name] = {**cx, "output_shape": list(y.shape), "first_forward_ms": ms}
    print(format_table(rows, ("model", "family", "params", "MACs", "output", "first forward ms")))
    atomic_write_json(out / "models.json", report)
    print(f"\nwrote {out / 'models.json'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from zoo import __version__

    p = argparse.ArgumentParser(prog="zoo", description="An efficient vision and 3D generation model zoo.")
    p.add_argument("--version", action="version", version=f"zoo {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("list", help="list registered models")
    s.add_argument("pattern", nargs="?", default="*", help="shell-style name pattern, e.g. 'efficientvit_*'")
    s.add_argument("--task", default=None, help="only models for this task, e.g. image-classification")
    s.add_argument("--format", choices=("table", "json", "markdown", "names"), default="table")
    s.set_defaults(func=_cmd_list)

    s = sub.add_parser("info", help="print a model card as JSON")
    s.add_argument("name")
    s.set_defaults(func=_cmd_info)

    s = sub.add_parser("download", help="fetch a model's weights into the cache; print path and sha256")
    s.add_argument("name")
    s.add_argument("--tag", default=None, help="weight tag (default: the model's default weights)")
    s.set_defaults(func=_cmd_download)

    s = sub.add_parser("demo", help="the main job on built-in data: build every model, report, write results")
    s.add_argument("--out", default="demo-output", help="folder for results (default: demo-output)")
    s.set_defaults(func=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ZooError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
