"""`zoo list`, `zoo info`, `zoo download`: the registry and the weights cache."""
from __future__ import annotations

import json
import sys


def apply_model_config(args, attr: str = "name") -> None:
    """``--model-config FILE`` (a zoo model-config, as `zoo slim` writes): register its
    architecture and make it the command's model. A detector's architecture YAML is left for
    its task to read."""
    from zoo.errors import ConfigError
    from zoo.registry import is_model_config, register_model_config

    path = getattr(args, "model_config", "")
    if not path:
        if not getattr(args, attr):
            raise ConfigError("name a model (zoo list shows them) or give --model-config FILE.")
        return
    from pathlib import Path

    if not Path(path).is_file():
        raise ConfigError(f"--model-config {path}: no such file.")
    if not is_model_config(path):
        return
    name = register_model_config(path)
    given = getattr(args, attr)
    if isinstance(given, list):
        setattr(args, attr, [n for n in given if n != name] + [name])
    elif given and given != name:
        raise ConfigError(f"--model {given} and --model-config {path} (which describes {name}) disagree; give one.")
    else:
        setattr(args, attr, name)
    args.model_config = ""


def _card_with_complexity(name: str) -> dict:
    """The card as data, with params and MACs (computed once, then cached)."""
    from zoo.flops import complexity
    from zoo.registry import model_card

    return {**model_card(name).to_dict(), "complexity": complexity(name)}


def _cmd_list(args) -> int:
    from zoo.registry import list_models
    from zoo.tables import MODEL_HEADERS, format_table, model_rows

    names = list_models(args.pattern, task=args.task)
    if args.format == "json":
        print(json.dumps([_card_with_complexity(n) for n in names], indent=2))
    elif args.format == "names":
        print("\n".join(names))
    else:
        print(format_table(model_rows(names), MODEL_HEADERS, args.format))
    return 0


def _cmd_info(args) -> int:
    apply_model_config(args)
    print(json.dumps(_card_with_complexity(args.name), indent=2))
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


def register(sub) -> None:
    s = sub.add_parser("list", help="list registered models")
    s.add_argument("pattern", nargs="?", default="*", help="shell-style name pattern, e.g. 'efficientvit_*'")
    s.add_argument("--task", default=None, help="only models for this task, e.g. image-classification")
    s.add_argument("--format", choices=("table", "json", "markdown", "names"), default="table")
    s.set_defaults(func=_cmd_list)

    s = sub.add_parser("info", help="print a model card as JSON")
    s.add_argument("name", nargs="?", default="")
    s.add_argument("--model-config", default="", help="a model-config file (zoo slim writes them)")
    s.set_defaults(func=_cmd_info)

    s = sub.add_parser("download", help="fetch a model's weights into the cache; print path and sha256")
    s.add_argument("name")
    s.add_argument("--tag", default=None, help="weight tag (default: the model's default weights)")
    s.set_defaults(func=_cmd_download)
