"""``distill preprocess``: rows -> validate -> tokenize+mask -> BFD pack -> packed Arrow, atomically.

The same chain as the MindFormers YAMLs (``OpenR1Math220kDataHandler`` + ``BFDPackingHandler``),
in one command and without MindFormers:

    distill preprocess --input data/train.jsonl --format openr1 --tokenizer /models/Qwen2.5-Math-7B \\
        --seq-length 32768 --output data/packed

Why it is built this way:

* **Streaming.** Inputs are read in batches (JSONL line by line, parquet by row group, Arrow
  datasets by slice); each batch is validated, tokenised with one batched fast-tokenizer call and
  appended to an on-disk Arrow file (``handled.arrow``). Packing then reads that file memory-mapped.
  Resident memory is the packed Arrow output plus one batch, whatever the input size.
* **Never a silently shorter dataset.** Every input row is either in the output or counted in
  ``report.json`` under a reason (invalid JSON, missing/mistyped column, empty or non-string
  message, no assistant turn, special token in content, contaminated, overlong ...).
  ``--strict`` stops at the first one, naming file, row (line) and field.
* **Atomic.** The output directory is built under a temp name and renamed into place.
* **Scale-out.** ``--shard-index i --num-shards n`` processes a contiguous 1/n slice of every input
  (JSONL by byte range, so each host reads only its part). Shard outputs keep ``handled.arrow``;
  ``distill merge`` concatenates them in input order and packs once, so the merged result is
  identical to an unsharded run.

The output directory is a ``datasets.load_from_disk`` dataset with ``input_ids``, ``labels``
(shifted), ``actual_seq_len``, ``position_ids`` (docs/data-contracts.md §5), plus ``report.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from distilled.data.formats import FORMATS, DataError, FormatConfig, SkipCounter
from distilled.io_utils import BadRecord, RowSource, expand_row_sources, location, read_rows
from distilled.settings import add_arguments, from_args, option

HANDLED_FILE = "handled.arrow"
REPORT_FILE = "report.json"
HIST_EDGES = [0, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072]


@dataclass
class PreprocessConfig:
    """Everything ``distill preprocess`` needs. Each ``option`` field is also its CLI flag
    (:mod:`distilled.settings`); the row-format flags are :class:`FormatConfig`'s fields.

    Fields are in ``distill preprocess --help`` order (callers pass them by keyword).
    """

    inputs: list[str] = option(flag="--input", append=True, metavar="FILE_OR_DIR",
                               help=".jsonl/.json/.parquet file, save_to_disk dir, or dir of such files (repeatable)")
    tokenizer: str = option(metavar="DIR", help="model/tokenizer folder (e.g. Qwen2.5-Math-7B), or 'qwen2.5' for "
                                                "the offline-built one")
    seq_length: int = option(help="tokens per packed row (e.g. 32768)")
    output: str = option(metavar="DIR", help="output directory (replaced atomically)")
    format: FormatConfig = field(default_factory=FormatConfig)  # flags: FormatConfig's fields + --format
    num_proc: int = option(1, help="tokenizer worker processes (default 1: one process, the tokenizer itself "
                                   "uses all cores)")
    strict: bool = option(False, help="stop at the first bad row, naming file, row and field")
    shard_index: int = option(0, help="this host's shard (0-based)")
    num_shards: int = option(1, help="number of shards; combine with `distill merge`")
    chat_template: str | None = option(None, metavar="FILE", help="a .jinja template instead of the tokenizer's")
    engine: str = option("auto", choices=("auto", "hf", "tiktoken"),
                         help="BPE engine: auto uses tiktoken when it provably gives the tokenizer's exact ids "
                              "(Qwen2/2.5), else the HF tokenizer")
    overlong: str = option("drop", choices=("drop", "truncate"),
                           help="samples longer than --seq-length: drop (counted) or truncate (counted)")
    pad_id: int | None = option(None, help="pad id (default: the tokenizer's, 151643 for Qwen2.5)")
    batch_size: int = option(1000, help="rows per tokenizer batch")
    keep_handled: bool = option(False, help=f"keep the unpacked {HANDLED_FILE} (always kept for shards)")
    seed: int | None = option(None, help="shuffle packed rows with this seed")
    # benchmark names; the CLI gives one comma-separated string, split in __post_init__
    decontaminate: str | list[str] | None = option(
        None, metavar="BENCH[,BENCH]",
        help="drop rows sharing an n-gram with these benchmarks (math_500, aime24, aime25, gpqa_diamond, NAME=PATH)")
    decontaminate_data: str | None = option(None, metavar="DIR", help="offline benchmark files for --decontaminate")
    decontaminate_ngram: int | None = option(None, help="n-gram size (default 8)")
    # top-K sidecars: add aligned topk_ids/topk_logprobs (distilled.kd)
    kd_sidecars: list[str] | None = option(
        None, flag="--kd-sidecar", append=True, metavar="FILE",
        help="logits distillation: a top-K sidecar (gens.topk.bin from `distill generate --top-logprobs` "
             "or `distill score-teacher`; repeatable); adds topk_ids/topk_logprobs columns aligned to "
             "the packed labels, matched to samples by answer content (docs/logits-distillation.md)")
    kd_top_k: int | None = option(None, metavar="K", help="K of the top-K columns (default: the sidecars' K; "
                                                          "fewer keeps the best K)")
    progress: bool = True  # the CLI's --quiet (see register_cli)

    def __post_init__(self) -> None:
        if isinstance(self.decontaminate, str):  # "math_500,aime24" (the CLI's spelling)
            self.decontaminate = [b for b in self.decontaminate.split(",") if b.strip()] or None
        if not self.inputs:
            raise ValueError("no --input given")
        if self.seq_length < 2:
            raise ValueError(f"--seq-length must be >= 2, got {self.seq_length}")
        if not (self.num_shards >= 1 and 0 <= self.shard_index < self.num_shards):
            raise ValueError(f"--shard-index must be in [0, {self.num_shards}), got {self.shard_index}")
        if self.overlong not in ("drop", "truncate"):
            raise ValueError(f"--overlong must be drop or truncate, got {self.overlong!r}")
        if self.batch_size < 1 or self.num_proc < 1:
            raise ValueError("--batch-size and --num-proc must be >= 1")
        if self.kd_sidecars and self.num_shards > 1:
            raise ValueError("--kd-sidecar works on one host only (no --num-shards): the top-K columns are built "
                             "while packing, and `distill merge` packs again without them")


# ----------------------------------------------------------------------------- reading

Source = RowSource  # one input file or dataset directory (distilled.io_utils.RowSource)
expand_inputs = expand_row_sources


def iter_source(src: RowSource, shard: int = 0, nshards: int = 1, batch_size: int = 1000) -> Iterator[tuple[str, Any]]:
    """``(location, row)`` for this shard's slice of ``src``; unreadable records come as ``BadRecord``.

    The reading itself is :func:`distilled.io_utils.read_rows`; this only names each row ``FILE:N``.
    """
    for n, row in read_rows(src, shard, nshards, batch_size):
        yield location(src.path, n), row


# ----------------------------------------------------------------------------- worker

_W: dict[str, Any] = {}


def _init_worker(tokenizer_dir: str, fmt: dict, chat_template: str | None, threads: bool, tok=None,
                 engine: str = "auto") -> None:
    """Per-process state: the tokenizer and the chat encoder (built once per process)."""
    if not threads:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from distilled.data.chat import ChatEncoder

    tok = tok if tok is not None else _load_tokenizer(tokenizer_dir)
    _W["encoder"] = ChatEncoder(tok, chat_template, engine)
    _W["fmt"] = FormatConfig(**fmt)


def _encode_batch(rows: list[dict], locs: list[str], strict: bool):
    """Worker step: validate + tokenize + mask one batch. Returns (EncodedBatch, owners, skips)."""
    from distilled.data.chat import encode_rows

    skips = SkipCounter()
    owners: list[int] = []
    enc = encode_rows(rows, _W["fmt"], _W["encoder"], skips, locs, strict, owners)
    encoder = _W["encoder"]
    fallback, encoder.fallback_rows = encoder.fallback_rows, 0
    return enc, np.asarray(owners, np.int64), skips, fallback, encoder.engine_name


# ----------------------------------------------------------------------------- main chain

_TOK_CACHE: dict[tuple, Any] = {}


def _load_tokenizer(tok_dir: str):
    """``load_tokenizer`` memoised per process (folder + file mtimes): repeated runs in one process
    (tests, notebooks, merge after shards) skip re-parsing 7 MB of tokenizer JSON. Read-only use."""
    from distilled.data.tokenizer import load_tokenizer

    key = (os.path.realpath(tok_dir),) + tuple(
        (f.name, f.stat().st_mtime_ns) for f in sorted(Path(tok_dir).glob("*.json")))
    if key not in _TOK_CACHE:
        _TOK_CACHE.clear()
        _TOK_CACHE[key] = load_tokenizer(tok_dir)
    return _TOK_CACHE[key]


def resolve_tokenizer_dir(name: str) -> str:
    """``qwen2.5`` means the offline-built cached Qwen2.5 tokenizer; anything else is a folder."""
    if name.lower() in ("qwen2.5", "qwen2_5"):
        from distilled.data.tokenizer import cached_qwen2_5_tokenizer_dir

        return str(cached_qwen2_5_tokenizer_dir())
    if not Path(name).is_dir():
        raise FileNotFoundError(f"--tokenizer {name}: not a directory (give a model/tokenizer folder, or qwen2.5)")
    return name


def _tokenizer_fingerprint(tok_dir: str) -> str | None:
    """sha256 of tokenizer.json (+ tokenizer_config.json): identifies the tokenizer across hosts
    whose paths differ, so `distill merge` can refuse shards tokenized differently."""
    import hashlib

    h = hashlib.sha256()
    found = False
    for name in ("tokenizer.json", "tokenizer_config.json"):
        f = Path(tok_dir) / name
        if f.is_file():
            h.update(f.read_bytes())
            found = True
    return h.hexdigest() if found else None


def _peak_rss_mb() -> float:
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round(max(self_kb, child_kb) / 1024, 1)


class _Decon:
    """Inline decontamination via ``distilled.data.decontaminate.filter_rows`` (issue 9)."""

    def __init__(self, names: list[str], data_dir: str | None, ngram: int | None):
        from distilled.data import decontaminate as dc

        self.dc = dc
        self.benchmarks = dc.load_benchmarks(names, data_dir)
        self.ngram = ngram or dc.DEFAULT_NGRAM
        self.getter = dc.make_problem_getter()
        self.hits: list[dict] = []
        self.by_benchmark: dict[str, int] = {}

    def __call__(self, rows: list, locs: list[str], skips: SkipCounter, strict: bool) -> tuple[list, list[str]]:
        idx = [i for i, r in enumerate(rows) if isinstance(r, dict) and self.getter(r) is not None]
        if not idx:
            return rows, locs
        kept, hits = self.dc.filter_rows([rows[i] for i in idx], self.benchmarks, ngram=self.ngram,
                                         problem_getter=self.getter)
        if not hits:
            return rows, locs
        dropped = set()
        for h in hits:
            i = idx[h.row]
            if i in dropped:
                continue
            dropped.add(i)
            if strict:
                raise DataError(f"{locs[i]}: field 'problem': contaminated: shares the n-gram {h.ngram!r} with "
                                f"{h.benchmark} problem {h.benchmark_id}")
            skips.add("contaminated", f"{locs[i]}: {h.benchmark} {h.benchmark_id}")
            self.by_benchmark[h.benchmark] = self.by_benchmark.get(h.benchmark, 0) + 1
            if len(self.hits) < 1000:
                self.hits.append({"location": locs[i], **h.to_json()})
        keep = [i for i in range(len(rows)) if i not in dropped]
        return [rows[i] for i in keep], [locs[i] for i in keep]

    def report(self) -> dict:
        return {"benchmarks": sorted(self.benchmarks), "ngram": self.ngram, "rows_dropped": sum(self.by_benchmark.values()),
                "by_benchmark": self.by_benchmark, "hits": self.hits}


def _batches(sources: list[Source], cfg: PreprocessConfig) -> Iterator[tuple[list, list[str], int]]:
    """Batches of ``(rows, locations, source_index)``; never spans two sources (merge needs
    per-source row counts)."""
    for si, src in enumerate(sources):
        rows, locs = [], []
        for loc, row in iter_source(src, cfg.shard_index, cfg.num_shards, cfg.batch_size):
            rows.append(row)
            locs.append(loc)
            if len(rows) >= cfg.batch_size:
                yield rows, locs, si
                rows, locs = [], []
        if rows:
            yield rows, locs, si


class _Tally:
    """The running counts of one ``preprocess`` run, and the handled-Arrow writer they go with.

    One place for the per-batch body that the serial and the multiprocess paths share:
    :meth:`take` turns unreadable records into skips (or a strict error) before a worker sees
    them, :meth:`add` drops overlong samples, counts everything and appends the batch to
    ``handled.arrow``.
    """

    def __init__(self, cfg: PreprocessConfig, nsources: int, decon: "_Decon | None", writer, bar):
        self.cfg, self.decon, self.writer, self.bar = cfg, decon, writer, bar
        self.skips = SkipCounter()
        self.hist = np.zeros(len(HIST_EDGES), np.int64)  # last bin: >= HIST_EDGES[-1]
        self.totals = dict(rows_in=0, rows_kept=0, samples=0, tokens=0, trained_tokens=0, fallback_rows=0)
        self.file_rows = [0] * nsources  # samples written per source (merge order)
        self.engines: set[str] = set()

    def take(self, rows: list, locs: list[str]) -> tuple[list[dict], list[str]]:
        """Count the batch in; bad records -> skips; contaminated rows -> skips. Returns the rest."""
        cfg = self.cfg
        self.totals["rows_in"] += len(rows)
        good_rows, good_locs = [], []
        for r, loc in zip(rows, locs):
            if isinstance(r, BadRecord):
                if cfg.strict:
                    raise DataError(f"{r} [{r.kind}]")
                self.skips.add(r.kind, str(r))
            else:
                good_rows.append(r)
                good_locs.append(loc)
        if self.decon is not None:
            good_rows, good_locs = self.decon(good_rows, good_locs, self.skips, cfg.strict)
        return good_rows, good_locs

    def _drop_overlong(self, enc, owners, glocs: list[str]):
        cfg = self.cfg
        if cfg.overlong != "drop" or not len(enc):
            return enc, owners
        lengths = enc.lengths
        over = lengths > cfg.seq_length
        if not over.any():
            return enc, owners
        first = int(np.flatnonzero(over)[0])
        where = (f"{glocs[owners[first]]}: field 'input_ids': {int(lengths[first])} tokens > "
                 f"seq_length={cfg.seq_length}")
        if cfg.strict:
            raise DataError(f"{where} [overlong] (use --overlong truncate or a larger --seq-length)")
        self.skips.add("overlong", where, int(over.sum()))
        return enc.select(~over), owners[~over]

    def add(self, result, nrows: int, si: int, glocs: list[str]) -> None:
        """One encoded batch (from :func:`_encode_batch`) -> counts + ``handled.arrow``."""
        enc, owners, bskips, fallback, engine_used = result
        self.engines.add(engine_used)
        self.skips.merge(bskips)
        self.totals["fallback_rows"] += fallback
        enc, owners = self._drop_overlong(enc, owners, glocs)
        lengths = enc.lengths
        self.totals["rows_kept"] += len(np.unique(owners))
        self.totals["samples"] += len(enc)
        self.totals["tokens"] += int(lengths.sum())
        self.totals["trained_tokens"] += int((enc.labels != -100).sum())
        np.add.at(self.hist, np.searchsorted(HIST_EDGES, lengths, side="right") - 1, 1)
        self.file_rows[si] += len(enc)
        if len(enc):
            self.writer.write_table(enc.to_arrow())
        self.bar.update(nrows)


class _Done:
    """A result computed in this process, with the ``.get()`` of a pool's ``AsyncResult``."""

    def __init__(self, value):
        self.value = value

    def get(self):
        return self.value


