"""The ``zoo`` command (also ``python -m zoo``): one module per command group.

Every subcommand is a function taking parsed arguments and returning an exit status. A
`ZooError` is printed as ``error: <message>`` without a traceback, with exit status 2;
``ZOO_DEBUG=1`` prints the traceback too, with the error's cause. Nothing else in zoo imports
this package: it is the top of the dependency graph.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

from zoo.errors import ZooError

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    from zoo import __version__
    from zoo.cli import benchmark, demo, detect, export, generate, models, slim, train

    p = argparse.ArgumentParser(prog="zoo", description="An efficient vision and 3D generation model zoo.")
    p.add_argument("--version", action="version", version=f"zoo {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (models, demo, export, benchmark, train, generate, detect, slim):
        group.register(sub)
    return p


def debug() -> bool:
    """``ZOO_DEBUG=1``: print tracebacks (with their causes) for user errors too."""
    return os.environ.get("ZOO_DEBUG", "").strip() not in ("", "0")


def main(argv: list[str] | None = None) -> int:
    from zoo.cli.train import _cmd_train

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # its own parser (YAML --config defaults); argparse's REMAINDER drops flags
        args = argparse.Namespace(func=_cmd_train, rest=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ZooError as e:
        if debug():
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
