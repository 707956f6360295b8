"""`distill preprocess` / `distill merge`: bad-input counting, --strict messages, atomic output,
input kinds, shards + merge == unsharded, worker processes, report.json consistency."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import pytest

from distilled.data import preprocess as pp
from distilled.data.formats import DataError, FormatConfig
from distilled.settings import from_args

SEQ = 512


def _row(i: int, rng: random.Random, n: int | None = None) -> dict:
    n = rng.randint(5, 150) if n is None else n
    words = ["step", " x", "=", str(i), " 数学", "\\frac{1}{2}", "\n", " Wait"]
    think = "".join(rng.choice(words) for _ in range(n))
    return {"problem": f"Problem {i}: what is {i}?", "uuid": f"u{i}",
            "messages": [{"role": "user", "content": f"Problem {i}: what is {i}?"},
                         {"role": "assistant", "content": f"<think>\n{think}\n</think>\n\n\\boxed{{{i}}}"}]}


def _write_jsonl(path: Path, rows: list, raw_lines: dict[int, str] | None = None) -> Path:
    raw_lines = raw_lines or {}
    with open(path, "w", encoding="utf-8") as f:
        for i, r in enumerate(rows):
            if i in raw_lines:
                f.write(raw_lines[i] + "\n")
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def _cfg(inputs, out, **kw) -> pp.PreprocessConfig:
    kw.setdefault("format", FormatConfig("cot"))
    return pp.PreprocessConfig(inputs=[str(i) for i in inputs], tokenizer=kw.pop("tokenizer"), seq_length=kw.pop("seq", SEQ),
                               output=str(out), progress=False, **kw)


def _load(out: Path):
    import datasets

    return datasets.load_from_disk(str(out))


BAD_LINES = {
    3: "{not json",
    5: json.dumps([1, 2]),
    7: json.dumps({"problem": "p"}),  # missing messages
    9: json.dumps({"messages": "text"}),  # wrong type
    11: json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}),
    13: json.dumps({"messages": [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "a"}]}),
    15: json.dumps({"messages": [{"role": "user", "content": "q"}]}),
}
BAD_REASONS = {"invalid_json": 1, "bad_type": 2, "missing_column": 1, "empty_content": 1, "non_string_content": 1,
               "no_assistant_turn": 1}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rng = random.Random(0)
    d = tmp_path_factory.mktemp("pp")
    rows = [_row(i, rng) for i in range(60)]
    rows[20] = _row(20, rng, n=2000)  # overlong at SEQ
    jsonl = _write_jsonl(d / "a.jsonl", rows, BAD_LINES)
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows_b = [_row(100 + i, rng) for i in range(45)]
    pq.write_table(pa.Table.from_pylist(rows_b), d / "b.parquet", row_group_size=10)
    return d, jsonl, d / "b.parquet", rows, rows_b


def test_bad_input_counted_and_report_consistent(data, tmp_path, qwen_tokenizer_dir, qwen_tokenizer):
    d, jsonl, _, rows, _ = data
    out = tmp_path / "out"
    rep = pp.preprocess(_cfg([jsonl], out, tokenizer=str(qwen_tokenizer_dir)))
    by = rep["skips"]["by_reason"]
    assert by == {**BAD_REASONS, "overlong": 1}
    assert rep["rows_in"] == 60 + len(BAD_LINES)
    assert rep["rows_kept"] == 59 and rep["samples"] == 59
    assert rep["rows_in"] == rep["rows_kept"] + rep["rows_skipped"] + by["overlong"]
    assert rep["skips"]["first_seen"]["invalid_json"].startswith(f"{jsonl}:4:")  # 1-based line numbers
    assert "field 'input_ids'" in rep["skips"]["first_seen"]["overlong"] and f"{jsonl}:" in rep["skips"]["first_seen"]["overlong"]
    st = rep["packing"]
    assert st["tokens"] == rep["tokens"] and st["samples_packed"] == rep["samples"] == st["samples_in"]
    assert rep["packed_rows"] == st["rows"]
    assert abs(rep["fill_ratio"] - rep["tokens"] / (rep["packed_rows"] * SEQ)) < 1e-9
    assert sum(rep["length_histogram"]["counts"]) == rep["samples"]
    assert rep["peak_rss_mb"] > 0 and rep["elapsed_s"] > 0

    ds = _load(out)
    assert set(ds.column_names) == {"input_ids", "labels", "actual_seq_len", "position_ids"}
    assert len(ds) == rep["packed_rows"]
    ids = [np.asarray(r) for r in ds["input_ids"]]
    assert all(len(r) == SEQ for r in ids)
    assert sum(int((r != 151643).sum()) for r in ids) == rep["tokens"]  # nothing lost, pad is 151643
    # labels are the next token where the next token is trained (shifted once, MindFormers style)
    r0, l0 = ids[0], np.asarray(ds[0]["labels"])
    trained = l0 != -100
    assert trained.any() and (l0[:-1][trained[:-1]] == r0[1:][trained[:-1]]).all()
    assert not (out / pp.HANDLED_FILE).exists()
    # every kept problem is in the output exactly once
    text = qwen_tokenizer.decode(np.concatenate(ids))
    for i in (0, 19, 21, 59):
        assert text.count(f"Problem {i}: what is {i}?<|im_end|>") == 1
    assert "Problem 20:" not in text


def test_strict_names_file_row_field_and_writes_nothing(data, tmp_path, qwen_tokenizer_dir):
    _, jsonl, _, _, _ = data
    out = tmp_path / "strict"
    with pytest.raises(DataError, match=rf"{jsonl}:4: invalid JSON"):
        pp.preprocess(_cfg([jsonl], out, tokenizer=str(qwen_tokenizer_dir), strict=True))
    assert not out.exists()
    rng = random.Random(1)
    p2 = _write_jsonl(tmp_path / "c.jsonl", [_row(i, rng) for i in range(5)],
                      {2: json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 7}]})})
    with pytest.raises(DataError, match=rf"{p2}:3: field 'messages\[1\]\.content': expected a string, got int"):
        pp.preprocess(_cfg([p2], out, tokenizer=str(qwen_tokenizer_dir), strict=True))
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_atomic_output_keeps_previous_on_failure(data, tmp_path, qwen_tokenizer_dir):
    _, jsonl, _, _, _ = data
    out = tmp_path / "out"
    out.mkdir()
    (out / "marker").write_text("previous run")
    empty = _write_jsonl(tmp_path / "empty.jsonl", [{"nothing": 1}])
    with pytest.raises(ValueError, match="no sample left"):
        pp.preprocess(_cfg([empty], out, tokenizer=str(qwen_tokenizer_dir)))
    assert (out / "marker").read_text() == "previous run"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_input_kinds_equal(data, tmp_path, qwen_tokenizer_dir):
    """jsonl, json array, parquet and save_to_disk inputs holding the same rows give the same output."""
    import datasets

    d, _, parquet, _, rows_b = data
    (tmp_path / "b.json").write_text(json.dumps(rows_b))
    _write_jsonl(tmp_path / "b.jsonl", rows_b)
    datasets.Dataset.from_list(rows_b).save_to_disk(str(tmp_path / "b_arrow"))
    outs = []
    for name in ("b.jsonl", "b.json", "b_arrow"):
        out = tmp_path / f"o_{name}"
        pp.preprocess(_cfg([tmp_path / name], out, tokenizer=str(qwen_tokenizer_dir)))
        outs.append(_load(out).to_dict())
    out = tmp_path / "o_parquet"
    pp.preprocess(_cfg([parquet], out, tokenizer=str(qwen_tokenizer_dir)))
    outs.append(_load(out).to_dict())
    assert all(o == outs[0] for o in outs[1:])


def test_shards_then_merge_equals_unsharded(data, tmp_path, qwen_tokenizer_dir):
    d, jsonl, parquet, _, _ = data
    full = tmp_path / "full"
    rep_full = pp.preprocess(_cfg([jsonl, parquet], full, tokenizer=str(qwen_tokenizer_dir), seed=3))
    n = 3
    shard_dirs = []
    for i in range(n):
        sd = tmp_path / f"shard{i}"
        pp.preprocess(_cfg([jsonl, parquet], sd, tokenizer=str(qwen_tokenizer_dir), shard_index=i, num_shards=n))
        assert (sd / pp.HANDLED_FILE).exists()
        shard_dirs.append(str(sd))
    merged = tmp_path / "merged"
    parser = argparse.ArgumentParser()
    pp.register_cli(parser.add_subparsers())
    args = parser.parse_args(["merge", *reversed(shard_dirs), "--output", str(merged), "--seed", "3", "--quiet"])
    assert args.func(args) == 0
    assert _load(merged).to_dict() == _load(full).to_dict()
    rep = json.loads((merged / pp.REPORT_FILE).read_text())
    for k in ("rows_in", "rows_kept", "samples", "tokens", "trained_tokens", "packed_rows", "fill_ratio",
              "samples_per_source"):
        assert rep[k] == rep_full[k], k
    assert rep["skips"]["by_reason"] == rep_full["skips"]["by_reason"]
    # an incomplete set of shards is refused
    args = parser.parse_args(["merge", shard_dirs[0], shard_dirs[2], "--output", str(tmp_path / "bad"), "--quiet"])
    assert args.func(args) == 1 and not (tmp_path / "bad").exists()


def test_jsonl_byte_range_shards_cover_every_line_once(tmp_path):
    p = tmp_path / "x.jsonl"
    lines = [json.dumps({"i": i, "pad": "y" * (i % 37)}) for i in range(503)]
    p.write_text("\n".join(lines[:250]) + "\n\n" + "\n".join(lines[250:]) + "\n")
    want = [f"{p}:{k + 1}" for k in range(250)] + [f"{p}:{k + 2}" for k in range(250, 503)]  # blank line 251
    for n in (1, 2, 7, 64, 501):
        seen = []
        for i in range(n):
            seen += [(loc, r["i"]) for loc, r in pp.iter_source(pp.Source(str(p), "jsonl"), i, n)]
        assert [r for _, r in seen] == list(range(503))
        assert [loc for loc, _ in seen] == want


def test_num_proc_same_result(data, tmp_path, qwen_tokenizer_dir):
    _, jsonl, _, _, _ = data
    a, b = tmp_path / "a", tmp_path / "b"
    ra = pp.preprocess(_cfg([jsonl], a, tokenizer=str(qwen_tokenizer_dir), batch_size=16))
    rb = pp.preprocess(_cfg([jsonl], b, tokenizer=str(qwen_tokenizer_dir), batch_size=16, num_proc=2))
    assert _load(a).to_dict() == _load(b).to_dict()
    assert ra["skips"] == rb["skips"] and ra["tokens"] == rb["tokens"]


def test_openr1_policy_truncate_and_cli(tmp_path, qwen_tokenizer_dir):
    rng = random.Random(2)
    rows = []
    for i in range(12):
        r = _row(i, rng)
        gen = r["messages"][1]["content"]
        r.update(generations=[gen, gen + " again", "<think>long " * 400], correctness_math_verify=[True, True, True],
                 is_reasoning_complete=[True, True, True])
        rows.append(r)
    src = _write_jsonl(tmp_path / "o.jsonl", rows)
    parser = argparse.ArgumentParser()
    pp.register_cli(parser.add_subparsers())
    out = tmp_path / "o"
    args = parser.parse_args(["preprocess", "--input", str(src), "--format", "openr1", "--generation-policy", "all_correct",
                              "--tokenizer", str(qwen_tokenizer_dir), "--seq-length", "256", "--output", str(out),
                              "--overlong", "truncate", "--quiet"])
    assert args.func(args) == 0
    rep = json.loads((out / pp.REPORT_FILE).read_text())
    assert rep["samples"] == 36 and rep["rows_kept"] == 12
    assert rep["packing"]["truncated"] >= 12 and rep["skips"]["total"] == 0


def test_decontaminate_hook(data, tmp_path, qwen_tokenizer_dir):
    pytest.importorskip("distilled.data.decontaminate")
    _, _, parquet, _, rows_b = data
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"problem": rows_b[4]["problem"] + " Give the answer as an integer please."}) + "\n")
    rep = pp.preprocess(_cfg([parquet], tmp_path / "o", tokenizer=str(qwen_tokenizer_dir),
                             decontaminate=[f"mybench={bench}"], decontaminate_ngram=4))
    assert rep["skips"]["by_reason"] == {"contaminated": 1}
    assert rep["decontamination"]["by_benchmark"] == {"mybench": 1}
    assert rep["rows_kept"] == len(rows_b) - 1


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    pp.register_cli(parser.add_subparsers())
    return parser.parse_args(argv)


def test_cli_flags_build_the_config():
    """Every `distill preprocess` / `distill merge` flag lands in its config field (the flags are
    declared once, on PreprocessConfig / FormatConfig / MergeConfig)."""
    need = ["--input", "a.jsonl", "--format", "cot", "--tokenizer", "tok", "--seq-length", "64", "--output", "o"]
    # the CLI's defaults are the dataclasses' defaults
    assert pp._config_from_args(_parse(["preprocess", *need])) == pp.PreprocessConfig(
        inputs=["a.jsonl"], tokenizer="tok", seq_length=64, output="o", format=FormatConfig("cot"))
    argv = ["preprocess", "--input", "a", "--input", "b", "--format", "openr1", "--generation-policy", "all_correct",
            "--tokenizer", "t", "--seq-length", "9", "--output", "o", "--num-proc", "3", "--strict",
            "--shard-index", "1", "--num-shards", "2", "--system-prompt", "S", "--think-style", "r1",
            "--messages-column", "m", "--domains", "math,code=0.5", "--domain-column", "dom", "--chat-template",
            "x.jinja", "--engine", "hf", "--overlong", "truncate", "--pad-id", "7", "--batch-size", "5",
            "--keep-handled", "--seed", "3", "--decontaminate", "math_500,,aime24", "--decontaminate-data", "dd",
            "--decontaminate-ngram", "4", "--quiet"]
    assert pp._config_from_args(_parse(argv)) == pp.PreprocessConfig(
        inputs=["a", "b"], tokenizer="t", seq_length=9, output="o",
        format=FormatConfig("openr1", "S", "all_correct", "r1", "m", domain_column="dom",
                            domains={"math": 1.0, "code": 0.5}),
        num_proc=3, strict=True, shard_index=1, num_shards=2, chat_template="x.jinja", engine="hf",
        overlong="truncate", pad_id=7, batch_size=5, keep_handled=True, seed=3, decontaminate=["math_500", "aime24"],
        decontaminate_data="dd", decontaminate_ngram=4, progress=False)
    kd = pp._config_from_args(_parse(["preprocess", *need, "--kd-sidecar", "s1", "--kd-sidecar", "s2", "--kd-top-k", "4",
                                      "--no-system-prompt", "--decontaminate", ""]))
    assert (kd.kd_sidecars, kd.kd_top_k, kd.format.system_prompt, kd.decontaminate) == (["s1", "s2"], 4, None, None)
    with pytest.raises(SystemExit):  # --format stays required on the CLI (FormatConfig defaults it for Python)
        _parse(["preprocess", *need[:2], *need[4:]])
    m = _parse(["merge", "s0", "s1", "--output", "o", "--seed", "2", "--keep-handled", "--quiet"])
    assert from_args(pp.MergeConfig, m, progress=not m.quiet) == pp.MergeConfig(
        shards=["s0", "s1"], output="o", seed=2, keep_handled=True, progress=False)
