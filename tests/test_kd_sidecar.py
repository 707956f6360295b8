"""Top-K sidecar: round trip, codecs, torn-tail repair, orphan cut on resume, duplicates refused."""

from __future__ import annotations

import numpy as np
import pytest

from distilled.kd.sidecar import (CODEC_PLANES, CODEC_RAW, CODEC_ZLIB, HEADER_SIZE, SidecarError, SidecarReader,
                                  SidecarWriter, TokenTopK, scan, sidecar_path)
from distilled.kd.standin import synth_top_logprobs


def _rec(n: int, k: int = 5, seed: int = 0) -> TokenTopK:
    ids = np.random.default_rng(seed).integers(0, 151000, size=n)
    return synth_top_logprobs(ids, k, seed)


def test_sidecar_path():
    assert sidecar_path("a/gens.jsonl").name == "gens.topk.bin"
    assert sidecar_path("gens").name == "gens.topk.bin"


@pytest.mark.parametrize("codec", [CODEC_RAW, CODEC_ZLIB, CODEC_PLANES])
def test_round_trip_every_codec(tmp_path, codec):
    p = tmp_path / "g.topk.bin"
    recs = {("u1", 0): _rec(7, seed=1), ("u1", 1): _rec(0, seed=2), ("ü-2", 0): _rec(300, seed=3)}
    with SidecarWriter(p, codec=codec) as w:
        for (u, g), r in recs.items():
            w.write(u, g, r)
    with SidecarReader(p, verify="all") as r:
        assert len(r) == 3 and r.problem is None
        for (u, g), want in recs.items():
            got = r.get(u, g)
            np.testing.assert_array_equal(got.sampled_ids, want.sampled_ids)
            np.testing.assert_array_equal(got.topk_ids, want.topk_ids)
            # stored as float16: exact after the same rounding
            np.testing.assert_array_equal(got.topk_logprobs, want.topk_logprobs.astype(np.float16).astype(np.float32))
            np.testing.assert_array_equal(got.sampled_logprobs,
                                          want.sampled_logprobs.astype(np.float16).astype(np.float32))
        assert r.get("nope", 0) is None
        assert r.tokens == 307


def test_raw_size_is_6_bytes_per_entry(tmp_path):
    p = tmp_path / "g.topk.bin"
    with SidecarWriter(p, codec=CODEC_RAW) as w:
        w.write("u", 0, _rec(100, k=20))
    assert p.stat().st_size == HEADER_SIZE + 1 + 100 * 6 * 21


def test_torn_tail_is_cut_and_complete_records_kept(tmp_path):
    p = tmp_path / "g.topk.bin"
    with SidecarWriter(p) as w:
        w.write("a", 0, _rec(50, seed=1))
        w.write("b", 0, _rec(60, seed=2))
    full = p.read_bytes()
    entries, end, problem = scan(p)
    assert end == len(full) and problem is None
    b_start = entries[1].offset
    for cut in (b_start + 3, b_start + HEADER_SIZE + 5, len(full) - 1):  # torn header, torn payload
        p.write_bytes(full[:cut])
        w = SidecarWriter(p)
        assert w.repaired_bytes == cut - b_start
        w.write("b", 0, _rec(60, seed=2))
        w.close()
        assert p.read_bytes() == full
    # a flipped byte in the last record's payload: CRC catches it, the record is cut
    bad = bytearray(full)
    bad[-3] ^= 0xFF
    p.write_bytes(bytes(bad))
    r = SidecarReader(p)
    assert ("b", 0) not in r and ("a", 0) in r and "CRC" in r.problem
    r.close()


def test_damage_in_the_middle_is_an_error_not_a_repair(tmp_path):
    p = tmp_path / "g.topk.bin"
    with SidecarWriter(p) as w:
        w.write("a", 0, _rec(50, seed=1))
        w.write("b", 0, _rec(50, seed=2))
    bad = bytearray(p.read_bytes())
    bad[HEADER_SIZE + 4] ^= 0xFF
    p.write_bytes(bytes(bad))
    with pytest.raises(SidecarError, match="damaged in the middle"):
        scan(p, verify="all")


def test_resume_cuts_orphans_of_uncommitted_problems(tmp_path):
    p = tmp_path / "g.topk.bin"
    with SidecarWriter(p) as w:
        for u in ("a", "b", "c"):
            for g in range(2):
                w.write(u, g, _rec(10, seed=ord(u) + g))
    # the JSONL committed a and b only (c's line was torn by the crash)
    w = SidecarWriter(p, committed={"a", "b"})
    assert w.orphan_records == 2 and w.missing_committed == 0
    w.write("c", 0, _rec(10, seed=1))  # regenerated: stored once
    w.write("c", 1, _rec(10, seed=2))
    w.close()
    r = SidecarReader(p, verify="all")
    assert sorted(r.keys()) == [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("c", 0), ("c", 1)]
    r.close()
    # committed problems without records are reported (trained by CE only)
    w = SidecarWriter(p, committed={"a", "b", "c", "d"})
    assert w.missing_committed == 1 and w.orphan_records == 0
    with pytest.raises(SidecarError, match="already stored"):
        w.write("a", 0, _rec(3))
    w.close()


def test_sidecar_of_another_generations_file_is_refused(tmp_path):
    p = tmp_path / "g.topk.bin"
    with SidecarWriter(p) as w:
        w.write("x", 0, _rec(5))
        w.write("a", 0, _rec(5))
    with pytest.raises(SidecarError, match="does not belong"):
        SidecarWriter(p, committed={"a"})


def test_duplicate_key_in_file_is_refused(tmp_path):
    p = tmp_path / "g.topk.bin"
    with SidecarWriter(p) as w:
        w.write("a", 0, _rec(5))
    data = p.read_bytes()
    p.write_bytes(data + data)
    with pytest.raises(SidecarError, match="stored twice"):
        SidecarReader(p)


def test_planes_codec_beats_raw_on_teacher_like_data(tmp_path):
    from distilled.kd.sidecar import encode_body

    rec = _rec(2000, k=20, seed=5)
    raw = len(encode_body(rec, CODEC_RAW))
    planes = len(encode_body(rec, CODEC_PLANES))
    assert planes < 0.9 * raw
