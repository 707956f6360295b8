"""Top-K columns aligned to the trained (label) positions of packed rows.

Why this shape: packed rows hold ``labels`` already shifted by one (``labels[p]`` is the token the
model must predict from position ``p``, :mod:`distilled.data.packing`). The teacher's top-K at
generation step ``j`` is its distribution for *generated token* ``j``, so it belongs exactly where
``labels[p] == generated token j``. Two extra columns per packed row carry it:

* ``topk_ids``: ``list<int32>`` of ``seq_length * K`` (row-major ``[S, K]``), ``-1`` where nothing
  is trained or no teacher data exists;
* ``topk_logprobs``: ``list<float16>`` of ``seq_length * K``, ``0`` there.

Because they are ordinary per-row columns, BFD packing order, row shuffling and data-parallel
sharding move them with their rows unchanged. They are built by packing a *position map* (sample
index as ``input_ids``, local position as ``labels``) with the very same :func:`pack_table` call,
so the placement is the packer's own (bin assignment is a pure function of the lengths, the
overlong rule and the seed), then gathering; an invariant check proves every placed top-K predicts
the label at its position.

Steps: :func:`sample_topk` places one generation's record on its sample's unshifted positions
(and refuses a sample whose tokens differ from the teacher's); :func:`pack_with_topk` packs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from distilled.kd import IGNORE_INDEX, NO_TOKEN
from distilled.kd.sidecar import TokenTopK

if TYPE_CHECKING:
    import pyarrow as pa

TOPK_COLUMNS = ("topk_ids", "topk_logprobs")


@dataclass
class AlignStats:
    """How many samples got teacher top-K, and why the others did not."""

    samples: int = 0
    with_topk: int = 0
    no_record: int = 0
    token_mismatch: int = 0
    kd_positions: int = 0  # trained positions that carry a teacher top-K after packing
    trained_positions: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def trained_span(labels: np.ndarray) -> tuple[int, int] | None:
    """``[start, end)`` of the last contiguous run of trained (unshifted) labels, or None."""
    idx = np.nonzero(labels != IGNORE_INDEX)[0]
    if len(idx) == 0:
        return None
    end = int(idx[-1]) + 1
    gaps = np.nonzero(np.diff(idx) != 1)[0]
    start = int(idx[gaps[-1] + 1]) if len(gaps) else int(idx[0])
    return start, end


def sample_topk(input_ids: np.ndarray, labels: np.ndarray, rec: TokenTopK | None,
                k: int) -> tuple[np.ndarray, np.ndarray, str]:
    """One sample's top-K on its *unshifted* positions: ``(ids [L, k], logprobs [L, k], status)``.

    The record covers the last assistant turn (the generation): its step ``j`` lands on the
    ``j``-th trained token. It must match the sample's tokens there (``input_ids[s + j] ==
    sampled_ids[j]``) for every content token; the closing ``<|im_end|>`` may lack teacher data
    (the server stopped without reporting it) and then trains by CE only. Status: ``"ok"``,
    ``"no_record"`` or ``"mismatch"`` (top-K left out; the sample still trains by CE).
    """
    n = len(input_ids)
    ids = np.full((n, k), NO_TOKEN, np.int32)
    lps = np.zeros((n, k), np.float16)
    if rec is None:
        return ids, lps, "no_record"
    span = trained_span(labels)
    if span is None:
        return ids, lps, "no_record"
    s, e = span
    m = min(rec.n_tokens, e - s)
    same = input_ids[s:s + m] == rec.sampled_ids[:m]
    if not same.all():
        m = int(np.argmin(same))
    if m < (e - s) - 1:  # everything but possibly the closing token must be covered
        return ids, lps, "mismatch"
    kk = min(k, rec.k)
    ids[s:s + m, :kk] = rec.topk_ids[:m, :kk]
    lps[s:s + m, :kk] = rec.topk_logprobs[:m, :kk].astype(np.float16)
    lps[ids < 0] = 0
    return ids, lps, "ok"


def _position_map_table(lengths: np.ndarray) -> "pa.Table":
    import pyarrow as pa

    n = len(lengths)
    offs = np.zeros(n + 1, np.int64)
    np.cumsum(lengths, out=offs[1:])
    total = int(offs[-1])
    sample = np.repeat(np.arange(n, dtype=np.int32), lengths)
    local = (np.arange(total, dtype=np.int64) - np.repeat(offs[:-1], lengths)).astype(np.int32)
    o = pa.array(offs.astype(np.int32 if total < 2**31 else np.int64))
    lt = pa.ListArray if total < 2**31 else pa.LargeListArray
    return pa.table({"input_ids": lt.from_arrays(o, pa.array(sample)), "labels": lt.from_arrays(o, pa.array(local))})


def pack_with_topk(table: "pa.Table", topk_ids: np.ndarray, topk_logprobs: np.ndarray, seq_length: int,
                   pad_id: int, overlong: str = "drop", *, seed: int | None = None,
                   boundary_label: str = "ignore", progress: bool = False):
    """Pack ``table`` (``input_ids``/``labels`` unshifted, as for :func:`pack_table`) and add the
    top-K columns. ``topk_ids``/``topk_logprobs``: ``[total_tokens, K]`` over the table's tokens in
    row order (concatenated :func:`sample_topk` outputs).

    Returns ``(packed_table, PackStats, kd_positions)``; the packed table is exactly what
    ``pack_table`` returns plus ``topk_ids`` and ``topk_logprobs``.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    from distilled.data.packing import pack_table

    packed, stats = pack_table(table, seq_length, pad_id, overlong, boundary_label=boundary_label, seed=seed,
                               progress=progress)
    lengths = pc.list_value_length(table.column("input_ids")).to_numpy(zero_copy_only=False).astype(np.int64)
    total = int(lengths.sum())
    if topk_ids.shape[0] != total or topk_logprobs.shape != topk_ids.shape:
        raise ValueError(f"top-K arrays have {topk_ids.shape[0]} rows for {total} tokens")
    k = int(topk_ids.shape[1])
    pmap, _ = pack_table(_position_map_table(lengths), seq_length, -1, overlong, boundary_label="ignore", seed=seed)
    if pmap.num_rows != packed.num_rows:  # pragma: no cover - same lengths, same plan
        raise AssertionError("position map packed into a different number of rows")
    S = int(seq_length)
    samp = pc.list_flatten(pmap.column("input_ids")).to_numpy().astype(np.int64)
    local = pc.list_flatten(pmap.column("labels")).to_numpy().astype(np.int64)
    offs = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offs[1:])
    ok = (samp >= 0) & (local != IGNORE_INDEX)
    src = np.where(ok, offs[np.maximum(samp, 0)] + np.maximum(local, 0), 0)
    out_ids = np.where(ok[:, None], topk_ids[src], NO_TOKEN).astype(np.int32)
    out_lp = np.where(ok[:, None], topk_logprobs[src], 0).astype(np.float16)
    labels = pc.list_flatten(packed.column("labels")).to_numpy()
    has = out_ids[:, 0] >= 0
    if (has & (labels == IGNORE_INDEX)).any():
        p = int(np.nonzero(has & (labels == IGNORE_INDEX))[0][0])
        raise AssertionError(f"packed row {p // S} position {p % S}: teacher top-K on an untrained position")
    flat_in = pc.list_flatten(table.column("input_ids")).to_numpy()
    wrong = has & (flat_in[src] != labels)
    if wrong.any():  # pragma: no cover - would be a packing bug
        p = int(np.nonzero(wrong)[0][0])
        raise AssertionError(f"packed row {p // S} position {p % S}: top-K of token {int(flat_in[src[p]])} placed on "
                             f"label {int(labels[p])}")
    n_rows = packed.num_rows
    row_off = pa.array(np.arange(0, n_rows * S * k + 1, S * k, dtype=np.int64 if n_rows * S * k >= 2**31
                                 else np.int32))
    lt = pa.LargeListArray if n_rows * S * k >= 2**31 else pa.ListArray
    packed = packed.append_column("topk_ids", lt.from_arrays(row_off, pa.array(out_ids.reshape(-1))))
    packed = packed.append_column("topk_logprobs", lt.from_arrays(row_off, pa.array(out_lp.reshape(-1))))
    return packed, stats, int(has.sum())


def build_topk_arrays(input_ids: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                      records: Sequence[TokenTopK | None], k: int) -> tuple[np.ndarray, np.ndarray, AlignStats]:
    """:func:`sample_topk` for every sample, concatenated in row order, with counts."""
    st = AlignStats(samples=len(input_ids))
    ids_parts, lp_parts = [], []
    for x, y, r in zip(input_ids, labels, records):
        i, lp, status = sample_topk(np.asarray(x), np.asarray(y), r, k)
        ids_parts.append(i)
        lp_parts.append(lp)
        if status == "ok":
            st.with_topk += 1
        elif status == "no_record":
            st.no_record += 1
        else:
            st.token_mismatch += 1
    if not ids_parts:
        return np.zeros((0, k), np.int32), np.zeros((0, k), np.float16), st
    return np.concatenate(ids_parts), np.concatenate(lp_parts), st
