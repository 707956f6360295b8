"""Decontamination: open-r1's n-gram semantics, exact hits, the fast index equals the pairwise
reference, and the file/CLI path counts every row it does not write."""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys

import pytest

from distilled.data.decontaminate import (
    Benchmark,
    Decontaminator,
    decontaminate_file,
    filter_rows,
    load_benchmarks,
    make_problem_getter,
    naive_contaminated,
    normalize_words,
    register_cli,
    word_ngrams,
)


# An independent restatement of open-r1 scripts/decontaminate.py (normalize_string, then
# word_ngrams on the normalised text, then set membership), so the module is not only compared
# with itself.
def _openr1_ngrams(text: str, n: int) -> set[str]:
    text = text.lower().strip()
    text = " ".join(text.split())
    words = text.split()
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def _openr1_contaminated(text: str, bench: list[str], n: int) -> bool:
    lookup = set().union(*(_openr1_ngrams(b, n) for b in bench)) if bench else set()
    return any(g in lookup for g in _openr1_ngrams(text, n))


def _hit_keys(found):
    return [{(h.benchmark, h.benchmark_index) for h in hs} for hs in found]


# --------------------------------------------------------------------------------------------
# semantics


def test_normalisation_matches_openr1():
    text = "  Find\tthe  SUM\n\nof $X$,\u00a0and   Then STOP. "
    assert normalize_words(text) == " ".join(text.lower().strip().split()).split()
    assert normalize_words(text) == ["find", "the", "sum", "of", "$x$,", "and", "then", "stop."]
    assert word_ngrams(text, 8) == ["find the sum of $x$, and then stop."]
    assert set(word_ngrams(text, 3)) == _openr1_ngrams(text, 3)


@pytest.mark.parametrize(
    "train, hit",
    [
        ("ONE two THREE four five six seven eight", True),  # case-insensitive
        ("one  two\tthree\nfour five   six seven eight", True),  # any whitespace run
        ("zero one two three four five six seven eight nine", True),  # embedded
        ("one two three four five six seven eight.", False),  # punctuation is part of the word
        ("one, two three four five six seven eight", False),
        ("one two three four five six seven", False),  # shorter than n
        ("one two three four five six seven nine", False),  # 7 shared words, one differs
        ("onetwo three four five six seven eight", False),  # word boundaries matter
    ],
)
def test_ngram_rule(train, hit):
    bench = {"b": ["One two three four five six seven eight"]}
    found = Decontaminator(bench, ngram=8).find([train])
    assert bool(found[0]) is hit
    assert _openr1_contaminated(train, bench["b"], 8) is hit


def test_no_false_positive_below_n():
    bench_words = [f"w{i}" for i in range(30)]
    bench = {"b": [" ".join(bench_words)]}
    for n in (3, 5, 8, 13):
        dec = Decontaminator(bench, ngram=n)
        # every (n-1)-window of the benchmark, separated by a word it never uses
        sub = [" ".join(bench_words[i : i + n - 1]) for i in range(0, 30 - n + 2, n - 1)]
        near = " XX ".join(sub)
        assert dec.find([near]) == [[]], n
        exact = " ".join(bench_words[4 : 4 + n])
        (h,) = dec.find([exact])[0]
        assert h.ngram == exact and h.shared_ngrams == 1


def test_hit_reports_benchmark_id_ngram_and_count(tmp_path):
    (tmp_path / "math500.jsonl").write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"problem": "What is the smallest positive integer n such that n squared ends in 444?", "unique_id": "test/nt/1.json"},
                {"problem": "Compute the area of a triangle with sides 13, 14 and 15 units long.", "unique_id": "test/geo/7.json"},
            ]
        )
        + "\n"
    )
    bench = load_benchmarks("math500", tmp_path)
    assert list(bench) == ["math_500"] and bench["math_500"].ids == ["test/nt/1.json", "test/geo/7.json"]
    rows = [
        {"problem": "Warm-up. Compute the area of a triangle with sides 13, 14 and 15 units long. Then..."},
        {"problem": "A clean problem that shares nothing with any benchmark at all, honestly."},
    ]
    kept, hits = filter_rows(rows, bench)
    assert kept == [rows[1]]
    (h,) = hits
    assert (h.row, h.benchmark, h.benchmark_index, h.benchmark_id) == (0, "math_500", 1, "test/geo/7.json")
    assert h.ngram == "compute the area of a triangle with sides"
    assert h.shared_ngrams == 7  # the 14-word problem has 7 eight-grams, all inside the row
    assert h.rule == "ngram"


