"""distilled.settings: a dataclass declares each option once; the CLI flags follow from it."""

from __future__ import annotations

import argparse
import doctest
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from distilled import settings
from distilled.settings import add_arguments, from_args, option


@dataclass
class Example:
    src: Path = option(help="input file")
    dst: str | None = option(None, help="output file")
    workers: int = option(2, help="worker processes")
    timeout: float = option(5.0, help="seconds")
    kind: str = option("math", help="verifier", choices=("math", "choice"))
    tasks: list[str] = option(["math_500"], help="task names")
    strict: bool = option(False, help="stop at the first bad line")
    progress: bool = option(True, help="no progress bar", flag="--no-progress")
    resume: bool = option(True, help="resume a partial run")
    internal: int = field(default=7)  # no option(): not a flag


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(p, Example)
    return p


def test_defaults_types_and_required():
    cfg = from_args(Example, parser().parse_args(["--src", "in.jsonl"]))
    assert cfg == Example(src=Path("in.jsonl"))
    assert cfg.tasks == ["math_500"] and cfg.tasks is not Example(src=Path("x")).tasks
    with pytest.raises(SystemExit):
        parser().parse_args([])  # --src is required


def test_every_kind_of_flag():
    cfg = from_args(Example, parser().parse_args(
        ["--src", "a", "--dst", "b", "--workers", "4", "--timeout", "0.5", "--kind", "choice",
         "--tasks", "aime24", "aime25", "--strict", "--no-progress", "--no-resume"]))
    assert (cfg.dst, cfg.workers, cfg.timeout, cfg.kind, cfg.tasks) == ("b", 4, 0.5, "choice", ["aime24", "aime25"])
    assert cfg.strict is True and cfg.progress is False and cfg.resume is False and cfg.internal == 7


def test_bad_values_are_refused_by_argparse():
    with pytest.raises(argparse.ArgumentError):
        parser().parse_args(["--src", "a", "--kind", "nope"])
    with pytest.raises(argparse.ArgumentError):
        parser().parse_args(["--src", "a", "--workers", "two"])


def test_help_text_comes_from_the_field():
    text = parser().format_help()
    for words in ("worker processes", "--no-progress", "--tasks", "stop at the first bad line"):
        assert words in text
    assert "--internal" not in text


def test_overrides_win():
    cfg = from_args(Example, parser().parse_args(["--src", "a"]), workers=9)
    assert cfg.workers == 9


def test_module_doctest():
    assert doctest.testmod(settings).failed == 0


@dataclass
class WithPositional:
    runs: list[str] = option(help="result folders", positional=True)
    output: str | None = option(None, help="table file")


def test_positional_field_is_an_argument_named_after_it():
    p = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(p, WithPositional)
    assert from_args(WithPositional, p.parse_args(["a", "b", "--output", "t.md"])) == WithPositional(["a", "b"], "t.md")
    assert "--runs" not in p.format_help() and "result folders" in p.format_help()
    with pytest.raises(SystemExit):
        p.parse_args([])  # at least one run


@dataclass
class WithAppend:
    inputs: list[Path] = option(help="input file (repeat the flag)", flag="--input", append=True)
    extra: list[str] | None = option(None, help="optional repeatable", append=True)


def test_append_option_is_a_repeatable_flag_and_never_shares_its_default():
    p = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(p, WithAppend)
    cfg = from_args(WithAppend, p.parse_args(["--input", "a", "--input", "b"]))
    assert cfg.inputs == [Path("a"), Path("b")] and cfg.extra is None
    cfg = from_args(WithAppend, p.parse_args(["--input", "c", "--extra", "x"]))
    assert cfg.inputs == [Path("c")] and cfg.extra == ["x"]
    with pytest.raises(SystemExit):
        p.parse_args([])  # --input is required
    with pytest.raises(ValueError, match="append option's default"):
        option(["a"], help="h", append=True)


@dataclass
class WithLists:
    faults: tuple[str, ...] = option(("429", "500"), help="comma list", sep=",")
    inputs: list[str] | None = option(None, help="repeatable", flag="--input", append=True)
    tasks: list[str] = option(["a"], help="several")
    stream: bool = option(False, help="stream")
    progress: bool = option(True, help="no bar", flag="--no-progress")
    resume: bool = option(True, help="resume")
    limit: int | None = option(None, help="first K")


def test_sep_option_is_one_comma_flag_split_by_from_args():
    p = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(p, WithLists)
    assert from_args(WithLists, p.parse_args([])).faults == ("429", "500")
    assert from_args(WithLists, p.parse_args(["--faults", " reset, slow,,"])).faults == ("reset", "slow")
    assert from_args(WithLists, p.parse_args(["--faults", ""])).faults == ()


@pytest.mark.parametrize("obj", [
    WithLists(), WithLists(faults=("slow",), inputs=["x", "y"], tasks=["b", "c"], stream=True, progress=False,
                           resume=False, limit=3),
    WithLists(faults=(), limit=0)])
def test_to_argv_round_trips_through_the_parser(obj):
    p = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(p, WithLists)
    argv = settings.to_argv(obj)
    assert from_args(WithLists, p.parse_args(argv)) == obj
    if obj == WithLists():
        assert argv == []  # only what differs from a default is spelled out
