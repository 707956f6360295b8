"""File helpers every stage shares: atomic writes, crash-safe JSONL append, robust JSONL reads.

Why: users leave jobs running for days. No output may ever be half-written under its final
name, and an append-only log torn by ``kill -9`` must be repaired on resume without touching
its complete lines.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator


def _umask_mode(base: int = 0o666) -> int:
    """The mode a plain ``open()`` would give: mkstemp/mkdtemp create 0600/0700 files, which
    would make every atomically written output unreadable to the user's group."""
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Write ``path`` through a temp file in the same directory, then rename over it.

    >>> with atomic_write("out.json") as f:
    ...     f.write("{}")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, _umask_mode())
    try:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON (reports are JSON first)."""
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2, ensure_ascii=False, default=_json_default)
        f.write("\n")


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp directory beside ``path``; on success it replaces ``path`` in one rename.

    A previous ``path`` is moved aside first and deleted only after the new one is in place,
    so no half-written directory ever has the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, _umask_mode(0o777))
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}-{time.time_ns()}"
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def repair_jsonl_tail(path: str | os.PathLike) -> int:
    """Cut a torn last line (no trailing newline, or not valid JSON) from an append-only JSONL.

    Returns the number of bytes removed. Complete lines are never touched.
    """
    path = Path(path)
    if not path.exists():
        return 0
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb+") as f:
        # find the start of the last line
        block = 1 << 16
        pos = size
        tail = b""
        while pos > 0:
            step = min(block, pos)
            pos -= step
            f.seek(pos)
            tail = f.read(step) + tail
            idx = tail.rfind(b"\n", 0, len(tail) - 1)
            if idx >= 0:
                start = pos + idx + 1
                break
        else:
            start = 0
        f.seek(start)
        last = f.read()
        keep = size
        if not last.endswith(b"\n"):
            keep = start
        else:
            try:
                json.loads(last)
            except ValueError:
                keep = start
        if keep != size:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
        return size - keep


class JsonlAppender:
    """Append JSON lines durably: each line written whole and flushed, fsync at most every
    ``fsync_every`` seconds (and on close). Opening repairs a torn tail first."""

    def __init__(self, path: str | os.PathLike, fsync_every: float = 1.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.repaired_bytes = repair_jsonl_tail(self.path)
        self._f = open(self.path, "ab")
        self._fsync_every = fsync_every
        self._last_sync = time.monotonic()

    def write(self, obj: Any) -> None:
        line = json.dumps(obj, ensure_ascii=False, default=_json_default).encode("utf-8") + b"\n"
        self._f.write(line)
        self._f.flush()
        now = time.monotonic()
        if now - self._last_sync >= self._fsync_every:
            os.fsync(self._f.fileno())
            self._last_sync = now

    def close(self) -> None:
        if not self._f.closed:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@dataclass
class BadLine:
    """A JSONL line that could not be used, with where and why (for reports and --strict)."""

    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict | BadLine]]:
    """Yield ``(line_number, object)`` for each non-blank line; a bad line yields a ``BadLine``.

    Line numbers are 1-based, as editors show them. Non-object JSON values are bad lines too.
    """
    path = str(path)
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except ValueError as exc:
                yield n, BadLine(path, n, f"invalid JSON ({exc.msg} at column {exc.colno})")
                continue
            if not isinstance(obj, dict):
                yield n, BadLine(path, n, f"expected a JSON object, got {type(obj).__name__}")
                continue
            yield n, obj


def load_rows(source: str, config: str | None = None, split: str = "train"):
    """Load a dataset as ``datasets.Dataset`` from a local .jsonl/.json/.parquet file, a
    ``save_to_disk`` directory, a directory of such files, or a hub id (when online)."""
    import datasets

    p = Path(source)
    if p.is_dir():
        if (p / "dataset_info.json").exists() or (p / "state.json").exists():
            return datasets.load_from_disk(str(p))
        if (p / "dataset_dict.json").exists():
            return datasets.load_from_disk(str(p))[split]
        files = sorted(list(p.glob("*.parquet")) + list(p.glob("*.jsonl")) + list(p.glob("*.json")))
        if not files:
            raise FileNotFoundError(f"{source}: no .parquet/.jsonl/.json files and not a save_to_disk directory")
        kind = "parquet" if files[0].suffix == ".parquet" else "json"
        return datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train")
    if p.exists():
        kind = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}.get(p.suffix)
        if kind is None:
            raise ValueError(f"{source}: unsupported file type {p.suffix!r} (use .jsonl, .json or .parquet)")
        return datasets.load_dataset(kind, data_files=str(p), split="train")
    return datasets.load_dataset(source, config, split=split)
