"""distilled.cli: one static command table; a stage that fails to import is an error, not a missing command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from distilled import cli

REPO = Path(__file__).resolve().parents[1]


def _top_level_commands(parser) -> list[str]:
    (sub,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return list(sub.choices)


def test_the_table_names_every_command_in_help_order():
    listed = [name for names, _register in cli.COMMANDS for name in names.split()]
    assert _top_level_commands(cli.build_parser()) == listed
    assert {"generate", "reject", "preprocess", "merge", "train", "eval", "demo", "score-teacher"} <= set(listed)


def test_a_stage_that_fails_to_import_stops_the_cli():
    # The old importlib loop skipped a ModuleNotFoundError whose name was the stage module itself,
    # so `distill reject` silently disappeared. sys.modules[name] = None raises exactly that error.
    code = "import sys; sys.modules['distilled.generate.reject'] = None; import distilled.cli"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode != 0
    assert "distilled.generate.reject" in p.stderr and "ModuleNotFoundError" in p.stderr


def test_no_command_prints_help_and_exits_2(capsys):
    assert cli.main([]) == 2
    assert "COMMAND" in capsys.readouterr().out
