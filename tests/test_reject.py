"""`distill reject`: output contract, keep modes, report, malformed lines, crash + rerun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distilled.generate.reject import RejectConfig, RejectError, journal_path, run_reject

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from reject_data import LABELLED, realistic_pairs  # noqa: E402

DISTILL = [sys.executable, "-m", "distilled.cli"]


def R1(answer: str, reasoning: str = "Let me think.") -> str:
    return f"<think>\n{reasoning}\n</think>\n\n{answer}"


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False))
            f.write("\n")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines() if x.strip()]


def generate_style_rows() -> list[dict]:
    """Rows as `distill generate` writes them (prompt, generations, finish_reasons, api_metadata)."""
    return [
        {"id": "a", "problem": "1/2?", "prompt": "Solve: 1/2?", "answer": r"\frac{1}{2}",
         "generations": [R1(r"$\boxed{\frac{1}{3}}$"), R1(r"Long way round... $\boxed{\dfrac{1}{2}}$"),
                         R1(r"$\boxed{0.5}$")],
         "finish_reasons": ["stop", "stop", "stop"], "api_metadata": [{}, {}, {}]},
        {"id": "b", "problem": "x?", "prompt": "Solve: x?", "answer": "5",
         "generations": ["<think>\nit is \\boxed{5} but wait", R1(r"$\boxed{5}$")],
         "finish_reasons": ["stop", "length"], "api_metadata": [{}, {}]},
        {"id": "c", "problem": "none", "prompt": "Solve: none", "answer": "3",
         "generations": [R1("no idea")], "finish_reasons": ["stop"], "api_metadata": [{}]},
    ]


def test_output_contract_generate_rows(tmp_path):
    src = write_jsonl(tmp_path / "gen.jsonl", generate_style_rows())
    rep = run_reject(RejectConfig(src=str(src), dst=str(tmp_path / "kept.jsonl"), rejected=str(tmp_path / "rej.jsonl"),
                                  report=str(tmp_path / "report.json"), workers=1, progress=False))
    kept, rej = read_jsonl(tmp_path / "kept.jsonl"), read_jsonl(tmp_path / "rej.jsonl")
    assert [r["id"] for r in kept] == ["a"] and [r["id"] for r in rej] == ["b", "c"]
    a = kept[0]
    for col in ("problem", "prompt", "answer", "generations", "finish_reasons", "api_metadata"):
        assert a[col] == generate_style_rows()[0][col]  # every input column carried through
    assert a["correctness_math_verify"] == [False, True, True]
    assert a["is_reasoning_complete"] == [True, True, True]
    assert a["messages"] == [{"role": "user", "content": "Solve: 1/2?"},
                             {"role": "assistant", "content": a["generations"][1]}]
    assert a["kept_generation_index"] == 1
    b = rej[0]
    assert b["correctness_math_verify"] == [False, False] and b["is_reasoning_complete"] == [False, False]
    assert "messages" not in b
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk == rep
    assert rep["rows_in"] == 3 and rep["rows_kept"] == 1 and rep["rows_rejected"] == 2
    assert rep["generations_in"] == 6 and rep["generations_correct"] == 2
    assert rep["rejections_by_reason"] == {"wrong_answer": 1, "no_answer": 1, "unfinished": 1, "length": 1,
                                           "timeout": 0, "unparsable_gold": 0}
    assert rep["malformed_lines"] == 0 and rep["generations_per_s"] > 0
    assert not journal_path(tmp_path / "kept.jsonl").exists()


def test_user_turn_is_the_sent_prompt_when_generate_kept_an_input_prompt_column(tmp_path):
    """An input with its own `prompt` column keeps it in generate's output; the student must still
    train on the message the teacher answered (`sent_prompt`), unless --prompt-column says otherwise."""
    row = dict(generate_style_rows()[0], prompt="1/2?", sent_prompt="Solve: 1/2?")
    src = write_jsonl(tmp_path / "gen.jsonl", [row])
    run_reject(RejectConfig(src=str(src), dst=str(tmp_path / "kept.jsonl"), workers=1, progress=False))
    assert read_jsonl(tmp_path / "kept.jsonl")[0]["messages"][0] == {"role": "user", "content": "Solve: 1/2?"}
    run_reject(RejectConfig(src=str(src), dst=str(tmp_path / "kept2.jsonl"), workers=1, progress=False,
                            prompt_column="prompt"))
    assert read_jsonl(tmp_path / "kept2.jsonl")[0]["messages"][0] == {"role": "user", "content": "1/2?"}


@pytest.mark.parametrize("keep, expect", [("first", [1]), ("shortest", [2]), ("all", [1, 2])])
def test_keep_modes(tmp_path, keep, expect):
    src = write_jsonl(tmp_path / "gen.jsonl", generate_style_rows()[:1])
    run_reject(RejectConfig(src=str(src), dst=str(tmp_path / "kept.jsonl"), keep=keep, workers=0, progress=False))
    kept = read_jsonl(tmp_path / "kept.jsonl")
    assert [r["kept_generation_index"] for r in kept] == expect
    assert [r["messages"][1]["content"] for r in kept] == [r["generations"][i] for r, i in zip(kept, expect)]


def test_openr1_rows_and_plain_rows(tmp_path):
    """OpenR1-Math-220k rows (own stale verdict columns, no prompt column) and rows with no
    finish_reasons are accepted; our verdicts replace the stale ones."""
    openr1 = {"problem": "Compute 2+2.", "solution": "4", "answer": "4", "problem_type": "Algebra",
              "generations": [R1(r"$\boxed{5}$"), R1(r"$\boxed{4}$")],
              "correctness_math_verify": [True, False], "is_reasoning_complete": [True, True],
              "finish_reasons": [None, None], "messages": [{"role": "user", "content": "old"}]}
    plain = {"question": "3?", "gold": "3", "outs": [R1(r"$\boxed{3}$")]}
    src = write_jsonl(tmp_path / "o.jsonl", [openr1])
    run_reject(RejectConfig(src=str(src), dst=str(tmp_path / "k.jsonl"), workers=0, progress=False))
    (row,) = read_jsonl(tmp_path / "k.jsonl")
    assert row["correctness_math_verify"] == [False, True] and row["problem_type"] == "Algebra"
    assert row["messages"][0] == {"role": "user", "content": "Compute 2+2."}
    src2 = write_jsonl(tmp_path / "p.jsonl", [plain])
    run_reject(RejectConfig(src=str(src2), dst=str(tmp_path / "k2.jsonl"), answer_column="gold",
                            generations_column="outs", prompt_column="question", workers=0, progress=False))
    (row2,) = read_jsonl(tmp_path / "k2.jsonl")
    assert row2["messages"][0]["content"] == "3?" and row2["correctness_math_verify"] == [True]


def bad_rows() -> list:
    good = generate_style_rows()[0]
    return [
        good,
        "{not json",
        {**good, "generations": "one string"},
        {k: v for k, v in good.items() if k != "answer"},
        {**good, "finish_reasons": ["stop"]},
        {**good, "generations": [R1("x"), None, R1("y")]},
        [1, 2, 3],
        {**good, "id": "last"},
    ]


def test_malformed_lines_are_counted_with_line_numbers(tmp_path):
    src = write_jsonl(tmp_path / "bad.jsonl", bad_rows())
    rep = run_reject(RejectConfig(src=str(src), dst=str(tmp_path / "k.jsonl"), workers=0, progress=False))
    assert rep["rows_in"] == 2 and rep["malformed_lines"] == 6
    by_line = {m["line"]: m["reason"] for m in rep["malformed"]}
    assert sorted(by_line) == [2, 3, 4, 5, 6, 7]
    assert "invalid JSON" in by_line[2]
    assert "'generations': expected a list of strings, got str" in by_line[3]
    assert "missing field 'answer'" in by_line[4]
    assert "'finish_reasons': expected a list of 3" in by_line[5]
    assert "'generations'[1]: expected a string, got NoneType" in by_line[6]
    assert "expected a JSON object" in by_line[7]


def test_strict_stops_at_first_malformed_line(tmp_path):
    src = write_jsonl(tmp_path / "bad.jsonl", bad_rows())
    with pytest.raises(RejectError, match=r"bad\.jsonl:2: invalid JSON"):
        run_reject(RejectConfig(src=str(src), dst=str(tmp_path / "k.jsonl"), strict=True, workers=0, progress=False))
    assert not (tmp_path / "k.jsonl").exists()


def test_cli_errors_are_one_line(tmp_path):
    r = subprocess.run(DISTILL + ["reject", "--src", str(tmp_path / "missing.jsonl"), "--dst", str(tmp_path / "k.jsonl")],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 1 and r.stderr.strip() == f"error: {tmp_path / 'missing.jsonl'}: no such file"
    src = write_jsonl(tmp_path / "g.jsonl", generate_style_rows())
    r = subprocess.run(DISTILL + ["reject", "--src", str(src), "--dst", str(src)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 1 and "may not overwrite the input" in r.stderr


def _big_input(tmp_path: Path, n_rows: int = 40) -> Path:
    pairs = realistic_pairs(n_rows * 3, seed=11, reasoning_chars=(1000, 3000))
    rows = []
    for i in range(n_rows):
        chunk = pairs[3 * i: 3 * i + 3]
        gold, gen, fr, _, what = LABELLED[i % len(LABELLED)]
        rows.append({"id": i, "problem": f"problem {i} ({what})", "answer": gold,
                     "generations": [gen] + [g for g, _, _ in chunk[:2]],
                     "finish_reasons": [fr, chunk[0][2], chunk[1][2]]})
    rows.insert(7, "{torn")
    return write_jsonl(tmp_path / "gen.jsonl", rows)


@pytest.mark.slow
def test_crash_and_rerun_give_the_clean_result(tmp_path):
    """kill -9 a CLI run halfway (workers 2), rerun it: byte-identical to a clean run with
    --workers 1, no duplicates, and the rerun reports the rows it resumed."""
    src = _big_input(tmp_path)
    clean = tmp_path / "clean"
    clean.mkdir()
    r = subprocess.run(DISTILL + ["reject", "--src", str(src), "--dst", str(clean / "kept.jsonl"),
                                  "--rejected", str(clean / "rej.jsonl"), "--workers", "1", "--no-progress"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "1 malformed line(s)" in r.stdout and "gen.jsonl:8: invalid JSON" in r.stderr

    crash = tmp_path / "crash"
    crash.mkdir()
    args = DISTILL + ["reject", "--src", str(src), "--dst", str(crash / "kept.jsonl"), "--rejected",
                      str(crash / "rej.jsonl"), "--report", str(crash / "report.json"), "--workers", "2", "--no-progress"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    journal = journal_path(crash / "kept.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline:
        if journal.exists() and len(journal.read_bytes().splitlines()) >= 6:  # header + 5 rows
            break
        assert proc.poll() is None, "finished before it could be killed: make the input bigger"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its verifier workers
    proc.wait()
    assert not (crash / "kept.jsonl").exists()  # nothing half-written under the final name
    with open(journal, "ab") as f:
        f.write(b'{"line": 99, "v": [[tr')  # and a torn journal tail, as a kill mid-write leaves
    r = subprocess.run(args, capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    for name in ("kept.jsonl", "rej.jsonl"):
        assert (crash / name).read_bytes() == (clean / name).read_bytes()
    rep = json.loads((crash / "report.json").read_text())
    assert rep["resumed_rows"] >= 5 and rep["rows_in"] == 40
    assert rep["generations_judged_now"] == 3 * (40 - rep["resumed_rows"])
    assert not journal.exists()
    ids = [row["id"] for row in read_jsonl(crash / "kept.jsonl")]
    assert len(ids) == len(set(ids))


def test_journal_of_another_input_is_not_reused(tmp_path):
    src = write_jsonl(tmp_path / "g.jsonl", generate_style_rows())
    dst = tmp_path / "k.jsonl"
    jp = journal_path(dst)
    jp.write_text(json.dumps({"journal": 1, "src": "elsewhere"}) + "\n" +
                  json.dumps({"line": 1, "v": [[True, "correct", "x", True]] * 3}) + "\n")
    rep = run_reject(RejectConfig(src=str(src), dst=str(dst), workers=0, progress=False))
    assert rep["resumed_rows"] == 0
    assert read_jsonl(dst)[0]["correctness_math_verify"] == [False, True, True]


def test_choice_kind(tmp_path):
    rows = [{"question": "Which?", "answer": "C", "generations": [R1("Answer: B"), R1(r"So $\\boxed{C}$.")]}]
    src = write_jsonl(tmp_path / "gpqa.jsonl", rows)
    rep = run_reject(RejectConfig(src=str(src), dst=str(tmp_path / "k.jsonl"), kind="choice",
                                  prompt_column="question", workers=1, progress=False))
    (row,) = read_jsonl(tmp_path / "k.jsonl")
    assert row["correctness_math_verify"] == [False, True] and row["kept_generation_index"] == 1
    assert rep["rejections_by_reason"]["wrong_answer"] == 1


def test_distill_help_lists_reject_without_heavy_imports():
    code = ("import sys, argparse, distilled.generate.reject as r, distilled.verify; "
            "r.register_cli(argparse.ArgumentParser().add_subparsers()); "
            "print(sorted(m for m in ('math_verify', 'sympy', 'torch', 'mindspore') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and r.stdout.strip().endswith("[]"), r.stdout + r.stderr
    r = subprocess.run(DISTILL + ["reject", "--help"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and "--keep {first,shortest,all}" in r.stdout


def test_cli_flags_reach_the_run(tmp_path, capsys):
    """Every `distill reject` flag lands in the config the run uses (the report echoes it)."""
    from distilled.cli import main
    from distilled.verify import verify_workers_default

    rows = [{"q": "x?", "gold": "5", "gens": [R1(r"$\boxed{5}$"), R1(r"$\boxed{5}$")], "why": ["stop", "length"]},
            {"q": "y?", "gold": "2", "gens": [R1(r"$\boxed{3}$")], "why": ["stop"]}]
    src = write_jsonl(tmp_path / "g.jsonl", rows)
    out = {k: str(tmp_path / f"{k}.json{'l' if k != 'report' else ''}") for k in ("kept", "rej", "report")}
    assert main(["reject", "--src", str(src), "--dst", out["kept"], "--rejected", out["rej"], "--report", out["report"],
                 "--answer-column", "gold", "--generations-column", "gens", "--finish-reasons-column", "why",
                 "--prompt-column", "q", "--keep", "all", "--kind", "math", "--workers", "0", "--timeout", "3",
                 "--strict", "--no-progress"]) == 0
    rep = json.loads(Path(out["report"]).read_text())
    assert (rep["keep"], rep["kind"], rep["workers"], rep["timeout_s"], rep["rejected"]) == ("all", "math", 0, 3.0,
                                                                                              out["rej"])
    (kept,) = read_jsonl(out["kept"])  # generation 1 ended by length: only generation 0 is kept
    assert kept["messages"][0]["content"] == "x?" and kept["correctness_math_verify"] == [True, False]
    assert read_jsonl(out["rej"])[0]["q"] == "y?"
    assert "reject: 2 rows (3 generations)" in capsys.readouterr().out
    # without --workers: the CLI default is the machine's cores (the library's is 2)
    assert main(["reject", "--src", str(src), "--dst", out["kept"], "--report", out["report"],
                 "--answer-column", "gold", "--generations-column", "gens", "--finish-reasons-column", "why",
                 "--no-progress"]) == 0
    assert json.loads(Path(out["report"]).read_text())["workers"] == verify_workers_default()