def _encode_all(sources: list[RowSource], cfg: PreprocessConfig, tally: _Tally, pool=None) -> None:
    """Read, encode and tally every batch in input order: in this process (``pool`` None) or on a
    worker pool with a bounded read-ahead (memory stays flat). The same body for both."""
    from collections import deque

    ahead = 2 * cfg.num_proc if pool is not None else 0
    pending: deque = deque()
    for rows, locs, si in _batches(sources, cfg):
        good, glocs = tally.take(rows, locs)
        job = (pool.apply_async(_encode_batch, (good, glocs, cfg.strict)) if pool is not None
               else _Done(_encode_batch(good, glocs, cfg.strict)))
        pending.append((job, len(rows), si, glocs))
        while len(pending) > ahead:
            job, n, s, gl = pending.popleft()
            tally.add(job.get(), n, s, gl)
    while pending:
        job, n, s, gl = pending.popleft()
        tally.add(job.get(), n, s, gl)


def _run_encoders(sources: list[RowSource], cfg: PreprocessConfig, tally: _Tally, tok_dir: str, fmt: dict,
                  chat_template: str | None, main_tok) -> None:
    """One process (the tokenizer itself uses all cores) or ``--num-proc`` forked workers."""
    if cfg.num_proc <= 1:
        _init_worker(tok_dir, fmt, chat_template, threads=True, tok=main_tok, engine=cfg.engine)
        _encode_all(sources, cfg, tally)
        return
    import multiprocessing as mp

    if cfg.engine != "hf" and main_tok is not None:
        from distilled.data.chat import TiktokenEngine

        TiktokenEngine.from_tokenizer(main_tok)  # built once here; forked workers inherit it
    ctx = mp.get_context("fork")
    with ctx.Pool(cfg.num_proc, initializer=_init_worker,
                  initargs=(tok_dir, fmt, chat_template, False, None, cfg.engine)) as pool:
        _encode_all(sources, cfg, tally, pool)


