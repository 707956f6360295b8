"""Options declared once: a settings dataclass whose fields carry their help and default, and become CLI flags.

Why: a stage option used to be written three times (a dataclass field, an ``add_argument`` and a
``config_from_args`` mapping), and the three drifted apart. Here the dataclass is the one place:
:func:`option` attaches the help text (and, when needed, the flag's spelling or choices) to a field,
:func:`add_arguments` turns the fields into ``argparse`` flags, and :func:`from_args` builds the
dataclass back from the parsed namespace. This is the idea of TRL's ``SFTConfig`` +
``HfArgumentParser`` and litgpt's ``TrainArgs``, in 100 lines and without a new dependency.

>>> from dataclasses import dataclass
>>> @dataclass
... class Demo:
...     src: str = option(help="input JSONL")
...     workers: int = option(2, help="processes")
...     progress: bool = option(True, help="no progress bar", flag="--no-progress")
>>> import argparse; p = argparse.ArgumentParser(); add_arguments(p, Demo)
>>> from_args(Demo, p.parse_args(["--src", "a.jsonl", "--no-progress"]))
Demo(src='a.jsonl', workers=2, progress=False)
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Sequence

__all__ = ["option", "add_arguments", "from_args", "split_list", "to_argv"]

_MISSING = dataclasses.MISSING


def option(default: Any = _MISSING, *, help: str, flag: str | None = None, choices: Sequence[Any] | None = None,
           metavar: str | None = None, aliases: Sequence[str] = (), nargs: str | None = None,
           positional: bool = False, append: bool = False, sep: str | None = None) -> Any:
    """A dataclass field that is also a CLI flag.

    ``default`` missing makes the flag required. ``flag`` overrides the spelling (``--field-name`` by
    default); a bool field whose flag starts with ``--no-`` is switched off by it. A list default is
    copied per instance (``default_factory``), so instances never share it. ``positional`` makes it
    an argument named after the field (``distill eval compare RUN...``) instead of a flag.
    ``append`` makes a list field a repeatable flag (``--input a --input b``); its default must be
    ``None`` (argparse would append to a list default, so two runs in one process would share it).
    ``sep`` makes a ``tuple[str, ...]`` field one flag holding a ``sep``-separated list
    (``--faults 429,500``): :func:`from_args` splits it (items stripped, blanks dropped) and
    :func:`to_argv` joins it back.
    """
    if append and default not in (None, _MISSING):
        raise ValueError("an append option's default must be None or missing")
    meta = {"help": help, "flag": flag, "choices": tuple(choices) if choices is not None else None,
            "metavar": metavar, "aliases": tuple(aliases), "nargs": nargs, "positional": positional,
            "append": append, "sep": sep}
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (tp, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return _MISSING


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: Sequence[str] = ()) -> None:
    """Add one flag per documented field of the dataclass ``cls`` (fields without ``option`` are internal)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if "help" not in meta or f.name in skip:
            continue
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        positional = meta.get("positional", False)
        names = [f.name] if positional else [flag, *meta["aliases"]]
        default = _default_of(f)
        tp, _optional = _unwrap(hints[f.name])
        kw: dict[str, Any] = {"help": meta["help"]} if positional else {"dest": f.name, "help": meta["help"]}
        if meta["metavar"]:
            kw["metavar"] = meta["metavar"]
        if tp is bool:
            if flag.startswith("--no-"):
                kw.update(action="store_false", default=True if default is _MISSING else default)
            elif default is True:
                kw.update(action=argparse.BooleanOptionalAction, default=True)
            else:
                kw.update(action="store_true", default=False)
            parser.add_argument(*names, **kw)
            continue
        if meta.get("sep"):  # one string flag; from_args splits it
            kw.update(type=str, default=default)
            parser.add_argument(*names, **kw)
            continue
        if typing.get_origin(tp) in (list, tuple):
            (elem, *_rest) = typing.get_args(tp) or (str,)
            tp = elem
            if meta.get("append"):
                kw["action"] = "append"
            else:
                kw["nargs"] = meta["nargs"] or "+"
        elif meta["nargs"]:
            kw["nargs"] = meta["nargs"]
        if tp in (int, float, str, Path):
            kw["type"] = tp
        if meta["choices"] is not None:
            kw["choices"] = meta["choices"]
        if default is _MISSING:
            if not positional:  # a positional without a default is required already
                kw["required"] = True
        else:
            kw["default"] = default
        parser.add_argument(*names, **kw)


def from_args(cls: type, args: argparse.Namespace, **overrides: Any):
    """Build ``cls`` from a namespace parsed with :func:`add_arguments` (``overrides`` win)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.init and hasattr(args, f.name)}
    for f in dataclasses.fields(cls):
        sep = f.metadata.get("sep")
        if sep and isinstance(values.get(f.name), str):
            values[f.name] = split_list(values[f.name], sep)
    values.update(overrides)
    return cls(**values)


def split_list(value: str | Sequence[str] | None, sep: str = ",") -> tuple[str, ...]:
    """``"a, b"`` (a ``sep`` option's CLI form) or a sequence -> ``("a", "b")``; blanks dropped.

    >>> split_list(" 429, 500,,"), split_list(None), split_list(["x"])
    (('429', '500'), (), ('x',))
    """
    if value is None:
        return ()
    items = value.split(sep) if isinstance(value, str) else value
    return tuple(s.strip() for s in items if s.strip())


def to_argv(obj: Any, skip: Sequence[str] = ()) -> list[str]:
    """The flags that rebuild ``obj`` with :func:`from_args`: every option that differs from its
    default (the reverse of :func:`add_arguments`, for starting a stage in a child process).

    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Demo:
    ...     workers: int = option(2, help="processes")
    ...     progress: bool = option(True, help="no progress bar", flag="--no-progress")
    ...     kinds: tuple[str, ...] = option(("a",), help="kinds", sep=",")
    >>> to_argv(Demo(workers=4, progress=False, kinds=("a", "b")))
    ['--workers', '4', '--no-progress', '--kinds', 'a,b']
    """
    out: list[str] = []
    for f in dataclasses.fields(obj):
        meta = f.metadata
        if "help" not in meta or f.name in skip:
            continue
        value, default = getattr(obj, f.name), _default_of(f)
        if meta.get("sep"):
            value, default = split_list(value, meta["sep"]), split_list(default, meta["sep"])
        if value == default:
            continue
        if meta.get("positional"):
            raise ValueError(f"to_argv: positional option {f.name!r} is not supported")
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            if flag.startswith("--no-"):
                out.append(flag)  # value False: the --no- flag switches the True default off
            elif default is True:
                out.append(flag if value else "--no-" + flag[2:])  # BooleanOptionalAction
            else:
                out.append(flag)
        elif meta.get("sep"):
            out += [flag, meta["sep"].join(value)]
        elif isinstance(value, (list, tuple)):
            if meta.get("append"):
                for v in value:
                    out += [flag, str(v)]
            else:
                out += [flag, *map(str, value)]
        elif value is not None:
            out += [flag, str(value)]
    return out
