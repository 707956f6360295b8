"""The top-K sidecar: the teacher's per-token top-K ids and log-probabilities beside generations.jsonl.

Why a length-prefixed binary log and not JSON: a JSON ``top_logprobs`` list costs ~60 bytes per
entry (~1.2 kB per token at K=20) and must be parsed back token by token. Here one *record* holds
one generation (a ``(uuid, generation index)`` key) as four flat little-endian arrays

* ``sampled_ids`` int32 ``[T]`` and ``sampled_logprobs`` float16 ``[T]`` -- the token the teacher
  emitted at each step (student ids) and its own log-probability;
* ``topk_ids`` int32 ``[T, K]`` and ``topk_logprobs`` float16 ``[T, K]`` -- the teacher's top-K
  at each step (``-1`` / ``0`` where it returned fewer than K),

i.e. ``6 * (K + 1)`` bytes per token raw. The default codec splits the arrays into byte planes and
deflates them (token ids below 2^18 leave their high bytes almost constant), measured in
``bench/kd.py``. Reading one generation is one seek and one read (the index is rebuilt from the
fixed-size headers, a seek per record, no payload read).

Crash-safety rules, the same as ``generations.jsonl`` (:mod:`distilled.generate.runner`):

* a record is written whole and flushed before the problem's JSONL line is written, so the JSONL
  line is the commit point: a sidecar record whose uuid has no JSONL line is an orphan of an
  interrupted run;
* on resume, :class:`SidecarWriter` first cuts a torn last record (short header, short payload or
  a CRC mismatch) and then the orphan records after the last committed one (they form a suffix,
  because records are written in commit order), so a problem regenerated on resume is never
  stored twice; complete committed records are never touched;
* a reader refuses a file holding the same key twice, naming both offsets.

File name: ``gens.jsonl`` -> ``gens.topk.bin`` (:func:`sidecar_path`).
"""

from __future__ import annotations

import os
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

MAGIC = b"KDTK"
VERSION = 1
CODEC_RAW = 0
CODEC_ZLIB = 1  # deflate of the raw arrays
CODEC_PLANES = 2  # byte planes of each array, then deflate (default: best ratio measured)
CODECS = (CODEC_RAW, CODEC_ZLIB, CODEC_PLANES)
# magic, version, codec, K, uuid length, generation index, tokens, payload length, crc32(payload)
_HEADER = struct.Struct("<4sBBHHIIII")
HEADER_SIZE = _HEADER.size


class SidecarError(ValueError):
    """A sidecar that cannot be used as it is (the message names the file and byte offset)."""


@dataclass
class TokenTopK:
    """The teacher's view of one generation, per generated token (student token ids)."""

    sampled_ids: np.ndarray  # int32 [T]
    sampled_logprobs: np.ndarray  # float16/float32 [T]
    topk_ids: np.ndarray  # int32 [T, K], -1 where absent
    topk_logprobs: np.ndarray  # float16/float32 [T, K], 0 where absent

    def __post_init__(self) -> None:
        self.sampled_ids = np.asarray(self.sampled_ids, dtype=np.int32).reshape(-1)
        self.sampled_logprobs = np.asarray(self.sampled_logprobs, dtype=np.float32).reshape(-1)
        t = len(self.sampled_ids)
        self.topk_ids = np.asarray(self.topk_ids, dtype=np.int32)
        self.topk_logprobs = np.asarray(self.topk_logprobs, dtype=np.float32)
        if self.topk_ids.ndim != 2 or self.topk_ids.shape[0] != t or self.topk_logprobs.shape != self.topk_ids.shape \
                or len(self.sampled_logprobs) != t:
            raise ValueError(f"TokenTopK: inconsistent shapes sampled {self.sampled_ids.shape}/"
                             f"{self.sampled_logprobs.shape}, topk {self.topk_ids.shape}/{self.topk_logprobs.shape}")

    @property
    def n_tokens(self) -> int:
        return int(len(self.sampled_ids))

    @property
    def k(self) -> int:
        return int(self.topk_ids.shape[1])