def _pad_id(cfg: PreprocessConfig, tok, tok_dir: str) -> int:
    if cfg.pad_id is not None:
        return cfg.pad_id
    if tok.pad_token_id is None:
        raise ValueError(f"{tok_dir}: the tokenizer has no pad token; pass --pad-id")
    return tok.pad_token_id


def _report(cfg: PreprocessConfig, sources: list[RowSource], tally: _Tally, fmt: dict, tok_dir: str, pad_id: int,
            t_tok: float) -> dict:
    """``report.json`` before packing (packing adds its own keys)."""
    skips = tally.skips
    report = {
        "inputs": [asdict(s) for s in sources],
        "format": fmt,
        "tokenizer": tok_dir,
        "tokenizer_sha256": _tokenizer_fingerprint(tok_dir),
        "seq_length": cfg.seq_length,
        "pad_id": int(pad_id),
        "overlong": cfg.overlong,
        "engine": "+".join(sorted(tally.engines)) or None,
        "shard": {"index": cfg.shard_index, "count": cfg.num_shards},
        **{k: int(v) for k, v in tally.totals.items()},
        "rows_skipped": int(skips.total - skips.counts.get("overlong", 0)),
        "skips": skips.to_dict(),
        "samples_per_source": tally.file_rows,
        "length_histogram": {"bin_edges": HIST_EDGES, "counts": tally.hist.tolist(),
                             "note": "counts[i]: samples with bin_edges[i] <= tokens < bin_edges[i+1] (last: >=)"},
        "tokenize_elapsed_s": round(t_tok, 3),
    }
    if tally.decon is not None:
        report["decontamination"] = tally.decon.report()
    return report