def test_every_benchmark_problem_hit_is_reported():
    shared = "alpha beta gamma delta epsilon zeta eta theta"
    bench = {
        "a": ["nothing here to see at all in this one", f"{shared} iota", "x " + shared],
        "b": [f"kappa {shared}"],
    }
    (hits,) = Decontaminator(bench).find([f"pre {shared} post"])
    assert [(h.benchmark, h.benchmark_index) for h in hits] == [("a", 1), ("a", 2), ("b", 0)]
    assert all(h.ngram == shared for h in hits)


def test_training_rows_shorter_than_n():
    bench = {"b": ["one two three four five six seven eight nine ten"]}
    dec = Decontaminator(bench, ngram=8)
    assert dec.find(["one two three", "", "   ", None, "one two three four five six seven"]) == [[]] * 5


@pytest.mark.parametrize(
    "mode, expect",
    [("contained", [True, True, False]), ("exact", [True, False, False]), ("ignore", [False, False, False])],
)
def test_short_benchmark_problems(mode, expect):
    bench = {"m": ["Simplify $\\sqrt{242}$."]}  # 2 words: open-r1 can never match it
    dec = Decontaminator(bench, ngram=8, short=mode)
    texts = ["SIMPLIFY  $\\sqrt{242}$.", "First, simplify $\\sqrt{242}$. Then add one.", "Simplify $\\sqrt{243}$."]
    found = dec.find(texts)
    assert [bool(h) for h in found] == expect
    for hs in found:
        for h in hs:
            assert h.rule == "short" and h.ngram == "simplify $\\sqrt{242}$."
    assert dec.stats["m"]["short_problems"] == 1


def test_hash_collisions_never_drop_a_row():
    """Fill the bitmap prefilter: every window is a hash candidate, exact confirmation decides."""
    rng = random.Random(1)
    vocab = [f"t{i}" for i in range(20)]
    bench = {"b": [" ".join(rng.choices(vocab, k=30)) for _ in range(5)]}
    texts = [" ".join(rng.choices(vocab, k=rng.randint(0, 40))) for _ in range(200)]
    dec = Decontaminator(bench, ngram=4)
    for bitmap, _ in dec._bitmaps.values():
        bitmap[:] = True
    assert _hit_keys(dec.find(texts)) == naive_contaminated(texts, bench, 4)


# --------------------------------------------------------------------------------------------
# equivalence with the pairwise reference


@pytest.mark.parametrize("seed", range(4))
def test_fast_equals_naive_on_random_data(seed):
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(12)] + ["The", "the", "THE", "x.", "x"]  # small: many matches
    n = rng.choice([2, 3, 4, 5])

    def text(k):
        sep = rng.choice([" ", "  ", "\n", "\t "])
        return sep.join(rng.choices(vocab, k=k))

    bench = {f"b{j}": [text(rng.randint(0, 12)) for _ in range(rng.randint(1, 15))] for j in range(3)}
    texts = [text(rng.randint(0, 14)) for _ in range(300)] + [None]
    naive = naive_contaminated(texts, bench, n)
    dec = Decontaminator(bench, ngram=n, short="ignore")
    for batch in (7, 1000):  # batch boundaries must not create windows across rows
        found = []
        for i in range(0, len(texts), batch):
            found += dec.find(texts[i : i + batch])
        assert _hit_keys(found) == naive
    # and the independent open-r1 restatement agrees per benchmark
    for t, keys in zip(texts[:-1], naive):
        for name, problems in bench.items():
            assert _openr1_contaminated(t, problems, n) == any(k[0] == name for k in keys)
    # the shared n-gram counts are right too
    for t, hs in zip(texts, dec.find(texts)):
        for h in hs:
            shared = _openr1_ngrams(t, n) & _openr1_ngrams(bench[h.benchmark][h.benchmark_index], n)
            assert h.shared_ngrams == len(shared) and h.ngram in shared


# --------------------------------------------------------------------------------------------
# rows and files