def sidecar_path(output_file: str | os.PathLike) -> Path:
    """``gens.jsonl`` -> ``gens.topk.bin`` (any other name gets ``.topk.bin`` appended)."""
    p = Path(output_file)
    if p.suffix == ".jsonl":
        return p.with_suffix(".topk.bin")
    return p.with_name(p.name + ".topk.bin")


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------
def _planes(a: np.ndarray) -> bytes:
    """Byte planes of a little-endian array: all first bytes, then all second bytes, ..."""
    b = np.ascontiguousarray(a).view(np.uint8).reshape(-1, a.dtype.itemsize)
    return np.ascontiguousarray(b.T).tobytes()


def _unplanes(buf: bytes, dtype: str, n: int) -> np.ndarray:
    size = np.dtype(dtype).itemsize
    b = np.frombuffer(buf, dtype=np.uint8).reshape(size, n)
    return np.ascontiguousarray(b.T).view(dtype).reshape(n)


def _arrays(rec: TokenTopK) -> list[np.ndarray]:
    return [rec.sampled_ids.astype("<i4"), rec.sampled_logprobs.astype("<f2"),
            rec.topk_ids.astype("<i4").reshape(-1), rec.topk_logprobs.astype("<f2").reshape(-1)]


def encode_body(rec: TokenTopK, codec: int = CODEC_PLANES, level: int = 6) -> bytes:
    """The record body (the four arrays) under ``codec``."""
    arrs = _arrays(rec)
    if codec == CODEC_RAW:
        return b"".join(a.tobytes() for a in arrs)
    if codec == CODEC_ZLIB:
        return zlib.compress(b"".join(a.tobytes() for a in arrs), level)
    if codec == CODEC_PLANES:
        return zlib.compress(b"".join(_planes(a) for a in arrs), level)
    raise ValueError(f"unknown sidecar codec {codec}")


def decode_body(body: bytes, codec: int, n: int, k: int) -> TokenTopK:
    """Inverse of :func:`encode_body`."""
    if codec in (CODEC_ZLIB, CODEC_PLANES):
        body = zlib.decompress(body)
    elif codec != CODEC_RAW:
        raise ValueError(f"unknown sidecar codec {codec}")
    sizes = [(np.dtype("<i4"), n), (np.dtype("<f2"), n), (np.dtype("<i4"), n * k), (np.dtype("<f2"), n * k)]
    need = sum(d.itemsize * m for d, m in sizes)
    if len(body) != need:
        raise ValueError(f"record body has {len(body)} bytes, expected {need} for {n} tokens x K={k}")
    out = []
    pos = 0
    for d, m in sizes:
        chunk = body[pos:pos + d.itemsize * m]
        pos += d.itemsize * m
        out.append(_unplanes(chunk, d.str, m) if codec == CODEC_PLANES else np.frombuffer(chunk, dtype=d).copy())
    return TokenTopK(out[0], out[1], out[2].reshape(n, k), out[3].reshape(n, k))


def encode_record(uuid: str, gen_index: int, rec: TokenTopK, codec: int = CODEC_PLANES) -> bytes:
    """One complete record: header + uuid + body."""
    u = uuid.encode("utf-8")
    if len(u) > 0xFFFF:
        raise ValueError(f"uuid {uuid[:40]!r}... is longer than 65535 bytes")
    if rec.k > 0xFFFF:
        raise ValueError(f"K={rec.k} is too large")
    payload = u + encode_body(rec, codec)
    return _HEADER.pack(MAGIC, VERSION, codec, rec.k, len(u), int(gen_index), rec.n_tokens, len(payload),
                        zlib.crc32(payload)) + payload


# --------------------------------------------------------------------------------------------
# Scanning
# --------------------------------------------------------------------------------------------
@dataclass
class Entry:
    """Where one record lies in the file."""

    uuid: str
    gen_index: int
    offset: int  # of the header
    n_tokens: int
    k: int
    codec: int
    uuid_len: int
    payload_len: int
    crc: int

    @property
    def end(self) -> int:
        return self.offset + HEADER_SIZE + self.payload_len

    @property
    def key(self) -> tuple[str, int]:
        return self.uuid, self.gen_index