def preprocess(cfg: PreprocessConfig) -> dict:
    """Run the chain; returns the report (also written to ``OUTPUT/report.json``).

    Steps: resolve inputs and tokenizer -> :func:`_run_encoders` (read, validate, tokenize+mask,
    append to ``handled.arrow``) -> :func:`_report` -> :func:`_pack_and_save`, all inside one
    atomic output directory.

    Raises :class:`DataError` in strict mode at the first bad row, and ``ValueError`` when no
    sample is left (an empty dataset is never written silently, except as a shard of a larger run).
    """
    import pyarrow as pa
    from tqdm import tqdm

    from distilled.io_utils import atomic_dir, write_json

    t0 = time.perf_counter()
    sources = expand_inputs(cfg.inputs)
    tok_dir = resolve_tokenizer_dir(cfg.tokenizer)
    chat_template = Path(cfg.chat_template).read_text(encoding="utf-8") if cfg.chat_template else None
    fmt = asdict(cfg.format)
    main_tok = _load_tokenizer(tok_dir)
    pad_id = _pad_id(cfg, main_tok, tok_dir)
    decon = _Decon(cfg.decontaminate, cfg.decontaminate_data, cfg.decontaminate_ngram) if cfg.decontaminate else None
    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32()))])

    with atomic_dir(cfg.output) as tmp:
        handled_path = Path(tmp) / HANDLED_FILE
        sink = pa.OSFile(str(handled_path), "wb")
        writer = pa.ipc.new_file(sink, schema)
        bar = tqdm(desc="preprocess", unit=" rows", disable=not cfg.progress, dynamic_ncols=True)
        tally = _Tally(cfg, len(sources), decon, writer, bar)
        try:
            _run_encoders(sources, cfg, tally, tok_dir, fmt, chat_template, main_tok)
        finally:
            bar.close()
            writer.close()
            sink.close()
        tally.totals["fallback_rows"] = int(tally.totals["fallback_rows"])
        t_tok = time.perf_counter() - t0

        if tally.totals["samples"] == 0 and cfg.num_shards == 1:
            skips = tally.skips
            raise ValueError(f"no sample left to pack: {tally.totals['rows_in']} rows read, skipped "
                             f"{dict(skips.counts)} (first: {next(iter(skips.first.values()), '-')})")
        report = _report(cfg, sources, tally, fmt, tok_dir, pad_id, t_tok)
        keep = cfg.keep_handled or cfg.num_shards > 1
        kd = None
        if cfg.kd_sidecars:  # logits distillation: top-K columns aligned to the packed labels
            kd = (cfg.kd_sidecars, cfg.kd_top_k, {int(i) for i in getattr(main_tok, "added_tokens_decoder", {})})
        _pack_and_save(Path(tmp), handled_path, cfg.seq_length, int(pad_id), cfg.overlong, cfg.seed, report,
                       keep, cfg.progress, t0, kd=kd)
        write_json(Path(tmp) / REPORT_FILE, report)
    return report