def test_problem_getter_formats():
    get = make_problem_getter("problem")
    assert get({"problem": "p", "messages": [{"role": "user", "content": "m"}]}) == "p"
    assert get({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u1"}, {"role": "user", "content": "u2"}]}) == "u1"
    assert get({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}) == "a\nb"
    assert get({"conversations": [{"from": "user", "value": "stratos"}, {"from": "assistant", "value": "x"}]}) == "stratos"
    assert get({"instruction": "magpie", "response": "r"}) == "magpie"
    assert get({"problem": 3}) is None
    assert get({"messages": [{"role": "assistant", "content": "a"}]}) is None
    assert make_problem_getter("question")({"question": "q"}) == "q"


def test_filter_rows_messages_style_and_missing():
    bench = {"b": ["every morning aya goes for a walk and stops at a coffee shop"]}
    rows = [
        {"messages": [{"role": "system", "content": "Reason."}, {"role": "user", "content": "Every morning Aya goes for a walk and stops"}]},
        {"messages": [{"role": "user", "content": "Every evening Aya goes for a walk"}]},
        {"other": 1},
    ]
    with pytest.raises(ValueError, match="row 2"):
        filter_rows(rows, bench)
    kept, hits = filter_rows(rows, bench, on_missing="keep")
    assert kept == rows[1:] and [h.row for h in hits] == [0]
    kept, _ = filter_rows(rows, bench, on_missing="drop", batch_size=1)
    assert kept == [rows[1]]


def _write_jsonl(path, lines):
    path.write_bytes(b"".join(lines))


def test_file_jsonl_keeps_bytes_and_counts_bad_lines(tmp_path):
    bench = {"aime24": Benchmark(["Find the number of ordered pairs of integers such that x plus y equals ten"], ids=["2024-I-1"])}
    clean = b'{"id": 1, "problem": "Totally unrelated question about prime numbers here please", "x": 1.50, "z": [1e5]}\n'
    lines = [
        clean,
        b'{"uuid": "u2", "problem": "find the number of ordered pairs of integers such that x"}\n',
        b"\n",
        b'{"problem": "truncated\n',
        b"[1, 2]\n",
        b'{"answer": "no problem field"}\n',
        b'{"problem": ["not", "text"]}\n',
        b'{"problem": "caf\xe9 latin-1 bytes"}\n',
        b'{"messages": [{"role": "user", "content": "Totally unrelated question about prime numbers"}]}',  # no final newline
    ]
    _write_jsonl(tmp_path / "in.jsonl", lines)
    rep = decontaminate_file(tmp_path / "in.jsonl", tmp_path / "out.jsonl", bench, progress=False)
    out = (tmp_path / "out.jsonl").read_bytes()
    assert out == clean + lines[-1] + b"\n"  # kept rows byte for byte
    assert rep["rows_read"] == 8 and rep["rows_kept"] == 2
    assert rep["rows_dropped_contaminated"] == 1 and rep["rows_dropped_bad"] == 5
    assert rep["rows_read"] == rep["rows_kept"] + rep["rows_dropped_contaminated"] + rep["rows_dropped_bad"]
    assert [b["line"] for b in rep["malformed_lines"]] == [4, 5, 8]
    assert rep["malformed_lines"][2]["reason"] == "invalid UTF-8 at byte offset 16"
    assert [b["line"] for b in rep["missing_problem"]] == [6, 7]
    assert "'problem' is list" in rep["missing_problem"][1]["reason"]
    (h,) = rep["hits"]
    assert (h["line"], h["row_id"], h["benchmark"], h["benchmark_id"]) == (2, "u2", "aime24", "2024-I-1")
    assert rep["dropped_by_benchmark"] == {"aime24": 1}


def test_file_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"problem": f"problem number {i} about counting sheep in the field today", "k": i} for i in range(50)]
    rows[17]["problem"] = "Intro: count the sheep that graze in the big green field at noon."
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet", row_group_size=8)
    bench = {"b": ["Count the sheep that graze in the big green field"]}
    rep = decontaminate_file(tmp_path / "in.parquet", tmp_path / "out.parquet", bench, batch_size=10, progress=False)
    out = pq.read_table(tmp_path / "out.parquet")
    assert out.schema == pq.read_schema(tmp_path / "in.parquet")
    assert out.column("k").to_pylist() == [i for i in range(50) if i != 17]
    assert [h["row"] for h in rep["hits"]] == [17] and rep["rows_kept"] == 49


def test_file_rejects_mismatched_output(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"problem": "x"}\n')
    with pytest.raises(ValueError, match="same type"):
        decontaminate_file(tmp_path / "in.jsonl", tmp_path / "out.parquet", {"b": ["y"]}, progress=False)


def test_load_benchmarks_errors_and_custom(tmp_path):
    with pytest.raises(FileNotFoundError, match="aime25.jsonl"):
        load_benchmarks(["aime25"], tmp_path)
    with pytest.raises(ValueError, match="unknown benchmark"):
        load_benchmarks("mmlu", tmp_path)
    (tmp_path / "gpqa_diamond.jsonl").write_text(json.dumps({"Question": "Which gas is inert?", "Record ID": "rec1"}) + "\n")
    (tmp_path / "mine.jsonl").write_text(json.dumps({"question": "q one"}) + "\n" + json.dumps({"question": "q two"}) + "\n")
    (tmp_path / "bad.jsonl").write_text('{"problem": "ok"}\n{oops\n')
    b = load_benchmarks("gpqa, mine=" + str(tmp_path / "mine.jsonl"), tmp_path)
    assert list(b) == ["gpqa_diamond", "mine"]
    assert b["gpqa_diamond"] == ["Which gas is inert?"] and b["gpqa_diamond"].ids == ["rec1"]
    assert b["mine"].ids == ["0", "1"]
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        load_benchmarks("bad=" + str(tmp_path / "bad.jsonl"))