def scan(path: str | os.PathLike, verify: str = "last") -> tuple[list[Entry], int, str | None]:
    """Read every header; return ``(entries, good_end, problem)``.

    ``good_end`` is the byte offset after the last intact record and ``problem`` says why the rest
    (if any) is unusable (``None`` when the whole file is intact). ``verify``: ``"last"`` checks the
    CRC of the last record only (the only one an append-only writer can tear; cheap on a file of
    many GB), ``"all"`` checks every record, ``"none"`` none.
    """
    path = Path(path)
    entries: list[Entry] = []
    if not path.exists():
        return entries, 0, None
    size = path.stat().st_size
    problem = None
    with open(path, "rb") as f:
        pos = 0
        while pos < size:
            f.seek(pos)
            head = f.read(HEADER_SIZE)
            if len(head) < HEADER_SIZE:
                problem = f"torn header at byte {pos} ({len(head)} of {HEADER_SIZE} bytes)"
                break
            magic, ver, codec, k, ulen, g, n, plen, crc = _HEADER.unpack(head)
            if magic != MAGIC or ver != VERSION or codec not in CODECS or ulen > plen:
                problem = f"not a record header at byte {pos} (magic {magic!r}, version {ver}, codec {codec})"
                break
            if pos + HEADER_SIZE + plen > size:
                problem = f"torn record at byte {pos} (payload {plen} bytes, {size - pos - HEADER_SIZE} present)"
                break
            uuid = f.read(ulen).decode("utf-8", errors="replace")
            entries.append(Entry(uuid, g, pos, n, k, codec, ulen, plen, crc))
            pos += HEADER_SIZE + plen
        checks = entries if verify == "all" else entries[-1:] if verify == "last" else []
        for e in checks:
            f.seek(e.offset + HEADER_SIZE)
            if zlib.crc32(f.read(e.payload_len)) != e.crc:
                bad = f"CRC mismatch in the record at byte {e.offset} ({e.uuid!r}, generation {e.gen_index})"
                if e is entries[-1]:
                    entries.pop()
                    return entries, e.offset, bad
                raise SidecarError(f"{path}: {bad}: the file is damaged in the middle (not a torn tail)")
    good_end = entries[-1].end if entries else 0
    return entries, good_end, problem