def _read_handled(path: Path):
    import pyarrow as pa

    return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()


def _pack_and_save(out: Path, handled_path: Path | None, seq_length: int, pad_id: int, overlong: str,
                   seed: int | None, report: dict, keep_handled: bool, progress: bool, t0: float,
                   table=None, kd: tuple | None = None) -> None:
    """Pack the handled table (memory-mapped) and save it as a load_from_disk dataset in ``out``."""
    import datasets

    from distilled.data.packing import pack_table

    if table is None:
        table = _read_handled(handled_path)
    t1 = time.perf_counter()
    if kd is not None:  # (sidecars, K or None, special ids): see distilled/kd/dataset.py
        from distilled.kd.dataset import pack_table_with_sidecars

        packed, stats, report["kd"] = pack_table_with_sidecars(table, kd[0], kd[1], seq_length, pad_id, kd[2],
                                                               overlong, seed=seed, progress=progress)
    else:
        packed, stats = pack_table(table, seq_length, pad_id, overlong, seed=seed, progress=progress)
    pack_s = time.perf_counter() - t1
    del table
    # explicit fingerprint: without one, `datasets` hashes (serialises) the whole table, which
    # tripled peak memory (measured: 4.1 GB instead of 1.4 GB for 44M tokens)
    from datasets.fingerprint import generate_random_fingerprint

    ds = datasets.Dataset(packed, fingerprint=generate_random_fingerprint())
    ds.save_to_disk(str(out))
    del ds, packed
    if handled_path is not None and not keep_handled:
        handled_path.unlink()
    elapsed = time.perf_counter() - t0
    st = stats.to_dict()
    report.update({
        "packing": st,
        "packed_rows": int(stats.rows),
        "fill_ratio": float(stats.fill_ratio),
        "pack_elapsed_s": round(pack_s, 3),
        "elapsed_s": round(elapsed, 3),
        "tokens_per_s": round(report.get("tokens", 0) / elapsed, 1) if elapsed > 0 else None,
        "peak_rss_mb": _peak_rss_mb(),
        "handled_kept": bool(handled_path is not None and keep_handled),
    })