def _run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="distill")
    register_cli(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_end_to_end(tmp_path, capsys):
    data = tmp_path / "bench"
    data.mkdir()
    for name, probs in {
        "math500": ["Evaluate $\\log_264$.", "How many vertical asymptotes does the graph of $y=\\frac{2}{x^2+x-6}$ have?"],
        "aime24": ["Find the largest prime factor of the number of positive divisors of 2024 squared."],
    }.items():
        (data / f"{name}.jsonl").write_text("".join(json.dumps({"problem": p}) + "\n" for p in probs))
    rows = [
        {"problem": "how many vertical asymptotes does the graph of $y=\\frac{2}{x^2+x-6}$ have? explain"},
        {"problem": "evaluate $\\log_264$."},
        {"problem": "Find the largest prime factor of 91."},
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    argv = ["decontaminate", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
            "--against", "math_500,aime24", "--data-dir", str(data), "--report", str(tmp_path / "r.json"), "--quiet"]
    assert _run_cli(argv) == 0
    out = capsys.readouterr()
    assert "read 4 rows, kept 1, dropped 2 contaminated" in out.out and "line 4: invalid JSON" in out.err
    rep = json.loads((tmp_path / "r.json").read_text())
    assert [(h["line"], h["benchmark"], h["benchmark_index"], h["rule"]) for h in rep["hits"]] == [
        (1, "math_500", 1, "ngram"), (2, "math_500", 0, "short")]
    assert [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()] == [rows[2]]
    assert _run_cli(argv + ["--strict"]) == 1
    assert _run_cli(argv + ["--short", "ignore"]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["rows_kept"] == 2
    bad = argv.copy()
    bad[bad.index("math_500,aime24")] = "math_500,aime25"
    assert _run_cli(bad) == 2
    assert "aime25.jsonl does not exist" in capsys.readouterr().err


def test_real_benchmarks_planted(shared_dir):
    """The real MATH-500/AIME files: planted benchmark problems are found with the right index."""
    bench = load_benchmarks("math_500,aime24,aime25", shared_dir / "data" / "benchmarks")
    assert [len(b) for b in bench.values()] == [500, 30, 30]
    rng = random.Random(0)
    rows = [{"problem": f"Let $n$ be the {i}-th integer such that n plus {i} is a perfect square; find n."} for i in range(300)]
    planted = {}
    for pos, (name, idx) in zip(rng.sample(range(300), 6), [("math_500", 0), ("math_500", 499), ("aime24", 5), ("aime25", 29), ("math_500", 20), ("aime24", 0)]):
        rows[pos] = {"problem": "  " + bench[name][idx].upper() + "  "}
        planted[pos] = (name, idx)
    kept, hits = filter_rows(rows, bench)
    assert len(kept) == 300 - 6
    assert {h.row: (h.benchmark, h.benchmark_index) for h in hits if (h.benchmark, h.benchmark_index) == planted[h.row]} == planted


def test_module_import_stays_light():
    code = ("import sys, distilled.data.decontaminate; "
            "bad = [m for m in ('torch', 'mindspore', 'mindformers', 'transformers', 'datasets') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_file_rejects_json_array_and_empty_index(tmp_path):
    (tmp_path / "in.json").write_text('[{"problem": "a b c"}]\n')
    with pytest.raises(ValueError, match="JSON array"):
        decontaminate_file(tmp_path / "in.json", tmp_path / "out.json", {"b": ["a b c"]}, progress=False)
    # benchmarks whose problems are all too short under short="ignore": nothing can match, nothing breaks
    dec = Decontaminator({"b": ["two words"]}, ngram=8, short="ignore")
    assert dec.find(["two words", None]) == [[], []] and dec.last_word_counts.tolist() == [2, 0]


def test_index_survives_pickling_into_another_hash_salt(tmp_path):
    """datasets.map(num_proc=...) and spawn pools pickle the index into processes whose str
    hash salt differs; the index must notice and rebuild, not silently miss every hit."""
    import os
    import pickle

    dec = Decontaminator({"b": ["one two three four five six seven eight nine"]}, ngram=8)
    (tmp_path / "dec.pkl").write_bytes(pickle.dumps(dec))
    code = (
        "import pickle, sys; dec = pickle.load(open(sys.argv[1], 'rb')); "
        "hits = dec.find(['zero one two three four five six seven eight', 'one two three']); "
        "print([len(h) for h in hits])"
    )
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "dec.pkl")], capture_output=True, text=True, env=env)
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == "[1, 0]"