def _truncate(path: Path, keep: int) -> int:
    size = path.stat().st_size
    if keep >= size:
        return 0
    with open(path, "rb+") as f:
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    return size - keep


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
class SidecarWriter:
    """Append records durably, after repairing the file for a resume.

    ``committed``: the uuids that have a line in ``generations.jsonl`` (read after its own tail
    repair). Records after the last committed record whose uuid is not committed are orphans of
    an interrupted run and are cut, so the regenerated problem is stored once. ``None`` keeps all
    intact records (no JSONL to compare with).

    ``repaired_bytes`` (torn tail cut), ``orphan_records`` (orphans cut) and
    ``missing_committed`` (committed uuids with no record: they were generated without
    ``--top-logprobs`` or the sidecar lost them; they train by CE only) report what opening did.
    """

    def __init__(self, path: str | os.PathLike, committed: Iterable[str] | None = None, codec: int = CODEC_PLANES,
                 fsync_every: float = 1.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.codec = codec
        entries, good_end, problem = scan(self.path, verify="last")
        self.repaired_bytes = _truncate(self.path, good_end) if self.path.exists() else 0
        self.problem = problem
        self.orphan_records = 0
        self.missing_committed = 0
        if committed is not None:
            done = set(committed)
            first_orphan = None
            for i, e in enumerate(entries):
                if e.uuid not in done:
                    if first_orphan is None:
                        first_orphan = i
                elif first_orphan is not None:
                    o = entries[first_orphan]
                    raise SidecarError(
                        f"{self.path}: record at byte {o.offset} ({o.uuid!r}, generation {o.gen_index}) has no line "
                        f"in the generations file but a later record at byte {e.offset} ({e.uuid!r}) has one: "
                        f"this sidecar does not belong to that generations file")
            if first_orphan is not None:
                self.orphan_records = len(entries) - first_orphan
                self.repaired_bytes += _truncate(self.path, entries[first_orphan].offset)
                entries = entries[:first_orphan]
            have = {e.uuid for e in entries}
            self.missing_committed = len(done - have)
        self.keys = {e.key for e in entries}
        self._f = open(self.path, "ab")
        self._fsync_every = fsync_every
        self._last_sync = time.monotonic()
        self._dirty = False
        self.records = 0
        self.tokens = 0
        self.bytes = 0

    def write(self, uuid: str, gen_index: int, rec: TokenTopK) -> None:
        """Append one record (whole, flushed to the OS). A key already stored is an error."""
        key = (str(uuid), int(gen_index))
        if key in self.keys:
            raise SidecarError(f"{self.path}: ({uuid!r}, generation {gen_index}) is already stored")
        data = encode_record(key[0], key[1], rec, self.codec)
        self._f.write(data)
        self._f.flush()
        self.keys.add(key)
        self.records += 1
        self.tokens += rec.n_tokens
        self.bytes += len(data)
        self._dirty = True
        now = time.monotonic()
        if now - self._last_sync >= self._fsync_every:
            self.sync()

    def sync(self) -> None:
        """fsync now (call before fsyncing the JSONL so the commit line never outlives its record)."""
        if self._dirty and not self._f.closed:
            os.fsync(self._f.fileno())
            self._dirty = False
            self._last_sync = time.monotonic()

    def close(self) -> None:
        if not self._f.closed:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()

    def __enter__(self) -> "SidecarWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
class SidecarReader:
    """Random access to a sidecar by ``(uuid, generation index)``.

    A torn tail is ignored (and reported in ``problem``), as the writer would cut it; a duplicate
    key is refused. ``verify="all"`` checks every CRC (slow on big files, used by tests and by
    ``distill`` commands that rewrite data).
    """

    def __init__(self, path: str | os.PathLike, verify: str = "last"):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: no such top-K sidecar")
        entries, self.good_end, self.problem = scan(self.path, verify=verify)
        self.index: dict[tuple[str, int], Entry] = {}
        for e in entries:
            if e.key in self.index:
                first = self.index[e.key]
                raise SidecarError(f"{self.path}: ({e.uuid!r}, generation {e.gen_index}) is stored twice, at bytes "
                                   f"{first.offset} and {e.offset}")
            self.index[e.key] = e
        self._f = open(self.path, "rb")

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, key: tuple[str, int]) -> bool:
        return (str(key[0]), int(key[1])) in self.index

    def keys(self) -> list[tuple[str, int]]:
        return list(self.index)

    @property
    def k(self) -> int | None:
        """K of the records (None when empty); mixed K is refused by :meth:`get` callers via shapes."""
        for e in self.index.values():
            return e.k
        return None

    @property
    def tokens(self) -> int:
        return sum(e.n_tokens for e in self.index.values())

    @property
    def bytes(self) -> int:
        return sum(HEADER_SIZE + e.payload_len for e in self.index.values())

    def get(self, uuid: str, gen_index: int) -> TokenTopK | None:
        """The record for the key, or None when it is not stored."""
        e = self.index.get((str(uuid), int(gen_index)))
        if e is None:
            return None
        self._f.seek(e.offset + HEADER_SIZE)
        payload = self._f.read(e.payload_len)
        try:
            return decode_body(payload[e.uuid_len:], e.codec, e.n_tokens, e.k)
        except (ValueError, zlib.error) as exc:
            raise SidecarError(f"{self.path}: record at byte {e.offset} ({uuid!r}, generation {gen_index}): "
                               f"{exc}") from None

    def __iter__(self) -> Iterator[tuple[tuple[str, int], TokenTopK]]:
        for key in list(self.index):
            yield key, self.get(*key)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "SidecarReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