# ----------------------------------------------------------------------------- merge

def merge(shard_dirs: list[str], output: str, seed: int | None = None, keep_handled: bool = False,
          progress: bool = True) -> dict:
    """Concatenate shard outputs of one ``distill preprocess --num-shards n`` run in input order
    and pack once: the result equals an unsharded run (same rows, same packing)."""
    import pyarrow as pa

    from distilled.io_utils import atomic_dir, write_json

    t0 = time.perf_counter()
    shards = []
    for d in shard_dirs:
        rp = Path(d) / REPORT_FILE
        if not rp.is_file():
            raise FileNotFoundError(f"{d}: no {REPORT_FILE}; not a `distill preprocess` output")
        rep = json.loads(rp.read_text())
        if not (Path(d) / HANDLED_FILE).is_file():
            raise FileNotFoundError(f"{d}: no {HANDLED_FILE} (shard runs keep it; rerun with --keep-handled)")
        shards.append((d, rep))
    if not shards:
        raise ValueError("no shard directories given")
    ref = shards[0][1]
    # hosts may mount data and models at different paths: compare content, not paths
    same = ("seq_length", "pad_id", "overlong", "format", "tokenizer_sha256")
    for d, rep in shards[1:]:
        for k in same:
            if rep.get(k) != ref.get(k):
                raise ValueError(f"{d}: {k} = {rep.get(k)!r} differs from {shards[0][0]}: {ref.get(k)!r}")
        if [(Path(s["path"]).name, s["kind"]) for s in rep["inputs"]] != \
                [(Path(s["path"]).name, s["kind"]) for s in ref["inputs"]]:
            raise ValueError(f"{d}: inputs differ from {shards[0][0]}'s (same files, same order needed)")
    count = ref["shard"]["count"]
    idx = sorted(rep["shard"]["index"] for _, rep in shards)
    if any(rep["shard"]["count"] != count for _, rep in shards) or idx != list(range(count)):
        raise ValueError(f"shards must be exactly 0..{count - 1} of one run, got indices {idx}")
    shards.sort(key=lambda x: x[1]["shard"]["index"])
    tables = [(_read_handled(Path(d) / HANDLED_FILE), rep["samples_per_source"]) for d, rep in shards]
    parts = []
    for si in range(len(ref["inputs"])):  # input order: source, then shard
        for table, per_src in tables:
            off = sum(per_src[:si])
            if per_src[si]:
                parts.append(table.slice(off, per_src[si]))
    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32()))])
    merged = pa.concat_tables(parts) if parts else schema.empty_table()

    sum_keys = ("rows_in", "rows_kept", "rows_skipped", "samples", "tokens", "trained_tokens", "fallback_rows")
    skips = SkipCounter()
    hist = np.zeros(len(HIST_EDGES), np.int64)
    for _, rep in shards:
        for k, v in rep["skips"]["by_reason"].items():
            skips.add(k, rep["skips"]["first_seen"].get(k, ""), v)
        hist += np.asarray(rep["length_histogram"]["counts"])
    report = {k: ref.get(k) for k in ("inputs", "format", "tokenizer", "tokenizer_sha256", "seq_length", "pad_id",
                                      "overlong", "engine")}
    report.update({k: int(sum(rep.get(k, 0) for _, rep in shards)) for k in sum_keys})
    report["skips"] = skips.to_dict()
    report["samples_per_source"] = [int(sum(rep["samples_per_source"][i] for _, rep in shards))
                                    for i in range(len(ref["inputs"]))]
    report["length_histogram"] = dict(ref["length_histogram"], counts=hist.tolist())
    report["merged_from"] = [str(d) for d, _ in shards]
    report["shard"] = {"index": 0, "count": 1}
    with atomic_dir(output) as tmp:
        handled = None
        if keep_handled:
            handled = Path(tmp) / HANDLED_FILE
            with pa.OSFile(str(handled), "wb") as sink, pa.ipc.new_file(sink, schema) as w:
                w.write_table(merged)
        _pack_and_save(Path(tmp), handled, report["seq_length"], report["pad_id"], report["overlong"], seed,
                       report, keep_handled, progress, t0, table=merged)
        write_json(Path(tmp) / REPORT_FILE, report)
    return report


