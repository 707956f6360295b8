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

    >>> with atomic_write("out.json") as f:  # doctest: +SKIP
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


# ----------------------------------------------------------------------------- the one row reader
#
# Every stage reads rows through these functions, so a bad record looks the same everywhere:
# ``FILE:N: message`` with N the 1-based line (JSONL) or row (JSON array, Parquet, Arrow, CSV).

ROW_FILE_SUFFIXES = (".parquet", ".jsonl", ".json")


@dataclass
class BadRecord:
    """A record that could not be used, with where and why (for reports and ``--strict``).

    ``line`` is the 1-based line of a JSONL file, or the 1-based row of any other source.
    ``kind`` is the counter key (``invalid_json``, ``bad_type``), ``message`` the human text.

    >>> str(BadRecord("data.jsonl", 4, "invalid JSON (Expecting value at column 1)"))
    'data.jsonl:4: invalid JSON (Expecting value at column 1)'
    """

    path: str
    line: int
    message: str
    kind: str = "invalid_json"

    def __str__(self) -> str:
        return location(self.path, self.line) + f": {self.message}"

    @property
    def reason(self) -> str:
        """The message (the name older call sites read)."""
        return self.message


BadLine = BadRecord  # the same type under its first name (reject/generate/evaluate use it)


def location(path: str | os.PathLike, line: int) -> str:
    """The one location format: ``FILE:N`` (an editor's ``file:line``).

    >>> location("data/train.jsonl", 12)
    'data/train.jsonl:12'
    """
    return f"{path}:{line}"


def parse_json_line(raw: bytes, path: str, line: int) -> dict | BadRecord:
    """One JSONL line (bytes) -> its object, or a :class:`BadRecord` saying what is wrong.

    >>> parse_json_line(b'{"a": 1}\\n', "f.jsonl", 1)
    {'a': 1}
    >>> str(parse_json_line(b'[1]\\n', "f.jsonl", 2))
    'f.jsonl:2: expected a JSON object, got list'
    """
    try:
        obj = json.loads(raw.decode("utf-8-sig"))  # str, not bytes: skips json's encoding sniffing
    except UnicodeDecodeError as exc:
        return BadRecord(path, line, f"invalid UTF-8 at byte offset {exc.start}")
    except json.JSONDecodeError as exc:
        return BadRecord(path, line, f"invalid JSON ({exc.msg} at column {exc.colno})")
    if not isinstance(obj, dict):
        return BadRecord(path, line, f"expected a JSON object, got {type(obj).__name__}", "bad_type")
    return obj


def _slice(n: int, i: int, k: int) -> tuple[int, int]:
    """The contiguous i-th of k slices of ``range(n)``: ``_slice(10, 1, 3) == (3, 6)``."""
    return n * i // k, n * (i + 1) // k


def iter_jsonl_lines(path: str | os.PathLike, shard: int = 0, num_shards: int = 1) -> Iterator[tuple[int, bytes]]:
    """``(line_number, raw_bytes)`` of the non-blank lines that *start* in this shard's byte range.

    Sharding by bytes lets each host read only its part of a huge file; the line numbers stay
    those of the whole file. ``raw_bytes`` keep their newline (decontaminate writes them back).
    """
    size = os.path.getsize(path)
    start, end = _slice(size, shard, num_shards)
    with open(path, "rb") as f:
        line_no = 0
        if start > 0:
            # count lines before the range (fast byte scan), then skip to the first line start >= start
            remaining = start - 1
            while remaining > 0:
                chunk = f.read(min(1 << 24, remaining))
                if not chunk:
                    break
                line_no += chunk.count(b"\n")
                remaining -= len(chunk)
            f.seek(start - 1)
            if f.read(1) != b"\n":
                f.readline()  # the rest of a line that started before the range
            line_no += 1  # the newline ending the line before our first one
        pos = f.tell()
        while pos < end:
            raw = f.readline()
            if not raw:
                break
            pos += len(raw)
            line_no += 1
            if raw.strip():
                yield line_no, raw


def iter_jsonl(path: str | os.PathLike, shard: int = 0, num_shards: int = 1) -> Iterator[tuple[int, dict | BadRecord]]:
    """Yield ``(line_number, object)`` for each non-blank line; a bad line yields a :class:`BadRecord`.

    Line numbers are 1-based, as editors show them. Non-object JSON values are bad lines too.
    """
    path = str(path)
    for n, raw in iter_jsonl_lines(path, shard, num_shards):
        yield n, parse_json_line(raw, path, n)


def row_file_kind(path: str | os.PathLike) -> str:
    """What :func:`read_rows` will read ``path`` as: ``jsonl``, ``json`` (an array), ``parquet``,
    ``csv`` or ``arrow_dir`` (a ``save_to_disk`` dataset). A ``.json`` file that is not an array
    is JSON Lines.

    >>> row_file_kind("train.parquet")
    'parquet'
    """
    p = Path(path)
    if p.is_dir():
        if any((p / n).exists() for n in ("state.json", "dataset_info.json", "dataset_dict.json")):
            return "arrow_dir"
        raise ValueError(f"{p}: not a save_to_disk dataset (use expand_row_sources for a folder of files)")
    if p.suffix in (".parquet", ".jsonl", ".csv"):
        return p.suffix[1:]
    if p.suffix == ".json":
        if not p.is_file():
            return "json"
        with open(p, "rb") as f:
            head = f.read(4096).lstrip()
        return "json" if head.startswith(b"[") else "jsonl"
    raise ValueError(f"{p}: unsupported input type {p.suffix!r} (use .jsonl, .json, .parquet or a "
                     "save_to_disk directory)")


