"""MindSpore finetune machinery: YAMLs checked against MindFormers 1.9's own config classes, the msrun
launcher's argument forms, run_mindformer.py's pre-flight errors, and (slow) a real 2-worker msrun
CPU run: loss falls, ranks stay in sync, safetensors are written, resuming reproduces the
uninterrupted run's next losses exactly, and the trained checkpoint converts to a loadable HF model.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIG = REPO / "configs" / "finetune_qwen2_5_7b_32k.yaml"
TINY = REPO / "configs" / "finetune_qwen2_5_tiny_cpu.yaml"
LAUNCHER = REPO / "scripts" / "msrun_launcher.sh"
PY = sys.executable


# ------------------------------------------------------------------------------------------ YAMLs

def test_both_yamls_pass_mindformers_config_classes():
    from distilled.train.mindformers_run import yaml_problems

    assert yaml_problems(BIG) == []
    assert yaml_problems(TINY) == []


def test_yaml_checker_catches_unknown_keys(tmp_path):
    from distilled.train.mindformers_run import yaml_problems

    raw = yaml.safe_load(BIG.read_text())
    raw["runner_config"]["epoch"] = 3
    raw["model"]["model_config"]["rope_theta"] = 1.0
    raw["callbacks"][1]["checkpoint_fmt"] = "safetensors"
    raw["trainer"]["type"] = "NoSuchTrainer"
    raw["train_dataset"]["data_loader"]["split"] = "train"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    problems = "\n".join(yaml_problems(bad))
    for key in ("runner_config' gets an unexpected key: epoch", "model.model_config.rope_theta",
                "callbacks[1].checkpoint_fmt", "trainer.type", "train_dataset.data_loader.split"):
        assert key in problems


def test_7b_yaml_has_the_issue_settings():
    raw = yaml.safe_load(BIG.read_text())
    mc = raw["model"]["model_config"]
    assert raw["model"]["arch"]["type"] == "LlamaForCausalLM" and mc["type"] == "LlamaConfig"
    assert mc["qkv_has_bias"] is True and mc["theta"] == 300000.0 and mc["seq_length"] == 32768
    assert (mc["hidden_size"], mc["num_layers"], mc["num_heads"], mc["n_kv_heads"], mc["vocab_size"],
            mc["intermediate_size"]) == (3584, 28, 28, 4, 152064, 18944)
    assert mc["compute_dtype"] == "bfloat16" and mc["use_flash_attention"] is True
    assert raw["lr_schedule"]["type"] == "LinearWithWarmUpLR" and raw["lr_schedule"]["learning_rate"] == 5e-5
    assert raw["lr_schedule"]["warmup_ratio"] == 0.1 and raw["runner_config"]["epochs"] == 3
    assert raw["load_ckpt_format"] == "safetensors" and raw["auto_trans_ckpt"] is True
    dl = raw["train_dataset"]["data_loader"]
    assert dl["create_attention_mask"] is True and "dataset_path" in dl and "split" not in dl
    pc = raw["parallel_config"]
    assert pc["data_parallel"] * pc["model_parallel"] * pc["context_parallel"] * pc["pipeline_stage"] == 8
    assert raw["callbacks"][1]["checkpoint_format"] == "safetensors"
    assert raw["context"]["mode"] == 0  # graph mode


@pytest.mark.parametrize("name", ["finetune_qwen2_5_7b_32k.yaml", "finetune_qwen2_5_7b_32k_lora.yaml",
                                  "finetune_qwen2_5_tiny_cpu.yaml", "finetune_qwen2_5_tiny_cpu_lora.yaml"])
def test_yamls_graph_mode_per_token_loss_and_shims(name):
    """Every finetune YAML: graph mode, both per-token keys; the packed-mask shim only off flash."""
    from mindformers.tools.register import MindFormerConfig

    from distilled.train.mindformers_run import check_per_token_loss, shims_for

    path = REPO / "configs" / name
    raw = yaml.safe_load(path.read_text())
    assert raw["context"]["mode"] == 0
    assert raw["calculate_per_token_loss"] is True and raw["runner_wrapper"]["calculate_per_token_loss"] is True
    cfg = MindFormerConfig(str(path))
    check_per_token_loss(cfg, world=8)
    shims = shims_for(cfg)
    if "tiny" in name:
        assert shims[:2] == ["cpu", "packed_mask"]
    else:
        assert raw["model"]["model_config"]["use_flash_attention"] is True
        assert "packed_mask" not in shims and "cpu" not in shims
        # dp1 x mp4 x cp2: MF's global batch is batch_size x dp x GA = GA rows per step
        rc, pc = raw["runner_config"], raw["parallel_config"]
        assert rc["batch_size"] * pc["data_parallel"] * rc["gradient_accumulation_steps"] == 16
        assert "grad_accumulation_data_parallel" in shims
    assert "global_token_mean_data_parallel" in shims


def test_tiny_yaml_matches_tiny_student_shape():
    from distilled.train.tiny_model import TinyQwen2Shape

    s = TinyQwen2Shape()
    big = yaml.safe_load(BIG.read_text())
    raw = yaml.safe_load(TINY.read_text())
    mc = raw["model"]["model_config"]
    assert (mc["vocab_size"], mc["hidden_size"], mc["intermediate_size"], mc["num_layers"], mc["num_heads"],
            mc["n_kv_heads"], mc["theta"], mc["rms_norm_eps"], mc["tie_word_embeddings"]) == (
        s.vocab_size, s.hidden_size, s.intermediate_size, s.num_hidden_layers, s.num_attention_heads,
        s.num_key_value_heads, s.rope_theta, s.rms_norm_eps, s.tie_word_embeddings)
    assert raw["context"]["device_target"] == "CPU" and mc["compute_dtype"] == "float32"
    assert mc["use_flash_attention"] is False and mc["seq_length"] == 512
    assert raw["parallel_config"]["data_parallel"] == 2
    # same structure as the 7B config: same sections, same model class, same loader
    assert set(raw) - {"parallel"} <= set(big) | {"parallel"}
    assert raw["train_dataset"]["data_loader"]["type"] == big["train_dataset"]["data_loader"]["type"]


# -------------------------------------------------------------------------------------- launcher

@pytest.fixture()
def fake_msrun(tmp_path):
    """An `msrun` that records its arguments (one per line) instead of launching anything."""
    rec = tmp_path / "msrun_args.txt"
    fake = tmp_path / "bin" / "msrun"
    fake.parent.mkdir()
    fake.write_text(f"#!/usr/bin/env bash\nprintf '%s\\n' \"$@\" > {rec}\n")
    fake.chmod(0o755)
    return fake, rec


def _launch(args, cwd, env_extra):
    env = dict(os.environ, **env_extra)
    return subprocess.run(["bash", str(LAUNCHER), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=60)


def _msrun_args(rec: Path) -> dict:
    lines = rec.read_text().splitlines()
    n = next(i for i, line in enumerate(lines) if not line.startswith("--"))  # msrun options end at the script
    opts = dict(line[2:].split("=", 1) for line in lines[:n])
    opts["cmd"] = lines[n:]
    return opts


CMD = "run_mindformer.py --config configs/finetune_qwen2_5_tiny_cpu.yaml --run_mode finetune"


@pytest.mark.parametrize("args,expect", [
    ([CMD], dict(worker_num="8", local_worker_num="8", master_addr="127.0.0.1", master_port="8118",
                 node_rank="0", log_dir="output/msrun_log", join="False", cluster_time_out="7200")),
    ([CMD, "2"], dict(worker_num="2", local_worker_num="2", master_port="8118", log_dir="output/msrun_log")),
    ([CMD, "4", "9000", "logs/x", "True", "300"],
     dict(worker_num="4", local_worker_num="4", master_port="9000", log_dir="logs/x", join="True",
          cluster_time_out="300", master_addr="127.0.0.1", node_rank="0")),
    ([CMD, "16", "8", "10.0.0.1", "9001", "1", "logs/n1", "False", "600"],
     dict(worker_num="16", local_worker_num="8", master_addr="10.0.0.1", master_port="9001", node_rank="1",
          log_dir="logs/n1", join="False", cluster_time_out="600")),
])
def test_launcher_argument_forms(fake_msrun, tmp_path, args, expect):
    fake, rec = fake_msrun
    r = _launch(args, tmp_path, {"MSRUN": str(fake)})
    assert r.returncode == 0, r.stderr
    got = _msrun_args(rec)
    for k, v in expect.items():
        assert got[k] == v, (k, got)
    assert got["cmd"] == CMD.split()
    assert (tmp_path / expect["log_dir"]).is_dir()


def test_launcher_log_suffix_and_errors(fake_msrun, tmp_path):
    fake, rec = fake_msrun
    env = {"MSRUN": str(fake)}
    r = _launch([CMD, "2"], tmp_path, dict(env, MF_LOG_SUFFIX="try1"))
    assert r.returncode == 0 and _msrun_args(rec)["log_dir"] == "output/msrun_log_try1"
    r = _launch([CMD, "1"], tmp_path, env)
    assert r.returncode == 1 and "plain python" in r.stderr and f"python {CMD}" in r.stderr
    r = _launch([CMD, "2", "3"], tmp_path, env)
    assert r.returncode == 1 and "expected 1, 2, 6 or 9 arguments, got 3" in r.stderr
    r = _launch([CMD, "two"], tmp_path, env)
    assert r.returncode == 1 and "WORKER_NUM=two" in r.stderr
    r = _launch([CMD, "4", "9000", "logs", "maybe", "300"], tmp_path, env)
    assert r.returncode == 1 and "JOIN=maybe" in r.stderr
    r = _launch([CMD, "2"], tmp_path, {"MSRUN": str(tmp_path / "nope" / "msrun")})
    assert r.returncode == 127 and "msrun not found" in r.stderr


def test_launcher_prefers_venv_msrun(tmp_path):
    """Without MSRUN, the repo's .venv/bin/msrun is used (not whatever is first on PATH)."""
    venv_msrun = REPO / ".venv" / "bin" / "msrun"
    if not venv_msrun.exists():
        pytest.skip("no .venv/bin/msrun in this checkout")
    r = subprocess.run(["bash", "-x", str(LAUNCHER), "true_script.py", "2"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=60, env=dict(os.environ, PATH="/usr/bin:/bin", MSRUN=""))
    assert f"MSRUN_BIN={venv_msrun}" in r.stderr


# ----------------------------------------------------------------------------- data + pre-flight

def _chat_samples(tokenizer, n: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """Real-tokenizer chat samples: prompt masked (-100), answer and its <|im_end|> trained."""
    rng = np.random.RandomState(seed)
    out = []
    for i in range(n):
        a, b = int(rng.randint(2, 60)), int(rng.randint(2, 60))
        prompt = f"<|im_start|>user\nWhat is {a} + {b}?<|im_end|>\n<|im_start|>assistant\n"
        think = f"<think>\n{a} plus {b} is {a + b}.\n</think>\n\n" if i % 2 else ""
        answer = f"{think}The answer is $\\boxed{{{a + b}}}$.<|im_end|>"
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        q = tokenizer(answer, add_special_tokens=False)["input_ids"]
        out.append((p + q, [-100] * len(p) + q))
    return out


def build_packed_dataset(tokenizer, out_dir: Path, n_samples: int, seq_length: int, seed: int = 0) -> Path:
    """Pack real-tokenizer samples with the project's BFD packer and save them as MF reads them."""
    import datasets
    import pyarrow as pa

    from distilled.data.packing import pack_table

    samples = _chat_samples(tokenizer, n_samples, seed)
    t = pa.table({"input_ids": pa.array([s[0] for s in samples], pa.list_(pa.int32())),
                  "labels": pa.array([s[1] for s in samples], pa.list_(pa.int32()))})
    packed, _ = pack_table(t, seq_length=seq_length, pad_id=151643, seed=seed)
    datasets.Dataset(packed).save_to_disk(str(out_dir))
    return out_dir


@pytest.fixture(scope="module")
def packed64(tmp_path_factory, qwen_tokenizer) -> Path:
    return build_packed_dataset(qwen_tokenizer, tmp_path_factory.mktemp("data") / "packed64", 24, 64)


def _config(overrides: dict):
    from mindformers.tools.register import MindFormerConfig

    cfg = MindFormerConfig(str(TINY))
    for dotted, value in overrides.items():
        node = cfg
        parts = dotted.split(".")
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = value
    return cfg


def test_preflight_accepts_good_setup_and_names_keys_on_bad_input(packed64, tmp_path, tiny_qwen2_dir):
    from distilled.train.mindformers_run import FinetuneConfigError, validate_config

    ok = {"train_dataset.data_loader.dataset_path": str(packed64), "model.model_config.seq_length": 64,
          "load_checkpoint": str(tiny_qwen2_dir)}
    facts = validate_config(_config(ok), world=2)
    assert facts["longest_row"] == 64 and facts["max_token_id"] < 151936 and facts["rows"] > 0
    assert facts["max_docs_per_row"] >= 2  # rows really hold several documents

    cases = [
        ({"train_dataset.data_loader.dataset_path": str(tmp_path / "missing")},
         "train_dataset.data_loader.dataset_path"),
        ({"model.model_config.seq_length": 32}, "model.model_config.seq_length"),
        ({"model.model_config.vocab_size": 1000}, "model.model_config.vocab_size"),
        ({"train_dataset.data_loader.create_attention_mask": False},
         "train_dataset.data_loader.create_attention_mask"),
        ({"train_dataset.input_columns": ["input_ids", "labels"]}, "train_dataset.input_columns"),
        ({"model.model_config.input_sliced_sig": False}, "model.model_config.input_sliced_sig"),
        ({"train_dataset.data_loader.use_broadcast_data": True}, "train_dataset.data_loader.use_broadcast_data"),
        ({"model.model_config.use_flash_attention": True}, "model.model_config.use_flash_attention"),
    ]
    no_per_token = {"calculate_per_token_loss": False, "runner_wrapper.calculate_per_token_loss": False}
    cases += [
        # accumulation / data parallel would average per micro-batch / per rank without MF's per-token mode
        (dict(no_per_token, **{"runner_config.gradient_accumulation_steps": 2}),
         "runner_config.gradient_accumulation_steps"),
        (no_per_token, "parallel_config.data_parallel"),
        # MF reads the two keys in different places: one alone crashes or averages
        ({"runner_wrapper.calculate_per_token_loss": False}, "runner_wrapper.calculate_per_token_loss"),
        ({"calculate_per_token_loss": False}, "calculate_per_token_loss"),
    ]
    for change, key in cases:
        with pytest.raises(FinetuneConfigError, match=key.replace(".", r"\.")):
            validate_config(_config(dict(ok, **change)), world=2)
    # one process without the keys and without accumulation is a plain per-token mean: accepted
    validate_config(_config(dict(ok, **no_per_token)), world=1)

    # a dataset with the wrong columns: column mismatch names the path key and the columns
    import datasets

    plain = tmp_path / "plain"
    datasets.Dataset.from_dict({"input_ids": [[1, 2]], "text": ["x"]}).save_to_disk(str(plain))
    with pytest.raises(FinetuneConfigError, match=r"dataset_path.*missing \['labels', 'actual_seq_len'\]"):
        validate_config(_config(dict(ok, **{"train_dataset.data_loader.dataset_path": str(plain)})), world=1)

    # tokenizer beside the checkpoint bigger than the model's vocabulary
    small_vocab = dict(ok, **{"model.model_config.vocab_size": 151650})
    with pytest.raises(FinetuneConfigError, match="smaller than the tokenizer's"):
        validate_config(_config(small_vocab), world=1)

    # compressed EOD mask: the limit must hold the most documents of any row
    comp = dict(ok, **{"train_dataset.data_loader.create_compressed_eod_mask": True,
                       "train_dataset.data_loader.compressed_eod_mask_length": 1,
                       "model.model_config.use_eod_attn_mask_compression": True,
                       "train_dataset.input_columns": ["input_ids", "labels", "loss_mask", "position_ids",
                                                       "actual_seq_len"],
                       "train_dataset.construct_args_key": ["input_ids", "labels", "loss_mask", "position_ids",
                                                            "actual_seq_len"],
                       "context.device_target": "Ascend"})
    with pytest.raises(FinetuneConfigError, match="compressed_eod_mask_length"):
        validate_config(_config(comp), world=1)


def test_run_mindformer_cli_fails_fast_with_the_yaml_key(tmp_path):
    r = subprocess.run([PY, str(REPO / "run_mindformer.py"), "--config", str(TINY), "--run_mode", "finetune",
                        "--train_dataset_dir", str(tmp_path / "nothing_here")],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert "train_dataset.data_loader.dataset_path" in r.stderr and "does not exist" in r.stderr
    assert "Traceback" not in r.stderr


# ------------------------------------------------------------------------- real 2-worker CPU run

def _msrun_train(out: Path, data: Path, port: int, extra: str = "") -> subprocess.CompletedProcess:
    cmd = (f"{REPO / 'run_mindformer.py'} --config {TINY} --run_mode finetune --train_dataset_dir {data} "
           f"--output_dir {out} --model.model_config.seq_length 64 {extra}")
    return subprocess.run(["bash", str(LAUNCHER), cmd, "2", str(port), str(out / "msrun_log"), "True", "600"],
                          cwd=REPO, capture_output=True, text=True, timeout=1500)


def _losses(out: Path, rank: int) -> list[dict]:
    from distilled.train.mindformers_run import read_loss

    return read_loss(out / f"loss_rank_{rank}.jsonl")


def _worker_tail(out: Path) -> str:
    logs = sorted((out / "msrun_log").glob("worker_*.log"))
    return "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-25:]) for p in logs)


@pytest.mark.slow
def test_two_worker_msrun_finetune_resume_and_export(tmp_path, qwen_tokenizer, tiny_qwen2_dir):
    from distilled.train.convert import convert_mf_to_hf, load_safetensors_np

    data = build_packed_dataset(qwen_tokenizer, tmp_path / "packed", 12, 64, seed=1)
    import datasets

    rows = len(datasets.load_from_disk(str(data)))
    steps = (rows + 1) // 2  # 2 data-parallel shards of batch 1 (MindSpore pads the shorter shard)
    assert steps >= 4

    full = tmp_path / "full"
    r = _msrun_train(full, data, 8231, f"--load_checkpoint {tiny_qwen2_dir}")
    assert r.returncode == 0, r.stdout[-3000:] + _worker_tail(full)
    l0, l1 = _losses(full, 0), _losses(full, 1)
    assert [x["step"] for x in l0] == list(range(1, steps + 1)) == [x["step"] for x in l1]
    # ranks in sync: the all-reduced gradient norm is the same number on both ranks every step
    assert [x["global_norm"] for x in l0] == [x["global_norm"] for x in l1]
    assert all(np.isfinite(x["loss"]) and not x["overflow"] for x in l0 + l1)
    # loss falls (mean over both ranks, first step vs last step)
    assert (l0[-1]["loss"] + l1[-1]["loss"]) < (l0[0]["loss"] + l1[0]["loss"]) - 0.05
    # safetensors checkpoints on both ranks, identical weights (data parallel)
    ck0 = sorted((full / "checkpoint" / "rank_0").glob("*.safetensors"))
    ck1 = sorted((full / "checkpoint" / "rank_1").glob("*.safetensors"))
    assert ck0 and ck1
    last0, last1 = load_safetensors_np(ck0[-1]), load_safetensors_np(ck1[-1])
    for k, v in last0.items():
        if k.startswith(("model.", "lm_head.")):
            assert np.array_equal(v, last1[k]), k
    # the first step started from the HF student: its weights were loaded (not random init)
    hf = load_safetensors_np(tiny_qwen2_dir)
    assert not np.array_equal(last0["model.norm_out.weight"], hf["model.norm.weight"])  # trained
    assert np.allclose(last0["model.norm_out.weight"], hf["model.norm.weight"], atol=0.05)  # from the student

    # resume from the step-2 checkpoint: steps 3.. reproduce the uninterrupted run exactly
    resume_src = tmp_path / "resume_src"
    for rank in (0, 1):
        d = resume_src / f"rank_{rank}"
        d.mkdir(parents=True)
        (src,) = (full / "checkpoint" / f"rank_{rank}").glob("*-1_2.safetensors")
        shutil.copy2(src, d / src.name)
        # what CheckpointMonitor's meta.json says after a job died between steps 2 and 4
        (d / "meta.json").write_text(json.dumps({"last_epoch": 1, "last_step": 2, "last_ckpt_file": src.name}))
    resumed = tmp_path / "resumed"
    r = _msrun_train(resumed, data, 8233, f"--load_checkpoint {resume_src} --resume_training True")
    assert r.returncode == 0, r.stdout[-3000:] + _worker_tail(resumed)
    for rank, ref in ((0, l0), (1, l1)):
        got = _losses(resumed, rank)
        assert [x["step"] for x in got] == list(range(3, steps + 1))
        assert [x["loss"] for x in got] == [x["loss"] for x in ref[2:]]
        assert [x["global_norm"] for x in got] == [x["global_norm"] for x in ref[2:]]

    # the trained checkpoint exports to an HF model that transformers loads
    hf_out = convert_mf_to_hf(ck0[-1], tmp_path / "hf_export", config=tiny_qwen2_dir)
    import torch
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(hf_out).eval()
    with torch.no_grad():
        logits = model(torch.tensor([[9707, 1879]])).logits
    assert torch.isfinite(logits).all()
    assert torch.equal(model.model.norm.weight.data, torch.from_numpy(last0["model.norm_out.weight"]))


@pytest.mark.slow
def test_two_worker_lora_trains_only_adapters_and_merges(tmp_path, qwen_tokenizer, tiny_qwen2_dir):
    """The tiny PET-LoRA twin through the same launcher: base weights stay bit-identical to the
    loaded HF student, the adapters move, and `merge-lora` gives an HF model that transformers loads."""
    from distilled.train.convert import convert_merge_lora, hf_to_mf, load_safetensors_np

    lora_yaml = REPO / "configs" / "finetune_qwen2_5_tiny_cpu_lora.yaml"
    data = build_packed_dataset(qwen_tokenizer, tmp_path / "packed", 8, 64, seed=2)
    out = tmp_path / "lora"
    cmd = (f"{REPO / 'run_mindformer.py'} --config {lora_yaml} --run_mode finetune --train_dataset_dir {data} "
           f"--output_dir {out} --model.model_config.seq_length 64 --load_checkpoint {tiny_qwen2_dir}")
    r = subprocess.run(["bash", str(LAUNCHER), cmd, "2", "8235", str(out / "msrun_log"), "True", "600"],
                       cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + _worker_tail(out)
    l0, l1 = _losses(out, 0), _losses(out, 1)
    assert l0 and [x["global_norm"] for x in l0] == [x["global_norm"] for x in l1]
    ckpts = sorted((out / "checkpoint" / "rank_0").glob("*.safetensors"))
    assert ckpts
    trained = load_safetensors_np(ckpts[-1])
    base = hf_to_mf(load_safetensors_np(tiny_qwen2_dir), tie_word_embeddings=False)
    for k, v in base.items():
        assert np.array_equal(trained[k], v), f"{k} changed: only adapters may train"
    lora_b = [k for k in trained if k.startswith("model.") and k.endswith("mindpet_delta_lora_b")]
    assert len(lora_b) == 8 and any(np.abs(trained[k]).max() > 0 for k in lora_b)  # B started at 0
    merged = convert_merge_lora(ckpts[-1], tmp_path / "merged", config=lora_yaml)
    import torch
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(merged).eval()
    ref = Qwen2ForCausalLM.from_pretrained(tiny_qwen2_dir).eval()
    ids = torch.tensor([[9707, 1879, 151645]])
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, ref(ids).logits)
        assert torch.isfinite(model(ids).logits).all()


# ------------------------------------------------------ per-token loss across accumulation / ranks

GA_SEQ = 512
TRAINED = (10, 400)  # trained tokens of the two packed rows: very different on purpose


def _ga_rows(out_dir: Path) -> Path:
    """Two packed rows of 2 documents each; row 0 trains 10 tokens, row 1 trains 400."""
    import datasets

    rng = np.random.RandomState(7)
    ids, labels, ends = [], [], []
    for n_trained in TRAINED:
        row = rng.randint(10, 151643, GA_SEQ)
        lab = np.full(GA_SEQ, -100)
        half = GA_SEQ // 2
        first = n_trained // 2
        lab[half - 1 - first:half - 1] = row[half - first:half]           # document 1's answer
        second = n_trained - first
        lab[GA_SEQ - 1 - second:GA_SEQ - 1] = row[GA_SEQ - second:]       # document 2's answer
        assert (lab != -100).sum() == n_trained
        ids.append(row.tolist())
        labels.append(lab.tolist())
        ends.append([half, GA_SEQ])
    datasets.Dataset.from_dict({"input_ids": ids, "labels": labels, "actual_seq_len": ends}).save_to_disk(str(out_dir))
    return out_dir


def _sgd_yaml(tmp_path: Path) -> Path:
    """The tiny YAML with plain SGD, a constant lr and a clip bound never reached (the global norm is
    still logged): the weights after one step are a linear function of the gradient, so any change
    of token weighting shows in them."""
    raw = yaml.safe_load(TINY.read_text())
    raw["optimizer"] = {"type": "SGD", "momentum": 0.0, "weight_decay": 0.0}
    raw["lr_schedule"] = {"type": "ConstantWarmUpLR", "learning_rate": 0.5, "warmup_ratio": 0.0, "total_steps": -1}
    raw["runner_wrapper"]["max_grad_norm"] = 1.0e9
    raw["callbacks"][1]["save_checkpoint_steps"] = 1
    p = tmp_path / "tiny_sgd.yaml"
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    return p


def _run_one_process(cfg: Path, data: Path, out: Path, weights: Path, *extra: str) -> list[dict]:
    r = subprocess.run([PY, str(REPO / "run_mindformer.py"), "--config", str(cfg), "--run_mode", "finetune",
                        "--train_dataset_dir", str(data), "--output_dir", str(out), "--load_checkpoint", str(weights),
                        "--model.model_config.seq_length", str(GA_SEQ), *extra],
                       cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return _losses(out, 0)


def _trained_weights(out: Path, rank: int = 0) -> dict:
    from distilled.train.convert import load_safetensors_np

    (ck,) = sorted((out / "checkpoint" / f"rank_{rank}").glob("*.safetensors"))
    return {k: v for k, v in load_safetensors_np(ck).items() if k.startswith(("model.", "lm_head."))}


def _max_rel_diff(a: dict, b: dict) -> float:
    return max(float(np.abs(a[k] - b[k]).max() / (np.abs(a[k]).max() + 1e-12)) for k in a)


@pytest.fixture(scope="module")
def batch2_reference(tmp_path_factory, tiny_qwen2_dir):
    """One process, batch 2 x GA 1 over the two rows: the reference both accumulation and data
    parallel must reproduce."""
    tmp = tmp_path_factory.mktemp("per_token")
    data = _ga_rows(tmp / "rows")
    cfg = _sgd_yaml(tmp)
    recs = _run_one_process(cfg, data, tmp / "b2", tiny_qwen2_dir, "--batch_size", "2")
    return data, cfg, recs, _trained_weights(tmp / "b2")


@pytest.mark.slow
def test_grad_accumulation_is_per_token_through_the_trainer(tmp_path, tiny_qwen2_dir, batch2_reference):
    """batch 1 x GA 2 == batch 2 x GA 1 through MindFormers' Trainer (graph mode, fp32, one SGD
    step) on rows with 10 and 400 trained tokens; per-micro-batch averaging (MF's default) differs."""
    from distilled.train.convert import hf_to_mf, load_safetensors_np

    data, cfg, b2, wb2 = batch2_reference
    w0 = hf_to_mf(load_safetensors_np(tiny_qwen2_dir), tie_word_embeddings=False)
    ga2 = _run_one_process(cfg, data, tmp_path / "ga2", tiny_qwen2_dir, "--gradient_accumulation_steps", "2")
    assert len(b2) == len(ga2) == 1  # one optimizer step over the same two rows
    # the logged loss is the per-token mean of the step, not GA x larger
    assert abs(b2[0]["loss"] - ga2[0]["loss"]) < 1e-5 * abs(b2[0]["loss"])
    assert 10 < b2[0]["loss"] < 13  # ~ln(151936) = 11.9 for the random tiny student
    assert abs(b2[0]["global_norm"] - ga2[0]["global_norm"]) < 1e-4 * b2[0]["global_norm"]
    wga2 = _trained_weights(tmp_path / "ga2")
    moved = _max_rel_diff(wb2, {k: w0[k] for k in wb2})
    assert moved > 1e-3  # the step really changed the weights
    assert _max_rel_diff(wb2, wga2) < 1e-5  # measured 8e-7

    # MindFormers' default (no per-token keys) on the same rows: per-micro-batch means summed
    micro = _run_one_process(cfg, data, tmp_path / "micro", tiny_qwen2_dir, "--gradient_accumulation_steps", "2",
                             "--calculate_per_token_loss", "False", "--runner_wrapper.calculate_per_token_loss",
                             "False", "--skip_checks")
    assert abs(micro[0]["global_norm"] - b2[0]["global_norm"]) > 0.05 * b2[0]["global_norm"]
    assert _max_rel_diff(_trained_weights(tmp_path / "micro"), wb2) > 100 * _max_rel_diff(wb2, wga2) + 1e-4

    # the pre-flight check refuses that YAML, naming the key: checked in-process by
    # test_preflight_accepts_good_setup_and_names_keys_on_bad_input, and the CLI's exit 2 with the
    # key by test_run_mindformer_cli_fails_fast_with_the_yaml_key (a third MindFormers start here
    # would only add ~10 s)


@pytest.mark.slow
def test_two_msrun_workers_take_the_global_token_mean(tmp_path, batch2_reference, tiny_qwen2_dir):
    """2 data-parallel msrun workers, one row each (10 and 400 trained tokens), give the weights of
    one process with both rows (the shim divides by all ranks' tokens); MindFormers' stock
    per-rank mean (--no_global_token_mean) does not."""
    data, cfg, b2, wb2 = batch2_reference

    def msrun(out: Path, port: int, *extra: str) -> list[list[dict]]:
        cmd = (f"{REPO / 'run_mindformer.py'} --config {cfg} --run_mode finetune --train_dataset_dir {data} "
               f"--output_dir {out} --load_checkpoint {tiny_qwen2_dir} --model.model_config.seq_length {GA_SEQ} "
               + " ".join(extra))
        r = subprocess.run(["bash", str(LAUNCHER), cmd, "2", str(port), str(out / "msrun_log"), "True", "600"],
                           cwd=REPO, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stdout[-3000:] + _worker_tail(out)
        return [_losses(out, 0), _losses(out, 1)]

    l0, l1 = msrun(tmp_path / "dp", 8241)
    assert len(l0) == len(l1) == 1
    # the logged loss is the global token mean: the same number on both ranks, = batch 2's
    assert l0[0]["loss"] == l1[0]["loss"] and abs(l0[0]["loss"] - b2[0]["loss"]) < 1e-5 * b2[0]["loss"]
    assert abs(l0[0]["global_norm"] - b2[0]["global_norm"]) < 1e-4 * b2[0]["global_norm"]
    w_dp = _trained_weights(tmp_path / "dp", 0)
    assert _max_rel_diff(w_dp, _trained_weights(tmp_path / "dp", 1)) == 0.0
    assert _max_rel_diff(w_dp, wb2) < 1e-5

    s0, s1 = msrun(tmp_path / "stock", 8243, "--no_global_token_mean")
    assert s0[0]["loss"] != s1[0]["loss"]  # each rank logs its own token mean
    assert abs(s0[0]["global_norm"] - b2[0]["global_norm"]) > 0.05 * b2[0]["global_norm"]
    assert _max_rel_diff(_trained_weights(tmp_path / "stock", 0), wb2) > 1e-3