# ----------------------------------------------------------------------------- CLI

def summary_line(rep: dict) -> str:
    """The one-line summary printed at the end of a run."""
    return (f"{rep['rows_in']} rows in, {rep['rows_kept']} kept, {rep['skips']['total']} skipped "
            f"{rep['skips']['by_reason'] or ''}; {rep['samples']} samples, {rep['tokens']} tokens -> "
            f"{rep['packed_rows']} rows of {rep['seq_length']} (fill {rep['fill_ratio']:.2%}) in "
            f"{rep['elapsed_s']:.1f}s, peak RSS {rep['peak_rss_mb']:.0f} MB")


@dataclass
class MergeConfig:
    """``distill merge``'s options (flags via :mod:`distilled.settings`); see :func:`merge`."""

    shards: list[str] = option(positional=True, metavar="SHARD_DIR", help="packed output folders of distill preprocess to merge")
    output: str = option(metavar="DIR", help="merged output directory (replaced atomically)")
    seed: int | None = option(None, help="shuffle packed rows with this seed")
    keep_handled: bool = option(False, help=f"keep the merged unpacked {HANDLED_FILE}")
    progress: bool = True  # the CLI's --quiet (see register_cli)


def _config_from_args(args: argparse.Namespace) -> PreprocessConfig:
    """The parsed flags -> :class:`PreprocessConfig` (with its :class:`FormatConfig`)."""
    fmt = from_args(FormatConfig, args, name=args.format,
                    **({"system_prompt": None} if args.no_system_prompt else {}))
    return from_args(PreprocessConfig, args, format=fmt, progress=not args.quiet)


