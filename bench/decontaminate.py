"""Benchmark: hashed batch decontamination vs the naive pairwise check (and open-r1's per-row
n-gram-string lookup), same data, one run.

    .venv/bin/python bench/decontaminate.py [--rows 200000] [--sample 2000] [--data-dir DIR]

Benchmarks: the real MATH-500 + AIME24 + AIME25 files when --data-dir (default
../shared/data/benchmarks) has them, else synthetic stand-ins. Training rows are synthetic math
problems built from benchmark-vocabulary fragments (so most words are "known" and the unknown-word
skip does not get an easy ride), log-normal length (median ~50 words), with 0.1% planted
benchmark problems. The naive pairwise version runs on a sample and is extrapolated linearly
(it is O(rows x benchmark problems)); ours and open-r1's lookup run on all rows. Hits are
checked equal on the sample. Finally the whole CLI path (JSONL in -> JSONL out + report) is
timed on the same rows.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from distilled.data.decontaminate import (  # noqa: E402
    Benchmark,
    Decontaminator,
    decontaminate_file,
    load_benchmarks,
    naive_contaminated,
    word_ngrams,
)


def synthetic_benchmarks(rng: random.Random) -> dict[str, Benchmark]:
    words = [f"w{i}" for i in range(3000)] + ["the", "of", "a", "is", "$x$", "find", "let", "and", "what"]
    out = {}
    for name, n in (("math_500", 500), ("aime24", 30), ("aime25", 30)):
        out[name] = Benchmark([" ".join(rng.choices(words, k=max(3, int(rng.lognormvariate(3.3, 0.5))))) for _ in range(n)])
    return out


def make_rows(bench: dict[str, Benchmark], n: int, rng: random.Random) -> tuple[list[str], int]:
    frags = []
    for probs in bench.values():
        for p in probs:
            w = p.split()
            if len(w) < 8:
                continue  # a short problem's words as a fragment would be a planted copy of it
            for i in range(0, len(w), 4):
                frags.append(w[i : i + rng.randint(3, 6)])
    flat = [(name, i) for name, probs in bench.items() for i in range(len(probs))]
    texts, planted = [], 0
    for k in range(n):
        if rng.random() < 0.001:
            name, i = rng.choice(flat)
            texts.append("Solve: " + bench[name][i])
            planted += 1
            continue
        target = max(4, int(rng.lognormvariate(3.9, 0.6)))
        words: list[str] = []
        while len(words) < target:
            words += rng.choice(frags)
            words.append(str(rng.randint(0, 999)))  # breaks long accidental runs, like real problems' numbers
        texts.append(" ".join(words[:target]))
    return texts, planted


def openr1_lookup(texts: list[str], bench: dict[str, Benchmark], n: int) -> list[set[str]]:
    """open-r1's own algorithm: one n-gram-string lookup per benchmark, a Python set per row."""
    lookups = {name: {g for p in probs for g in word_ngrams(p, n)} for name, probs in bench.items()}
    out = []
    for t in texts:
        grams = set(word_ngrams(t, n))
        out.append({name for name, lk in lookups.items() if any(g in lk for g in grams)})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--sample", type=int, default=2_000)
    ap.add_argument("--ngram", type=int, default=8)
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "benchmarks"))
    args = ap.parse_args()
    rng = random.Random(0)
    try:
        bench = load_benchmarks("math_500,aime24,aime25", args.data_dir)
        source = args.data_dir
    except (OSError, ValueError):
        bench, source = synthetic_benchmarks(rng), "synthetic"
    texts, planted = make_rows(bench, args.rows, rng)
    nwords = sum(len(t.split()) for t in texts)
    print(f"benchmarks: {', '.join(f'{k} {len(v)}' for k, v in bench.items())} ({source}); "
          f"rows {len(texts):,} ({nwords / len(texts):.0f} words avg), planted {planted}, ngram {args.ngram}")

    sample = texts[: args.sample]
    t0 = time.perf_counter()
    naive = naive_contaminated(sample, bench, args.ngram)
    t_naive = time.perf_counter() - t0
    t0 = time.perf_counter()
    dec = Decontaminator(bench, ngram=args.ngram, short="ignore")
    t_index = time.perf_counter() - t0
    ours_sample = dec.find(sample)
    assert [{(h.benchmark, h.benchmark_index) for h in hs} for hs in ours_sample] == naive, "hits differ from naive"

    t0 = time.perf_counter()
    ref = openr1_lookup(texts, bench, args.ngram)
    t_openr1 = time.perf_counter() - t0

    t0 = time.perf_counter()
    dec = Decontaminator(bench, ngram=args.ngram, short="ignore")
    found = []
    for i in range(0, len(texts), 4096):
        found += dec.find(texts[i : i + 4096])
    t_ours = time.perf_counter() - t0
    assert [{h.benchmark for h in hs} for hs in found] == ref, "hits differ from open-r1's lookup"
    dropped = sum(bool(h) for h in found)

    t0 = time.perf_counter()
    dec_c = Decontaminator(bench, ngram=args.ngram, short="contained")
    dropped_c = 0
    for i in range(0, len(texts), 4096):
        dropped_c += sum(bool(h) for h in dec_c.find(texts[i : i + 4096]))
    t_ours_c = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        inp, outp = Path(tmp) / "in.jsonl", Path(tmp) / "out.jsonl"
        with open(inp, "w") as f:
            for k, t in enumerate(texts):
                f.write(json.dumps({"uuid": f"r{k}", "problem": t, "answer": str(k % 97), "solution": "x" * 600}) + "\n")
        size_mb = inp.stat().st_size / 1e6
        t0 = time.perf_counter()
        rep = decontaminate_file(inp, outp, bench, ngram=args.ngram, progress=False)
        t_file = time.perf_counter() - t0

    scale = len(texts) / len(sample)
    naive_full = t_naive * scale
    print()
    print(f"| method | rows | seconds | rows/s |")
    print(f"|---|---|---|---|")
    print(f"| naive pairwise (open-r1 semantics, every row x every problem) | {len(sample):,} | {t_naive:.2f} | {len(sample) / t_naive:,.0f} |")
    print(f"| naive pairwise, extrapolated | {len(texts):,} | {naive_full:.1f} | {len(texts) / naive_full:,.0f} |")
    print(f"| open-r1 lookup (n-gram strings, set per row) | {len(texts):,} | {t_openr1:.2f} | {len(texts) / t_openr1:,.0f} |")
    print(f"| ours: hashed batches (short=ignore, index {t_index * 1000:.0f} ms) | {len(texts):,} | {t_ours:.2f} | {len(texts) / t_ours:,.0f} |")
    print(f"| ours: hashed batches (short=contained, default) | {len(texts):,} | {t_ours_c:.2f} | {len(texts) / t_ours_c:,.0f} |")
    print(f"| ours: CLI path, JSONL {size_mb:.0f} MB in -> out + report | {len(texts):,} | {t_file:.2f} | {len(texts) / t_file:,.0f} |")
    print()
    print(f"dropped: {dropped} (open-r1 rule, equal to open-r1's lookup), {dropped_c} with short=contained; "
          f"CLI kept {rep['rows_kept']:,}")
    print(f"ratio naive/ours: {naive_full / t_ours:.0f}x   open-r1 lookup/ours: {t_openr1 / t_ours:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