@dataclass
class RowSource:
    """One input file or dataset directory, in command-line order (``kind``: see :func:`row_file_kind`)."""

    path: str
    kind: str


def expand_row_sources(inputs: list[str]) -> list[RowSource]:
    """Files and directories -> sources. A directory is a ``save_to_disk`` dataset, or holds
    ``*.parquet``/``*.jsonl``/``*.json`` files (taken in sorted order).

    >>> expand_row_sources(["data/"])  # doctest: +SKIP
    [RowSource(path='data/a.jsonl', kind='jsonl'), RowSource(path='data/b.parquet', kind='parquet')]
    """
    out: list[RowSource] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            if any((p / n).exists() for n in ("state.json", "dataset_info.json", "dataset_dict.json")):
                out.append(RowSource(str(p), "arrow_dir"))
                continue
            files = sorted(f for f in p.iterdir() if f.suffix in ROW_FILE_SUFFIXES and f.is_file())
            if not files:
                raise FileNotFoundError(f"{p}: no .parquet/.jsonl/.json files and not a save_to_disk dataset")
            out.extend(expand_row_sources([str(f) for f in files]))
        elif p.is_file():
            out.append(RowSource(str(p), row_file_kind(p)))
        else:
            raise FileNotFoundError(f"{p}: input not found")
    return out


class RowReadError(ValueError):
    """A whole source cannot be read (not one bad record): names the file and what to do."""


def _read_json_array(path: str, shard: int, num_shards: int) -> Iterator[tuple[int, dict | BadRecord]]:
    with open(path, "rb") as f:
        try:
            data = json.load(f)
        except ValueError as exc:
            raise RowReadError(f"{path}: invalid JSON ({exc}); use one object per line (.jsonl) for large data") from None
    if not isinstance(data, list):
        raise RowReadError(f"{path}: expected a JSON array of objects, got {type(data).__name__}")
    a, b = _slice(len(data), shard, num_shards)
    for k in range(a, b):
        obj = data[k]
        yield k + 1, obj if isinstance(obj, dict) else BadRecord(
            path, k + 1, f"expected a JSON object, got {type(obj).__name__}", "bad_type")


def _read_parquet(path: str, shard: int, num_shards: int, batch_size: int) -> Iterator[tuple[int, dict]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    a, b = _slice(pf.metadata.num_rows, shard, num_shards)
    base = 0
    for g in range(pf.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        lo, hi = max(a, base), min(b, base + n)
        if lo < hi:
            table = pf.read_row_group(g).slice(lo - base, hi - lo)
            for off in range(0, table.num_rows, batch_size):
                for k, row in enumerate(table.slice(off, batch_size).to_pylist()):
                    yield lo + off + k + 1, row
        base += n
        if base >= b:
            break


def _read_dataset(ds, shard: int, num_shards: int, batch_size: int) -> Iterator[tuple[int, dict]]:
    a, b = _slice(len(ds), shard, num_shards)
    for off in range(a, b, batch_size):
        part = ds.select(range(off, min(b, off + batch_size)))
        for k, row in enumerate(part.to_list()):
            yield off + k + 1, row


def read_rows(source: str | os.PathLike | RowSource, shard: int = 0, num_shards: int = 1, batch_size: int = 1000,
              split: str = "train") -> Iterator[tuple[int, dict | BadRecord]]:
    """The one row reader: ``(n, row)`` for this shard's slice of one file or dataset directory.

    ``n`` is the 1-based line (JSONL) or row (JSON array, Parquet, CSV, ``save_to_disk``), so
    ``location(path, n)`` names it. An unusable record comes as a :class:`BadRecord`; a source
    that cannot be read at all raises :class:`RowReadError` (or ``FileNotFoundError``). Streams:
    JSONL line by line, Parquet by row group, Arrow datasets by slices of ``batch_size``.

    >>> [(n, r) for n, r in read_rows("tiny.jsonl")]  # doctest: +SKIP
    [(1, {'problem': '1+1?'}), (2, BadRecord(path='tiny.jsonl', line=2, message='invalid JSON (...)', ...))]
    """
    src = source if isinstance(source, RowSource) else RowSource(str(source), row_file_kind(source))
    if not Path(src.path).exists():
        raise FileNotFoundError(f"{src.path}: input not found")
    if src.kind == "jsonl":
        return iter_jsonl(src.path, shard, num_shards)
    if src.kind == "json":
        return _read_json_array(src.path, shard, num_shards)
    if src.kind == "parquet":
        return _read_parquet(src.path, shard, num_shards, batch_size)
    import datasets

    if src.kind == "csv":
        ds = datasets.load_dataset("csv", data_files=src.path, split="train")
    else:
        ds = datasets.load_from_disk(src.path)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise RowReadError(f"{src.path}: DatasetDict without a {split!r} split ({', '.join(ds)})")
            ds = ds[split]
    return _read_dataset(ds, shard, num_shards, batch_size)


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
