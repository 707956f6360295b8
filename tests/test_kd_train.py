"""KD after capture: `distill preprocess --kd-sidecar` adds the aligned columns, `distill train`
(torch) trains on the KD loss (alpha=1 is exactly SFT), `distill parity --check kd` holds the two
KD losses together, and the KD YAML trains through run_mindformer.py + msrun (2 CPU workers, graph
mode)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from distilled.kd.capture import Capture
from distilled.kd.logprobs import StudentVocab
from distilled.kd.standin import chat_logprobs_json, synth_top_logprobs

REPO = Path(__file__).resolve().parents[1]
KD_YAML = REPO / "configs" / "finetune_qwen2_5_tiny_cpu_kd.yaml"
K, S = 8, 128


@pytest.fixture(scope="module")
def kd_packed(tmp_path_factory, qwen_tokenizer, qwen_tokenizer_dir):
    """generations.jsonl-like answers + their sidecar -> verified rows -> distill preprocess --kd-sidecar."""
    from distilled.data.formats import FormatConfig
    from distilled.data.preprocess import PreprocessConfig, preprocess

    d = tmp_path_factory.mktemp("kd")
    vocab = StudentVocab(qwen_tokenizer)
    cap = Capture(d / "gens.jsonl", K, qwen_tokenizer, committed=[])
    rng = np.random.default_rng(0)
    rows = []
    for i in range(24):
        a, b = int(rng.integers(2, 50)), int(rng.integers(2, 50))
        ans = f"<think>\n{a} plus {b}: " + " ".join(f"{a}+{j}={a + j}." for j in range(int(rng.integers(2, 8)))) + \
            f"\n</think>\n\nThe answer is $\\boxed{{{a + b}}}$."
        ids = qwen_tokenizer.encode(ans, add_special_tokens=False) + [151645]
        cap.commit(f"p{i}", [cap.take(ans, chat_logprobs_json(synth_top_logprobs(ids, K, i, vocab), vocab), f"p{i}")])
        rows.append({"problem_key": f"p{i}", "messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                                                          {"role": "assistant", "content": ans}]})
    cap.close()
    (d / "verified.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rep = preprocess(PreprocessConfig(inputs=[str(d / "verified.jsonl")], tokenizer=str(qwen_tokenizer_dir),
                                      seq_length=S, output=str(d / "packed"), format=FormatConfig("cot"),
                                      kd_sidecars=[str(cap.path)], seed=0, progress=False))
    return d, rep


def test_preprocess_kd_columns(kd_packed):
    import datasets

    d, rep = kd_packed
    assert rep["kd"]["with_topk"] == rep["samples"] == 24 and rep["kd"]["k"] == K
    assert rep["kd"]["kd_position_share"] == 1.0  # every trained label (incl. <|im_end|>) has teacher data
    ds = datasets.load_from_disk(str(d / "packed"))
    assert {"topk_ids", "topk_logprobs"} <= set(ds.column_names)
    lab = np.asarray(ds[0]["labels"])
    tid = np.asarray(ds[0]["topk_ids"]).reshape(S, K)
    assert ((tid[:, 0] >= 0) == (lab != -100)).all()


def _kd_yaml(tmp_path: Path, alpha: float, data: Path, **extra) -> Path:
    cfg = yaml.safe_load(KD_YAML.read_text())
    mc = cfg["model"]["model_config"]
    mc.update(seq_length=S, kd_alpha=alpha, kd_top_k=K)
    cfg["train_dataset"]["data_loader"]["dataset_path"] = str(data)
    cfg["parallel_config"]["data_parallel"] = 1
    for k, v in extra.items():
        cfg[k] = v
    p = tmp_path / f"kd_{alpha}.yaml"
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


def test_torch_kd_training_alpha_one_is_sft(tmp_path, kd_packed, tiny_qwen2_dir):
    from distilled.train.loop import run_train

    d, _ = kd_packed
    runs = {}
    for alpha in (1.0, 0.5):
        out = tmp_path / f"a{alpha}"
        run_train(str(_kd_yaml(tmp_path, alpha, d / "packed")), backend="torch", data=str(d / "packed"),
                  weights=str(tiny_qwen2_dir), output=str(out), steps=3, quiet=True)
        runs[alpha] = [json.loads(x)["loss"] for x in (out / "loss.jsonl").read_text().splitlines()]
    sft_cfg = yaml.safe_load((REPO / "configs" / "finetune_qwen2_5_tiny_cpu.yaml").read_text())
    sft_cfg["model"]["model_config"]["seq_length"] = S
    sft_cfg["parallel_config"]["data_parallel"] = 1
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(sft_cfg))
    run_train(str(tmp_path / "sft.yaml"), backend="torch", data=str(d / "packed"), weights=str(tiny_qwen2_dir),
              output=str(tmp_path / "sft"), steps=3, quiet=True)
    sft = [json.loads(x)["loss"] for x in (tmp_path / "sft" / "loss.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(runs[1.0], sft, rtol=1e-5)  # alpha 1: the KD path is exactly SFT
    assert abs(runs[0.5][0] - sft[0]) > 1e-3  # alpha 0.5: the KL term is in the loss


@pytest.mark.slow
def test_parity_check_kd(tmp_path, kd_packed, tiny_qwen2_dir):
    from distilled.train.parity import run_parity

    d, _ = kd_packed
    res = run_parity(str(_kd_yaml(tmp_path, 0.5, d / "packed")), str(tiny_qwen2_dir), str(d / "packed"), steps=1,
                     check="kd", quiet=True)
    kd = res["kd"]
    assert res["ok"], res["failures"]
    assert kd["kd_positions"] > 0 and kd["loss_rel_diff_same_logits"] < 1e-5
    assert kd["grad_max_abs_diff_same_logits"] <= 1e-5 * kd["grad_scale"]


@pytest.mark.slow
def test_kd_yaml_trains_through_run_mindformer_msrun(tmp_path, kd_packed):
    d, _ = kd_packed
    out = tmp_path / "out"
    cmd = (f"{REPO / 'run_mindformer.py'} --config {KD_YAML} --run_mode finetune --train_dataset_dir {d / 'packed'} "
           f"--output_dir {out} --model.model_config.seq_length {S} --model.model_config.kd_top_k {K} --epochs 1")
    r = subprocess.run(["bash", str(REPO / "scripts" / "msrun_launcher.sh"), cmd, "2", "8257", str(out / "msrun_log"),
                        "True", "900"], cwd=REPO, capture_output=True, text=True, timeout=1500)
    logs = [p.read_text(errors="replace") for p in sorted((out / "msrun_log").glob("worker_*.log"))]
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:] + "\n".join(x[-3000:] for x in logs)
    # rank 0 prints which shims run_mindformer.py applied (every rank runs the same code): the KD classes
    assert "kd_model_and_loader" in logs[0]
    from distilled.train.mindformers_run import read_loss

    l0, l1 = read_loss(out / "loss_rank_0.jsonl"), read_loss(out / "loss_rank_1.jsonl")
    assert len(l0) >= 6 and l0[-1]["loss"] < l0[0]["loss"]
    assert [x["global_norm"] for x in l0] == [x["global_norm"] for x in l1]  # one all-reduced step on both ranks
