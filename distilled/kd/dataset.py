"""Preprocessing with top-K: tokenised samples + sidecars -> packed rows with aligned top-K columns.

Why samples are matched to records **by content**: between ``distill generate`` and ``distill
preprocess`` traces pass through rejection sampling, format conversion, decontamination, shuffles
and merges, and the tokenised table keeps no uuid. The one thing that must survive for KD to be
correct is the token sequence of the answer itself. So every record is indexed by a hash of its
sampled tokens (closing special tokens removed) and every sample by the hash of its trained span;
equal hashes mean the sample *is* that generation, token for token (checked again position by
position in :func:`~distilled.kd.align.sample_topk`). A sample whose answer was edited (e.g.
``--think-style r1``) simply finds no record and trains by CE only, counted in the report.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Iterable, Sequence

import numpy as np

from distilled.kd.align import AlignStats, pack_with_topk, sample_topk, trained_span
from distilled.kd.sidecar import SidecarReader, TokenTopK


def _strip_special(ids: np.ndarray, special: set[int]) -> np.ndarray:
    n = len(ids)
    while n and int(ids[n - 1]) in special:
        n -= 1
    return ids[:n]


def content_key(ids: np.ndarray, special: set[int]) -> bytes:
    """Hash of a token sequence without its closing special tokens."""
    return hashlib.blake2b(np.ascontiguousarray(_strip_special(np.asarray(ids), special), dtype="<i4").tobytes(),
                           digest_size=16).digest()


class SidecarIndex:
    """All records of one or more sidecars, found by the content of their answers."""

    def __init__(self, paths: Sequence[str | os.PathLike], special: Iterable[int]):
        self.special = set(int(i) for i in special)
        self.readers = [SidecarReader(p) for p in paths]
        self.by_content: dict[bytes, tuple[int, tuple[str, int]]] = {}
        self.records = 0
        self.k = max((r.k or 0) for r in self.readers) if self.readers else 0
        for ri, r in enumerate(self.readers):
            for key, rec in r:
                self.records += 1
                self.by_content.setdefault(content_key(rec.sampled_ids, self.special), (ri, key))

    def find(self, span_ids: np.ndarray) -> TokenTopK | None:
        hit = self.by_content.get(content_key(span_ids, self.special))
        if hit is None:
            return None
        ri, key = hit
        return self.readers[ri].get(*key)

    def close(self) -> None:
        for r in self.readers:
            r.close()


def pack_table_with_sidecars(table, sidecars: Sequence[str | os.PathLike], k: int | None, seq_length: int, pad_id: int,
                             special: Iterable[int], overlong: str = "drop", seed: int | None = None,
                             progress: bool = False):
    """Like :func:`distilled.data.packing.pack_table` plus the ``topk_ids``/``topk_logprobs`` columns.

    ``k`` None takes the sidecars' K. Returns ``(packed, PackStats, report)`` where ``report`` says how many samples found teacher
    data, why the others did not, and the time spent (for ``report.json`` and bench/kd.py).
    """
    import pyarrow.compute as pc

    t0 = time.perf_counter()
    index = SidecarIndex(sidecars, special)
    t_index = time.perf_counter() - t0
    k = int(k or index.k or 0)
    if k < 1:
        index.close()
        raise ValueError(f"{', '.join(map(str, sidecars))}: no records (K unknown); nothing to distil from")
    try:
        ids_col = table.column("input_ids")
        lab_col = table.column("labels")
        ids_flat = pc.list_flatten(ids_col).to_numpy().astype(np.int32)
        lab_flat = pc.list_flatten(lab_col).to_numpy().astype(np.int32)
        lens = pc.list_value_length(ids_col).to_numpy(zero_copy_only=False).astype(np.int64)
        offs = np.zeros(len(lens) + 1, np.int64)
        np.cumsum(lens, out=offs[1:])
        st = AlignStats(samples=len(lens))
        out_ids = np.full((int(offs[-1]), k), -1, np.int32)
        out_lp = np.zeros((int(offs[-1]), k), np.float16)
        for i in range(len(lens)):
            a, b = int(offs[i]), int(offs[i + 1])
            x, y = ids_flat[a:b], lab_flat[a:b]
            span = trained_span(y)
            rec = index.find(x[span[0]:span[1]]) if span is not None else None
            ti, tl, status = sample_topk(x, y, rec, k)
            if status == "ok":
                st.with_topk += 1
                out_ids[a:b] = ti
                out_lp[a:b] = tl
            elif status == "no_record":
                st.no_record += 1
            else:
                st.token_mismatch += 1
        t_align = time.perf_counter() - t0 - t_index
        packed, stats, n_kd = pack_with_topk(table, out_ids, out_lp, seq_length, pad_id, overlong, seed=seed,
                                             progress=progress)
        st.kd_positions = n_kd
        st.trained_positions = int(stats.label_tokens)
    finally:
        index.close()
    rep = st.to_dict()
    rep.update({"k": k, "sidecars": [str(p) for p in sidecars], "records": index.records,
                "index_s": round(t_index, 3), "align_s": round(t_align, 3),
                "kd_elapsed_s": round(time.perf_counter() - t0, 3),
                "kd_position_share": round(n_kd / stats.label_tokens, 4) if stats.label_tokens else 0.0})
    return packed, stats, rep