def _cmd_preprocess(args: argparse.Namespace) -> int:
    try:
        cfg = _config_from_args(args)
        rep = preprocess(cfg)
    except (DataError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(summary_line(rep))
    print(f"wrote {cfg.output} (report: {Path(cfg.output) / REPORT_FILE})")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    cfg = from_args(MergeConfig, args, progress=not args.quiet)
    try:
        rep = merge(cfg.shards, cfg.output, seed=cfg.seed, keep_handled=cfg.keep_handled, progress=cfg.progress)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"merged {len(cfg.shards)} shards: " + summary_line(rep))
    return 0


def _flags(parser: argparse.ArgumentParser, cls: type, *names: str) -> None:
    """:func:`add_arguments` for just the fields ``names`` of ``cls``, in that order. Why: the
    preprocess flags live on two dataclasses, and adding them in runs keeps ``--help`` in its
    long-standing order."""
    for name in names:
        add_arguments(parser, cls, skip=[f.name for f in fields(cls) if f.name != name])


def _add_quiet(parser: argparse.ArgumentParser) -> None:
    # explicit: the `progress` field is the flag's negation, and settings only negates `--no-*` flags
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def register_cli(sub) -> None:
    """``distill preprocess`` and ``distill merge``."""
    p = sub.add_parser("preprocess", help="rows -> tokenized, masked, BFD-packed Arrow (no YAML)",
                       description="Validate, tokenize (assistant turns + closing <|im_end|> trained), BFD-pack "
                                   "and write a datasets.load_from_disk directory plus report.json, atomically.")
    head = ("tokenizer", "seq_length", "output", "num_proc", "strict", "shard_index", "num_shards")
    _flags(p, PreprocessConfig, "inputs")
    # explicit: required here, while FormatConfig.name defaults to "cot" for Python callers
    p.add_argument("--format", required=True, choices=FORMATS, help="row format (docs/data-pipeline.md)")
    _flags(p, PreprocessConfig, *head)
    _flags(p, FormatConfig, "generation_policy", "system_prompt")
    # explicit: a second flag for the system_prompt field (sets it to None)
    p.add_argument("--no-system-prompt", action="store_true", help="add no system turn")
    _flags(p, FormatConfig, "think_style", "messages_column", "domains", "domain_column")
    add_arguments(p, PreprocessConfig, skip=("inputs", *head))  # the rest, in field order
    _add_quiet(p)
    p.set_defaults(func=_cmd_preprocess)

    m = sub.add_parser("merge", help="merge `distill preprocess --num-shards` outputs (packs once)",
                       description="Concatenate shard outputs in input order and BFD-pack once; the result "
                                   "equals an unsharded run.")
    add_arguments(m, MergeConfig)
    _add_quiet(m)
    m.set_defaults(func=_cmd_merge)
