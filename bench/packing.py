"""Packing benchmark: MindFormers 1.9 ``PackingHandler`` vs our ``BFDPackingHandler``, side by side.

Same synthetic OpenR1-like data for both (log-normal lengths, median ~3k tokens, clipped to
[64, 16384]; random token ids of those lengths in an Arrow-backed ``datasets.Dataset``, as a
handled dataset would be). Each (method, seq_length) runs in a fresh spawned process so its peak
resident memory is its own. MindFormers' handler runs its real code (``PackingHandler(...)(dataset)``:
Python loop + ``Dataset.from_dict``) exactly as ``HFDataLoader`` calls it.

    python bench/packing.py                      # 10k samples, seq 16384 and 4096
    python bench/packing.py --samples 2000       # quick
    python bench/packing.py --mf-samples 3000    # MindFormers on a prefix only (it is slow/huge)

Prints a markdown table and the ratios (fill, speed). The functions are reusable
(``synthetic_lengths``, ``synthetic_dataset``, ``measure``, ``run_mindformers``, ``run_bfd``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

ANCHOR = "measured here: MindFormers PackingHandler 83.1% @16384, 73.7% @4096, 2.4M tok/s"


def synthetic_lengths(n: int, seed: int = 0, median: float = 3000.0, sigma: float = 0.68,
                      lo: int = 64, hi: int = 16384) -> np.ndarray:
    """OpenR1-like sample lengths: log-normal (median ~3k; sigma 0.68 gives the ~3.8k mean of
    the anchor's 74.6M tokens / 19,771 samples), clipped to [lo, hi]."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(median), sigma, n), lo, hi).astype(np.int64)


def synthetic_table(lengths: np.ndarray, seed: int = 0, vocab: int = 151643):
    """Arrow table with random ``input_ids`` of the given lengths and chat-like ``labels``
    (a ~10% prompt untrained, the rest trained), list<int32>."""
    import pyarrow as pa

    rng = np.random.default_rng(seed + 1)
    total = int(lengths.sum())
    ids = rng.integers(0, vocab, total, dtype=np.int32)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    labels = ids.copy()
    prompt = (lengths // 10).astype(np.int64)
    idx = np.repeat(offsets[:-1] - (np.cumsum(prompt) - prompt), prompt) + np.arange(int(prompt.sum()))
    labels[idx] = -100
    off = pa.array(offsets.astype(np.int32))
    return pa.table({
        "input_ids": pa.ListArray.from_arrays(off, pa.array(ids)),
        "labels": pa.ListArray.from_arrays(off, pa.array(labels)),
    })


def synthetic_dataset(n: int, seed: int = 0):
    """``datasets.Dataset`` over :func:`synthetic_table` (in-memory Arrow)."""
    import datasets

    # explicit fingerprint: otherwise `datasets` hashes (serialises) the whole table
    return datasets.Dataset(synthetic_table(synthetic_lengths(n, seed), seed),
                            fingerprint=f"synthetic-openr1-{n}-{seed}")


def _quiet() -> None:
    """No progress bars or INFO logs in the measured child processes (set before imports)."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("GLOG_v", "3")


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux: ``echo 5 > /proc/self/clear_refs``), so the peak
    measured next belongs to the code under test, not to building its input."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _fill_from_packed(table, seq_length: int) -> tuple[int, int]:
    """(rows, real tokens) of a packed table, from actual_seq_len's last element per row."""
    import pyarrow.compute as pc

    col = table.column("actual_seq_len").combine_chunks()
    lens = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    flat = col.flatten().to_numpy(zero_copy_only=False)
    last = flat[np.cumsum(lens) - 1]
    return len(col), int(last.sum())


def run_mindformers(n: int, seq_length: int, seed: int = 0) -> dict:
    """MindFormers' PackingHandler (pack mode) on the synthetic dataset; runs in this process."""
    _quiet()
    from mindformers.dataset.handler.packing_handler import PackingHandler

    handler = PackingHandler(seq_length=seq_length, pack_strategy="pack", pad_token_id=151643)
    res, _ = _run_handler("mindformers PackingHandler", handler, n, seq_length, seed)
    return res


def run_bfd(n: int, seq_length: int, seed: int = 0) -> dict:
    """Our BFDPackingHandler on the synthetic dataset; runs in this process."""
    _quiet()
    from handlers.bfd_packing import BFDPackingHandler

    handler = BFDPackingHandler(seq_length=seq_length, pad_token=151643)
    res, out = _run_handler("distilled BFDPackingHandler", handler, n, seq_length, seed)
    assert res["tokens"] == handler.stats.tokens and res["rows"] == handler.stats.rows
    return res | {"output_mb": out.data.table.nbytes / 2**20}


def _run_handler(method: str, handler, n: int, seq_length: int, seed: int) -> tuple[dict, object]:
    """Time one packing handler on the synthetic dataset; figures and the packed dataset."""
    ds = synthetic_dataset(n, seed)
    tokens_in = int(synthetic_lengths(n, seed).sum())
    _reset_peak()
    base = _rss_kb("VmRSS")
    t = time.perf_counter()
    out = handler(ds)
    elapsed = time.perf_counter() - t
    rows, tokens = _fill_from_packed(out.data.table, seq_length)
    return ({"method": method, "samples": n, "seq_length": seq_length,
             "tokens_in": tokens_in, "tokens": tokens, "rows": rows, "fill": tokens / (rows * seq_length),
             "elapsed_s": elapsed, "tok_per_s": tokens / elapsed,
             "peak_extra_mb": (_rss_kb("VmHWM") - base) / 1024}, out)


def measure(fn, *args) -> dict:
    """Run ``fn(*args)`` in a fresh spawned process (own peak memory) and return its dict."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as ex:
        return ex.submit(fn, *args).result()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=10_000, help="samples for our packer (default 10000)")
    p.add_argument("--mf-samples", type=int, default=None,
                   help="samples for MindFormers' PackingHandler (default: --samples; it needs ~0.4 GB "
                        "of RAM per 1k samples)")
    p.add_argument("--seq-lengths", default="16384,4096")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here as JSON")
    args = p.parse_args(argv)
    mf_n = args.mf_samples or args.samples
    seqs = [int(s) for s in args.seq_lengths.split(",")]

    results = []
    for S in seqs:
        mf = measure(run_mindformers, mf_n, S, args.seed)
        ours = measure(run_bfd, args.samples, S, args.seed)
        same = ours if mf_n == args.samples else measure(run_bfd, mf_n, S, args.seed)
        results.append({"seq_length": S, "mindformers": mf, "bfd": ours, "bfd_same_samples": same})
        print(f"seq {S}: MF fill {mf['fill']:.2%} {mf['tok_per_s'] / 1e6:.2f}M tok/s | "
              f"BFD fill {ours['fill']:.2%} {ours['tok_per_s'] / 1e6:.1f}M tok/s", flush=True)

    print()
    print("| seq_length | method | samples | tokens | rows | fill | time s | M tok/s | peak extra MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        rows = [r["mindformers"], r["bfd"]] + ([r["bfd_same_samples"]] if mf_n != args.samples else [])
        for m in rows:
            print(f"| {r['seq_length']} | {m['method']} | {m['samples']} | {m['tokens']:,} | {m['rows']} | "
                  f"{m['fill']:.2%} | {m['elapsed_s']:.2f} | {m['tok_per_s'] / 1e6:.2f} | "
                  f"{m['peak_extra_mb']:.0f} |")
    print()
    for r in results:
        mf, same = r["mindformers"], r["bfd_same_samples"]
        print(f"seq {r['seq_length']}: fill {same['fill']:.2%} vs {mf['fill']:.2%} "
              f"(+{(same['fill'] - mf['fill']) * 100:.1f} points), speed x{same['tok_per_s'] / mf['tok_per_s']:.1f}, "
              f"peak memory x{mf['peak_extra_mb'] / max(same['peak_extra_mb'], 1):.1f} less "
              f"(same {mf_n} samples)")
    print(f"anchor: {ANCHOR}")
    if args.json:
        from distilled.io_utils import write_json

        write_json(args.json, {"samples": args.samples, "mf_samples": mf_n, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
