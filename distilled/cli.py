"""The ``distill`` command: argument parsing only.

Each stage module exposes ``register_cli(subparsers)``, which adds its sub-commands and sets
``func`` (a callable taking the parsed ``argparse.Namespace`` and returning an exit code).
This file only lists the modules; it never holds stage logic, so two stages never edit the
same file to add a command.
"""

from __future__ import annotations

import argparse
import importlib
import sys

STAGE_MODULES = (
    "distilled.problems",
    "distilled.teacher_server",
    "distilled.generate",
    "distilled.reject",
    "distilled.tokenizer",
    "distilled.preprocess",
    "distilled.decontaminate",
    "distilled.convert",
    "distilled.train",
    "distilled.parity",
    "distilled.evaluate",
    "distilled.recipes",
    "distilled.demo",
)


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser from every stage module that is present."""
    parser = argparse.ArgumentParser(
        prog="distill",
        description="Distil DeepSeek-R1 reasoning into small models (MindSpore/Ascend, torch backend).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in STAGE_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # stage not built in this checkout
                continue
            raise
        module.register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``distill`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
