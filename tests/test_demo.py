"""The demo at reduced size: every stage is the real command; the artifacts must agree.

Checks that row counts add up across stages and that report.json / report.md carry the numbers
found in the stages' own outputs (reject report, packed dataset, loss.jsonl, parity.json, eval
samples), and that a rerun skips finished stages.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "run"
    cmd = [sys.executable, "-m", "distilled", "demo", "--output", str(out), "--n-train", "40", "--n-test", "8",
           "--epochs", "1", "--parity-steps", "2", "--eval-max-tokens", "48", "--num-generations", "2"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out


@pytest.mark.slow
def test_demo_artifacts_exist(demo_dir: Path) -> None:
    for rel in ("data/train.jsonl", "data/test.jsonl", "data/generations.jsonl", "data/verified.jsonl",
                "data/reject_report.json", "tokenizer/tokenizer.json", "data/packed/dataset_info.json",
                "student-init/model.safetensors", "student-final/model.safetensors", "finetune/loss.jsonl",
                "parity/parity.json", "parity/parity.md", "eval-before/results.json", "eval-after/results.json",
                "report.json", "report.md", "lengths.png", "loss.png"):
        assert (demo_dir / rel).exists(), rel


@pytest.mark.slow
def test_demo_counts_add_up(demo_dir: Path) -> None:
    import datasets

    report = json.loads((demo_dir / "report.json").read_text())
    train = _lines(demo_dir / "data" / "train.jsonl")
    gens = _lines(demo_dir / "data" / "generations.jsonl")
    verified = _lines(demo_dir / "data" / "verified.jsonl")
    rej = json.loads((demo_dir / "data" / "reject_report.json").read_text())
    assert len(train) == 40
    assert len(gens) == len(train)  # the stand-in teacher never fails without injected faults
    assert all(len(g["generations"]) == 2 for g in gens)
    assert rej["rows_in"] == len(gens) and rej["generations_in"] == 2 * len(gens)
    # --keep all: one verified row per correct generation
    assert len(verified) == rej["rows_written"] == rej["generations_correct"]
    assert rej["generations_correct"] + sum(rej["rejections_by_reason"].values()) == rej["generations_in"]

    handled = datasets.load_from_disk(str(demo_dir / "data" / "handled"))
    packed = datasets.load_from_disk(str(demo_dir / "data" / "packed"))
    pack_report = json.loads((demo_dir / "data" / "packed" / "report.json").read_text())
    assert len(handled) == len(verified)
    docs = sum(len(r) for r in packed["actual_seq_len"])
    dropped = pack_report.get("stats", pack_report).get("dropped_overlong", 0) if isinstance(pack_report, dict) else 0
    assert docs + dropped == len(handled)
    assert report["packing"]["documents"] == docs and report["packing"]["packed_rows"] == len(packed)
    real = sum(r[-1] for r in packed["actual_seq_len"])
    assert report["packing"]["fill"] == pytest.approx(real / (len(packed) * report["packing"]["seq_length"]))

    losses = _lines(demo_dir / "finetune" / "loss.jsonl")
    assert report["finetune"]["steps"] == len(losses)
    assert report["finetune"]["first_loss"] == pytest.approx(losses[0]["loss"])
    assert report["finetune"]["last_loss"] == pytest.approx(losses[-1]["loss"])

    parity = json.loads((demo_dir / "parity" / "parity.json").read_text())
    assert report["parity"]["ok"] == parity["ok"]
    assert parity["ok"], parity["failures"]

    for key in ("before", "after"):
        samples = _lines(demo_dir / f"eval-{key}" / "samples.jsonl")
        e = report["eval"][key]
        assert e["samples"] == len(samples) == 8
        assert e["accuracy"] == pytest.approx(sum(s["correct"] for s in samples) / len(samples))
        assert e["answered"] == pytest.approx(sum(s["extracted"] is not None for s in samples) / len(samples))
        kinds = {t["id"]: t["kind"] for t in _lines(demo_dir / "data" / "test.jsonl")}
        for kind, c in e["by_kind"].items():
            mine = [s for s in samples if kinds[s["problem_id"]] == kind]
            assert c == {"correct": sum(bool(s["correct"]) for s in mine), "samples": len(mine)}, kind
        assert sum(c["samples"] for c in e["by_kind"].values()) == len(samples)

    md = (demo_dir / "report.md").read_text()
    assert f"{report['packing']['fill']:.2%}" in md
    assert f"{report['finetune']['last_loss']:.4f}" in md
    assert f"{report['eval']['after']['accuracy']:.1%}" in md
    for kind, c in report["eval"]["after"]["by_kind"].items():
        assert f"| {kind} | {report['eval']['before']['by_kind'][kind]['correct']} / {c['samples']} | " \
               f"{c['correct']} / {c['samples']} |" in md, kind
    yml = (demo_dir / "configs" / "finetune_qwen2_5_tiny_cpu.yaml").read_text()
    student = json.loads((demo_dir / "student-init" / "config.json").read_text())
    import yaml

    mc = yaml.safe_load(yml)["model"]["model_config"]
    assert (mc["hidden_size"], mc["num_layers"], mc["vocab_size"]) == \
        (student["hidden_size"], student["num_hidden_layers"], student["vocab_size"])
    for stage in report["stages"]:
        assert f"| {stage['name']} |" in md


@pytest.mark.slow
def test_demo_rerun_skips_finished_stages(demo_dir: Path) -> None:
    cmd = [sys.executable, "-m", "distilled", "demo", "--output", str(demo_dir), "--n-train", "40", "--n-test", "8",
           "--epochs", "1", "--parity-steps", "2", "--eval-max-tokens", "48", "--num-generations", "2"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("skipping") >= 9


def test_eval_summary_reads_pass_at_1_as_a_percentage(tmp_path: Path) -> None:
    """1 correct answer in 100 is pass@1 1.0 (percent) in results.json: 1% accuracy, not 100%."""
    from distilled.demo.report import eval_summary

    kinds = ["arithmetic", "linear"] * 50
    (tmp_path / "test.jsonl").write_text("".join(json.dumps({"id": f"p{i}", "kind": k}) + "\n"
                                                 for i, k in enumerate(kinds)))
    (tmp_path / "results.json").write_text(json.dumps(
        {"model": "m", "tasks": {"synth": {"problems": 100, "pass@1": 1.0}}}))
    (tmp_path / "samples.jsonl").write_text("".join(
        json.dumps({"problem_id": f"p{i}", "correct": i == 3, "extracted": "1" if i % 2 else None,
                    "finish_reason": "stop", "completion_tokens": 10}) + "\n" for i in range(100)))
    s = eval_summary(tmp_path, tmp_path / "test.jsonl")
    assert s["accuracy"] == pytest.approx(0.01)
    assert s["answered"] == pytest.approx(0.5)
    assert s["by_kind"] == {"arithmetic": {"correct": 0, "samples": 50}, "linear": {"correct": 1, "samples": 50}}
