"""``runs/demo/report.md`` (and ``report.json``, which it is rendered from) for ``distill demo``.

Why JSON first: the demo's CI test checks that the report's numbers are the numbers in the
stages' own outputs (reject report, packed dataset, loss.jsonl, parity.json, eval results), so
every figure here is read from those files, never recomputed differently.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from distilled.io_utils import atomic_write, iter_jsonl, write_json
from distilled.plots import histogram, line_plot, md_table

STAGES = ("problems", "tokenizer", "generate", "reject", "preprocess", "student", "eval-before", "finetune",
          "parity", "eval-after")
"""The stage table's order (``Demo.run_all``); with ``--kd`` the tokenizer stage runs before generate."""


def read_run(out_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The demo's settings (``demo_settings.json``) and its stage results (``stages/NAME.json``), in run
    order. Why from disk: the report is a recipe over the stages' outputs, so it can be rebuilt for
    a finished run without the orchestrator (``write_demo_report(Path("runs/demo"))``)."""
    settings = json.loads((out_dir / "demo_settings.json").read_text())
    order = list(STAGES)
    if settings.get("kd"):
        order.remove("tokenizer")
        order.insert(1, "tokenizer")
    stages = [json.loads((out_dir / "stages" / f"{n}.json").read_text()) for n in order
              if (out_dir / "stages" / f"{n}.json").exists()]
    return settings, stages


def eval_summary(run_dir: Path, problems: Path | None = None) -> dict[str, Any]:
    """Accuracy, share of outputs with a parsable ``\\boxed{}`` answer and truncation, from an
    eval run's ``results.json`` and ``samples.jsonl``; with ``problems`` (the test JSONL, which has a
    ``kind`` column) also the accuracy per problem kind, so a reader sees *what* the student learned."""
    res = json.loads((run_dir / "results.json").read_text())
    samples = [obj for _, obj in iter_jsonl(run_dir / "samples.jsonl") if isinstance(obj, dict)]
    n = len(samples)
    task = next(iter(res["tasks"].values()))
    by_kind: dict[str, list[int]] = {}
    if problems is not None:
        kinds = {obj["id"]: obj.get("kind", "?") for _, obj in iter_jsonl(problems) if isinstance(obj, dict)}
        for s in samples:
            k = kinds.get(s.get("problem_id"), "?")
            by_kind.setdefault(k, [0, 0])
            by_kind[k][0] += bool(s.get("correct"))
            by_kind[k][1] += 1
    return {
        "by_kind": {k: {"correct": c, "samples": t} for k, (c, t) in sorted(by_kind.items())},
        "model": res["model"],
        "problems": task["problems"],
        "samples": n,
        # results.json's pass@1 is a percentage (``distill eval``), 1.0 included: 1 of 100 correct
        "accuracy": task["pass@1"] / 100.0,
        "pass@1_results_json": task["pass@1"],
        "answered": sum(1 for s in samples if s.get("extracted") is not None) / n if n else 0.0,
        "truncated": sum(1 for s in samples if s.get("finish_reason") == "length") / n if n else 0.0,
        "mean_output_tokens": sum(s.get("completion_tokens") or 0 for s in samples) / n if n else 0.0,
    }


def _generation_stats(path: Path) -> dict[str, Any]:
    rows = gens = tokens = 0
    finish: dict[str, int] = {}
    for _, obj in iter_jsonl(path):
        if not isinstance(obj, dict):
            continue
        rows += 1
        gens += len(obj.get("generations") or [])
        for fr in obj.get("finish_reasons") or []:
            finish[str(fr)] = finish.get(str(fr), 0) + 1
        for meta in obj.get("api_metadata") or []:
            usage = (meta or {}).get("usage", meta) or {}
            tokens += int(usage.get("completion_tokens") or 0)
    return {"problems": rows, "generations": gens, "completion_tokens": tokens,
            "mean_completion_tokens": tokens / gens if gens else 0.0, "finish_reasons": finish}


def _kind_cell(summary: dict[str, Any], kind: str) -> str:
    c = summary.get("by_kind", {}).get(kind)
    return f"{c['correct']} / {c['samples']}" if c else ""


def write_demo_report(out_dir: Path) -> Path:
    """Collect the stages' outputs under ``out_dir`` into ``report.json``, then render ``report.md`` and PNGs."""
    out = Path(out_dir)
    settings, results = read_run(out)
    cfg = SimpleNamespace(**settings)
    by = {r["name"]: SimpleNamespace(**r) for r in results}
    rej = json.loads((out / "data" / "reject_report.json").read_text())
    gen = _generation_stats(out / "data" / "generations.jsonl")
    pre = by["preprocess"].extra
    ft = by["finetune"].extra
    par = by["parity"].extra["parity"]
    before, after = by["eval-before"].extra, by["eval-after"].extra
    data = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": {"output": str(out), **settings},
        "stages": [{k: v for k, v in r.items() if k != "extra"} for r in results],
        "generation": gen,
        "rejection": {k: rej[k] for k in ("rows_in", "rows_kept", "rows_rejected", "rows_written", "generations_in",
                                           "generations_correct", "rejections_by_reason", "generations_per_s")},
        "packing": {k: pre[k] for k in ("handled", "documents", "packed_rows", "fill")}
        | {"seq_length": cfg.seq_length},
        "finetune": {"steps": len(ft["losses"]), "first_loss": ft["losses"][0][1], "last_loss": ft["losses"][-1][1],
                     "checkpoint": ft["checkpoint"]},
        "parity": {"ok": par["ok"], "failures": par["failures"],
                   "train": (par.get("train") or {}).get("summary"),
                   "packing": {k: {"ok": v["ok"], "max_rel_diff": v["max_rel_diff"]}
                               for k, v in (par.get("packing") or {}).items()}},
        "eval": {"before": before, "after": after},
    }
    write_json(out / "report.json", data)

    histogram(out / "lengths.png", pre["doc_lengths"], title=f"tokens per training sample (fill {pre['fill']:.1%})",
              xlabel="tokens", vline=cfg.seq_length)
    line_plot(out / "loss.png", {"MindSpore (msrun, rank 0)": ([s for s, _ in ft["losses"]], [l for _, l in ft["losses"]])},
              title="fine-tuning loss", xlabel="step", ylabel="loss")

    md = [
        "# distilled demo report", "",
        f"Created {data['created']}. Toy scale, CPU only, offline. The teacher is the built-in stand-in "
        "(`distill serve-teacher`), **not DeepSeek-R1**, and the student is a random-initialised "
        f"{cfg.num_layers}-layer, hidden-{cfg.hidden_size} Qwen2.5-architecture model "
        f"({cfg.vocab_size}-id trimmed vocabulary): the numbers show the pipeline working on toy "
        "arithmetic, not a useful model.", "",
        "## Stages", "",
        md_table(["stage", "rows in", "rows out", "time (s)", "throughput", "summary"],
                 [[r["name"], "" if r["rows_in"] is None else r["rows_in"], "" if r["rows_out"] is None else r["rows_out"],
                   f"{r['seconds']:.1f}", r["throughput"], r["summary"]] for r in data["stages"]]),
        "## Generation and rejection", "",
        md_table(["figure", "value"], [
            ["problems generated", gen["problems"]], ["generations", gen["generations"]],
            ["mean completion tokens", f"{gen['mean_completion_tokens']:.1f}"],
            ["finish reasons", ", ".join(f"{k} {v}" for k, v in sorted(gen["finish_reasons"].items()))],
            ["generations judged correct", f"{rej['generations_correct']} / {rej['generations_in']}"],
            ["problems kept (>= 1 correct)", f"{rej['rows_kept']} / {rej['rows_in']}"],
            ["verified rows written", rej["rows_written"]],
        ] + [[f"rejected: {k}", v] for k, v in rej["rejections_by_reason"].items() if v]),
        "## Packing", "",
        f"{pre['handled']} tokenized samples ({pre['documents']} documents) packed into {pre['packed_rows']} rows of "
        f"{cfg.seq_length} tokens with best-fit-decreasing: **{pre['fill']:.2%}** of all row tokens are real.", "",
        "![sample lengths](lengths.png)", "",
        "## Fine-tuning (MindFormers Trainer, msrun, CPU)", "",
        f"{data['finetune']['steps']} steps, loss {data['finetune']['first_loss']:.4f} -> "
        f"{data['finetune']['last_loss']:.4f}.", "",
        "![loss curve](loss.png)", "",
        "## Parity (MindSpore vs torch, same weights and batches)", "",
        f"**{'PASS' if par['ok'] else 'FAIL'}**. Full report: [parity/parity.md](parity/parity.md).", "",
    ]
    if data["parity"]["train"]:
        s = data["parity"]["train"]
        md.append(md_table(["check", "value"], [
            ["loss rel. diff, step 0", f"{s['loss_rel_diff_step0']:.2e}"],
            ["loss rel. diff, max", f"{s['loss_rel_diff_max']:.2e}"],
            ["grad-norm rel. diff, max", f"{s['grad_norm_rel_diff_max']:.2e}"],
            ["logits max-abs diff, step 0", f"{s['logits_max_abs_diff_step0']:.2e}"],
            ["parameter drift", f"{s['param_drift']['global_rel']:.2e}"],
        ] + [[f"packing check [{k}]", f"{'ok' if v['ok'] else 'FAIL'} ({v['max_rel_diff']:.2e})"]
             for k, v in data["parity"]["packing"].items()]))
    md += [
        "## Held-out synthetic problems, before and after fine-tuning", "",
        md_table(["model", "problems", "accuracy", "parsable \\boxed{} answer", "truncated", "mean output tokens"],
                 [[e["model"], e["problems"], f"{e['accuracy']:.1%}", f"{e['answered']:.1%}", f"{e['truncated']:.1%}",
                   f"{e['mean_output_tokens']:.0f}"] for e in (before, after)]),
        md_table(["problem kind", "before", "after"],
                 [[k, _kind_cell(before, k), _kind_cell(after, k)]
                  for k in sorted(set(before.get("by_kind", {})) | set(after.get("by_kind", {})))]),
        "Greedy decoding, one sample per problem, up to "
        f"{cfg.eval_max_tokens} new tokens, same prompt format as the training data (the bare problem "
        "after the MindSpore docs' system prompt).", "",
    ]
    with atomic_write(out / "report.md") as f:
        f.write("\n".join(md) + "\n")
    return out / "report.md"
