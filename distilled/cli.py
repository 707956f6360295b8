"""The ``distill`` command: one static table of commands (litgpt's ``__main__.py``).

Each stage module exposes ``register_cli(subparsers)``, which adds its sub-commands and sets
``func`` (a callable taking the parsed ``argparse.Namespace`` and returning an exit code). This file
only lists them; it never holds stage logic.

Why a static table: the modules are imported here directly, so a stage whose module fails to
import is an error at start-up with its traceback, not a command that silently vanishes from
``distill --help``. Start-up stays fast because stage modules import their heavy dependencies
(torch, MindSpore, pyarrow, transformers) inside the functions that need them.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from distilled.train import convert
from distilled.data import decontaminate
from distilled.demo import runner as demo
from distilled.eval import runner as evaluate
from distilled.generate import runner as generate
from distilled.train import parity
from distilled.data import preprocess
from distilled.generate import problems
from distilled import recipes
from distilled.generate import reject
from distilled.generate import teacher_server
from distilled.data import tokenizer
from distilled.train import loop as train
from distilled.kd import score as kd_score

Register = Callable[[argparse._SubParsersAction], None]

COMMANDS: tuple[tuple[str, Register], ...] = (
    # (the top-level commands it adds, in `distill --help` order) -> the stage's register_cli
    ("problems", problems.register_cli),
    ("serve-teacher", teacher_server.register_cli),
    ("generate", generate.register_cli),
    ("reject", reject.register_cli),
    ("score-teacher", kd_score.register_cli),
    ("tokenizer", tokenizer.register_cli),
    ("preprocess merge", preprocess.register_cli),
    ("decontaminate", decontaminate.register_cli),
    ("convert", convert.register_cli),
    ("train", train.register_cli),
    ("parity", parity.register_cli),
    ("eval", evaluate.register_cli),
    ("recipe", recipes.register_cli),
    ("demo", demo.register_cli),
)
"""Every ``distill`` command, the pipeline's order: teacher -> traces -> data -> training -> eval."""


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser from :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="distill",
        description="Distil DeepSeek-R1 reasoning into small models (MindSpore/Ascend, torch backend).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for _names, register in COMMANDS:
        register(sub)
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
