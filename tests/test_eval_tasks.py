"""Task loading for `distill eval`: local files, prompts, GPQA shuffle, bad input before generation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distilled.eval.tasks import (GPQA_INSTRUCTION, MATH_PROMPT_TEMPLATE, TaskError, gpqa_shuffle, load_task,
                                  parse_task_names)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def gpqa_rows(k: int) -> list[dict]:
    return [{"Record ID": f"rec{i}", "Question": f"Which is item {i}?", "Correct Answer": f"right {i}",
             "Incorrect Answer 1": f"wrong a{i}", "Incorrect Answer 2": f"wrong b{i}",
             "Incorrect Answer 3": f"wrong c{i}"} for i in range(k)]


def test_parse_task_names():
    assert parse_task_names("math_500, aime24") == ["math_500", "aime24"]
    assert parse_task_names(["aime25,gpqa_diamond", "jsonl:x/y.jsonl"]) == ["aime25", "gpqa_diamond", "jsonl:x/y.jsonl"]
    with pytest.raises(TaskError, match="unknown task 'math500x'"):
        parse_task_names("math_500,math500x")
    with pytest.raises(TaskError, match="twice"):
        parse_task_names("aime24,aime24")
    with pytest.raises(TaskError, match="empty"):
        parse_task_names(" , ")


def test_local_math_task_uses_the_pinned_prompt(tmp_path):
    write_jsonl(tmp_path / "aime24.jsonl", [{"problem": "What is $1+1$?", "answer": "2"},
                                            {"id": 7, "problem": "What is $2+2$?", "answer": 4}])
    t = load_task("aime24", data_dir=tmp_path)
    assert t.name == "aime24" and t.kind == "math" and t.default_n == 64
    assert [p.id for p in t.problems] == ["aime24/0", "7"]
    assert t.problems[1].gold == "4"  # numbers become strings
    assert t.problems[0].user_prompt == MATH_PROMPT_TEMPLATE.format(prompt="What is $1+1$?")
    assert t.problems[0].user_prompt.startswith("\nSolve the following math problem efficiently and clearly.")
    assert "\\boxed{ANSWER}" in t.problems[0].user_prompt
    assert load_task("aime24", data_dir=tmp_path, limit=1).problems[0].id == "aime24/0"


def test_parquet_and_jsonl_task_and_synth_task_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"problem": ["p1", "p2"], "answer": ["1", "2"], "unique_id": ["u1", "u2"]}),
                   tmp_path / "math500.parquet")
    t = load_task("math_500", data_dir=tmp_path)
    assert [p.id for p in t.problems] == ["u1", "u2"] and t.default_n == 4
    f = write_jsonl(tmp_path / "held.jsonl", [{"id": "s1", "problem": "q", "answer": "3", "kind": "arithmetic"}])
    assert load_task(f"jsonl:{f}").problems[0].id == "s1"
    assert load_task(f"jsonl:{f}").name == "held"
    assert load_task("synth", task_file=f).problems[0].gold == "3"


@pytest.mark.parametrize("rows,needle", [
    ([{"problem": "ok", "answer": "1"}, {"problem": "no answer here"}], ":2: field 'answer' is missing"),
    ([{"problem": "ok", "answer": ""}], ":1: field 'answer' is missing or empty"),
    ([{"question": "wrong column", "answer": "1"}], ":1: field 'problem' is missing"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, rows, needle):
    f = write_jsonl(tmp_path / "aime25.jsonl", rows)
    with pytest.raises(TaskError) as e:
        load_task("aime25", data_dir=tmp_path)
    assert str(f) in str(e.value) and needle in str(e.value)


def test_invalid_json_line_is_reported(tmp_path):
    (tmp_path / "aime25.jsonl").write_text('{"problem": "a", "answer": "1"}\n{not json\n')
    with pytest.raises(TaskError, match=r"aime25.jsonl:2: invalid JSON"):
        load_task("aime25", data_dir=tmp_path)


def test_empty_and_missing_datasets(tmp_path):
    (tmp_path / "aime24.jsonl").write_text("")
    with pytest.raises(TaskError, match="is empty"):
        load_task("aime24", data_dir=tmp_path)
    with pytest.raises(TaskError, match="no math500.jsonl"):
        load_task("math_500", data_dir=tmp_path)
    with pytest.raises(TaskError, match="needs --task-file"):
        load_task("synth")
    with pytest.raises(TaskError, match="does not exist"):
        load_task(f"jsonl:{tmp_path / 'nope.jsonl'}")


def test_hub_failure_is_a_clear_error():
    def offline(repo, config, split):
        raise ConnectionError("no network")

    with pytest.raises(TaskError, match=r"HuggingFaceH4/MATH-500.*Offline\? Pass --data-dir"):
        load_task("math_500", hub_loader=offline)
    got = load_task("gpqa_diamond", hub_loader=lambda r, c, s: gpqa_rows(2))
    assert got.source == "hf://Idavidrein/gpqa/gpqa_diamond/train" and len(got.problems) == 2


def test_gpqa_shuffle_is_seeded_recorded_and_independent_of_limit(tmp_path):
    write_jsonl(tmp_path / "gpqa_diamond.jsonl", gpqa_rows(40))
    a = load_task("gpqa_diamond", data_dir=tmp_path, seed=0)
    b = load_task("gpqa_diamond", data_dir=tmp_path, seed=0)
    c = load_task("gpqa_diamond", data_dir=tmp_path, seed=1)
    short = load_task("gpqa_diamond", data_dir=tmp_path, seed=0, limit=5)
    golds = [p.gold for p in a.problems]
    assert golds == [p.gold for p in b.problems]
    assert golds != [p.gold for p in c.problems]
    assert golds[:5] == [p.gold for p in short.problems]
    assert set(golds) == set("ABCD")  # all positions are used over 40 problems
    for p in a.problems:
        i = p.meta["gold_index"]
        assert p.gold == "ABCD"[i]
        assert p.meta["choices"][i] == f"right {p.index}"
        # incorrect answers keep their order around the inserted correct one
        assert [x for x in p.meta["choices"] if x.startswith("wrong")] == [f"wrong a{p.index}", f"wrong b{p.index}",
                                                                           f"wrong c{p.index}"]
        assert p.user_prompt.startswith(GPQA_INSTRUCTION + "\n\n")
        assert f"\n{p.gold}) right {p.index}" in p.user_prompt
    assert gpqa_shuffle(gpqa_rows(1)[0], 0, "rec0") == gpqa_shuffle(gpqa_rows(1)[0], 0, "rec0")


def test_gpqa_missing_column(tmp_path):
    rows = gpqa_rows(2)
    del rows[1]["Incorrect Answer 3"]
    write_jsonl(tmp_path / "gpqa_diamond.jsonl", rows)
    with pytest.raises(TaskError, match=r"gpqa_diamond.jsonl:2: missing or empty field\(s\) \['Incorrect Answer 3'\]"):
        load_task("gpqa_diamond", data_dir=tmp_path)


def test_duplicate_ids_are_refused(tmp_path):
    write_jsonl(tmp_path / "t.jsonl", [{"id": "x", "problem": "a", "answer": "1"}, {"id": "x", "problem": "b", "answer": "2"}])
    with pytest.raises(TaskError, match="duplicate problem ids"):
        load_task(f"jsonl:{tmp_path / 't.jsonl'}")


def test_real_benchmarks_load(shared_dir):
    bench = shared_dir / "data" / "benchmarks"
    assert len(load_task("math_500", data_dir=bench).problems) == 500
    assert len(load_task("aime24", data_dir=bench).problems) == 30
    assert len(load_task("aime25", data_dir=bench).problems) == 30
