"""``distill train --backend torch`` from the MindFormers finetune YAML: the keys map onto the
torch run, unknown keys are listed, values it cannot honour stop it, and the loss falls."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from backend_helpers import make_small_qwen2, packed_rows, write_packed, write_yaml
from distilled.train.backends.base import linear_warmup_lr
from distilled.train.loop import ConfigError, load_yaml, run_train, settings_from_yaml


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    weights = make_small_qwen2(d / "weights")
    # the same 4 rows twice over: a model that learns shows it within a few steps
    rows = packed_rows(4, 48, seed=1)
    data = write_packed(d / "packed", rows)
    return d, weights, data


def test_yaml_maps_onto_settings(setup, tmp_path):
    d, weights, data = setup
    cfg = load_yaml(write_yaml(tmp_path / "c.yaml", data=data, lr=3e-4, warmup_ratio=0.1, weight_decay=0.05,
                               max_grad_norm=0.7, extra="mystery_key: 3\nrunner_config_extra: {a: 1}"))
    plan = settings_from_yaml(cfg, num_rows=41, world_size=1)
    s = plan.settings
    # total_steps -1: epochs (2) x 41 rows // batch 2 = 40 steps, warmup int(40 * 0.1) = 4
    assert (s.total_steps, s.warmup_steps) == (40, 4)
    assert (s.learning_rate, s.weight_decay, s.max_grad_norm, s.betas, s.seed) == (3e-4, 0.05, 0.7, (0.9, 0.95), 42)
    assert plan.data == str(data) and plan.batch_size == 2 and plan.dtype == "float32"
    assert plan.unsupported == ["mystery_key", "runner_config_extra.a"]
    assert plan.not_applicable["context.device_target"].startswith("MindSpore")
    assert "lr_schedule.warmup_ratio" in plan.applied
    # --steps shortens the run and the schedule spans it
    assert settings_from_yaml(cfg, num_rows=41, steps=10).settings.total_steps == 10
    # clipping off
    cfg["runner_wrapper"]["use_clip_grad"] = False
    assert settings_from_yaml(cfg).settings.max_grad_norm is None


@pytest.mark.parametrize("edit,match", [
    (lambda c: c["optimizer"].update(type="Came"), r"optimizer.type='Came' is not supported"),
    (lambda c: c["runner_wrapper"].update(scale_sense=1024.0), r"scale_sense=1024.0"),
    (lambda c: c["runner_config"].update(gradient_accumulation_steps=-2), r"gradient_accumulation_steps=-2"),
    (lambda c: c["lr_schedule"].update(type="CosineWithWarmUpLR"), r"lr_schedule.type='CosineWithWarmUpLR'"),
])
def test_yaml_values_that_change_the_maths_are_refused(tmp_path, edit, match):
    cfg = load_yaml(write_yaml(tmp_path / "c.yaml"))
    edit(cfg)
    with pytest.raises(ConfigError, match=match):
        settings_from_yaml(cfg, where="c.yaml")


def test_torch_training_loss_falls(setup, tmp_path):
    d, weights, data = setup
    cfg = write_yaml(tmp_path / "c.yaml", data=data, weights=weights, lr=1e-2, warmup_ratio=0.1,
                     extra="mystery_key: 3")
    out = tmp_path / "run"
    summary = run_train(str(cfg), backend="torch", output=str(out), steps=8, device="cpu", quiet=True)
    lines = [json.loads(x) for x in (out / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 9))
    losses = [r["loss"] for r in lines]
    assert np.mean(losses[-2:]) < losses[0] - 0.5, losses
    for i, r in enumerate(lines):
        assert r["lr"] == pytest.approx(linear_warmup_lr(i, 1e-2, 0, 8))  # int(8 * 0.1) = 0 warmup steps
        assert np.isfinite(r["grad_norm"]) and r["tokens_per_s"] > 0
    assert summary["unsupported_keys"] == ["mystery_key"]
    assert summary["last_loss"] == losses[-1]
    # the checkpoint is plain HF safetensors that transformers loads
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(out / "final")
    assert model.config.hidden_size == 64
    on_disk = json.loads((out / "train_summary.json").read_text())
    assert on_disk["steps"] == 8


def test_cli_train_and_bad_config(setup, tmp_path, capsys):
    from distilled.cli import main

    d, weights, data = setup
    cfg = write_yaml(tmp_path / "c.yaml", data=data, weights=weights)
    rc = main(["train", "--backend", "torch", "--config", str(cfg), "--output", str(tmp_path / "o"),
               "--steps", "2", "--save-steps", "1", "--device", "cpu"])
    assert rc == 0
    assert (tmp_path / "o" / "checkpoint-1" / "model.safetensors").is_file()
    assert (tmp_path / "o" / "final" / "model.safetensors").is_file()
    assert "trained 2 steps on torch" in capsys.readouterr().err
    bad = write_yaml(tmp_path / "bad.yaml", data=data, weights=weights, optimizer="Came")
    assert main(["train", "--config", str(bad), "--steps", "1"]) == 2
    assert "optimizer.type='Came'" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_two_cpu_workers(setup, tmp_path):
    """DDP through torchrun (gloo on CPU): 2 ranks, each its own rows, one log and checkpoint."""
    d, weights, data = setup
    cfg = write_yaml(tmp_path / "c.yaml", data=data, weights=weights, batch_size=1, data_parallel=2)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "distilled.train.loop", "--backend", "torch", "--config", str(cfg), "--output", str(tmp_path / "o"),
           "--steps", "2", "--device", "cpu"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = (tmp_path / "o" / "loss.jsonl").read_text().splitlines()
    assert len(lines) == 2
    s = json.loads((tmp_path / "o" / "train_summary.json").read_text())
    assert s["world_size"] == 2


def test_torch_lora_trains_only_adapters(setup, tmp_path):
    """pet_config (MindFormers LoRA) -> PEFT: base weights frozen, the saved model is the merge."""
    from safetensors.numpy import load_file

    d, weights, data = setup
    cfg = write_yaml(tmp_path / "lora.yaml", data=data, weights=weights, lr=1e-2, warmup_ratio=0.0, lora_rank=4)
    plan = settings_from_yaml(load_yaml(cfg))
    assert plan.lora.rank == 4 and plan.lora.alpha == 8 and plan.lora.targets == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert "pet_config" not in plan.model_config
    summary = run_train(str(cfg), backend="torch", output=str(tmp_path / "o"), steps=3, device="cpu", quiet=True)
    assert summary["lora"]["rank"] == 4
    base = load_file(str(weights / "model.safetensors"))
    merged = load_file(str(tmp_path / "o" / "final" / "model.safetensors"))
    adapter = load_file(str(tmp_path / "o" / "final" / "adapter" / "adapter_model.safetensors"))
    assert set(merged) == set(base)
    for k in base:
        if any(t in k for t in ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")):
            layer = k[: -len(".weight")]
            a = adapter[f"base_model.model.{layer}.lora_A.weight"]
            b = adapter[f"base_model.model.{layer}.lora_B.weight"]
            assert np.abs(b).max() > 0, k  # the adapter trained
            np.testing.assert_allclose(merged[k], base[k] + 2.0 * (b @ a), rtol=1e-5, atol=1e-6)
        else:  # frozen: biases, MLP, norms, embeddings, head
            assert np.array_equal(merged[k], base[k]), k


@pytest.mark.slow
def test_mindspore_backend_trains_the_same_checkpoint(setup, tmp_path):
    """distill train --backend mindspore writes HF safetensors equal (to fp32 noise) to torch's."""
    from safetensors.numpy import load_file

    d, weights, data = setup
    cfg = write_yaml(tmp_path / "c.yaml", data=data, weights=weights, lr=5e-3, warmup_ratio=0.0)
    for name in ("torch", "mindspore"):
        run_train(str(cfg), backend=name, output=str(tmp_path / name), steps=2, device="cpu" if name == "torch" else None,
                  quiet=True)
    a = load_file(str(tmp_path / "torch" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "mindspore" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    num = sum(float(((a[k].astype(np.float64) - b[k]) ** 2).sum()) for k in a)
    den = sum(float((a[k].astype(np.float64) ** 2).sum()) for k in a)
    assert (num / den) ** 0.5 < 1e-5
    la = [json.loads(x)["loss"] for x in (tmp_path / "torch" / "loss.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "mindspore" / "loss.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(la, lb, rtol=1e-5)


def test_shuffle_is_a_seeded_permutation_per_epoch():
    """shuffle: True (the 7B YAMLs) -> every row once per epoch, a new order each epoch, the same
    order on every rank, and each rank its own rows."""
    from distilled.train.loop import _RankRows

    ds = [{"i": k} for k in range(12)]
    r0 = _RankRows(ds, 0, 2, 2, seed=42, epochs=2)
    r1 = _RankRows(ds, 1, 2, 2, seed=42, epochs=2)
    assert len(r0) == 12  # 6 rows per rank per epoch, 2 epochs
    e0 = [r0[i]["i"] for i in range(6)] + [r1[i]["i"] for i in range(6)]
    e1 = [r0[i]["i"] for i in range(6, 12)] + [r1[i]["i"] for i in range(6, 12)]
    assert sorted(e0) == list(range(12)) and sorted(e1) == list(range(12))
    assert e0 != e1 and e0 != list(range(12))
    assert [_RankRows(ds, 0, 2, 2, seed=42, epochs=2)[i]["i"] for i in range(6)] == e0[:6]
    plain = _RankRows(ds, 0, 1, 3)
    assert [plain[i]["i"] for i in range(len(plain))] == list(range(12))


def test_global_batch_is_mindformers_and_world_size_is_checked(tmp_path):
    """MF global batch = batch_size x data_parallel x GA; torchrun ranks stand in for dp ranks, the
    rest of dp x GA becomes accumulation, and a world size that cannot keep the global batch is
    refused with the keys named (the 7B layout dp1 x mp4 x cp2: one row per step, not 8)."""
    cfg = load_yaml(write_yaml(tmp_path / "c.yaml", batch_size=2, grad_accum=3, data_parallel=2))
    plan = settings_from_yaml(cfg, num_rows=48, world_size=1)
    assert (plan.global_batch, plan.grad_accum, plan.data_parallel) == (12, 6, 2)
    assert plan.settings.total_steps == 2 * (48 // 12)  # epochs x rows / global batch
    assert settings_from_yaml(cfg, num_rows=48, world_size=2).grad_accum == 3
    assert settings_from_yaml(cfg, num_rows=48, world_size=6).grad_accum == 1
    with pytest.raises(ConfigError, match=r"4 torch ranks .*parallel_config.data_parallel \(2\).*"
                                          r"gradient_accumulation_steps \(3\)"):
        settings_from_yaml(cfg, num_rows=48, world_size=4)
    seven_b = load_yaml(Path(__file__).resolve().parents[1] / "configs" / "finetune_qwen2_5_7b_32k.yaml")
    p7 = settings_from_yaml(seven_b, world_size=1)
    assert p7.global_batch == p7.batch_size * p7.data_parallel * p7.yaml_grad_accum
    if p7.data_parallel * p7.yaml_grad_accum % 8:
        with pytest.raises(ConfigError, match="8 torch ranks cannot reproduce"):
            settings_from_yaml(seven_b, world_size=8)
    assert not settings_from_yaml(seven_b).unsupported


@pytest.mark.slow
def test_two_torch_ranks_equal_one_rank_with_accumulation(tmp_path):
    """2 torchrun ranks (gloo) == 1 process with GA 2 == 1 process with batch 2, on rows with 10 to
    400 trained tokens: the token count is all-reduced, so the per-token loss and the weights after
    the steps agree to fp32 rounding (DDP's mean of per-rank means would not)."""
    from safetensors.numpy import load_file

    from backend_helpers import rows_with_trained_tokens

    weights = make_small_qwen2(tmp_path / "w")
    data = write_packed(tmp_path / "packed", rows_with_trained_tokens([10, 400, 40, 300], 420, seed=11))
    dp2 = write_yaml(tmp_path / "dp2.yaml", data=data, weights=weights, batch_size=1, data_parallel=2,
                     lr=5e-3, warmup_ratio=0.0, seq_length=420)
    b2 = write_yaml(tmp_path / "b2.yaml", data=data, weights=weights, batch_size=2, lr=5e-3, warmup_ratio=0.0,
                    seq_length=420)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
           "-m", "distilled.train.loop", "--backend", "torch", "--config", str(dp2), "--output", str(tmp_path / "ranks"),
           "--steps", "2", "--device", "cpu"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    s1 = run_train(str(dp2), backend="torch", output=str(tmp_path / "ga"), steps=2, device="cpu", quiet=True)
    assert s1["micro_batches_per_rank"] == 2 and s1["global_batch_rows"] == 2
    run_train(str(b2), backend="torch", output=str(tmp_path / "b2"), steps=2, device="cpu", quiet=True)
    logs = {k: [json.loads(x) for x in (tmp_path / k / "loss.jsonl").read_text().splitlines()]
            for k in ("ranks", "ga", "b2")}
    assert [r["loss_tokens"] for r in logs["ranks"]] == [410, 340] == [r["loss_tokens"] for r in logs["ga"]]
    for k in ("ga", "b2"):
        np.testing.assert_allclose([r["loss"] for r in logs[k]], [r["loss"] for r in logs["ranks"]], rtol=1e-6)
        np.testing.assert_allclose([r["grad_norm"] for r in logs[k]], [r["grad_norm"] for r in logs["ranks"]],
                                   rtol=1e-5)
    ref = load_file(str(tmp_path / "ranks" / "final" / "model.safetensors"))
    for k in ("ga", "b2"):
        got = load_file(str(tmp_path / k / "final" / "model.safetensors"))
        for name in ref:
            if name.endswith("k_proj.bias"):  # gradient ~0 by maths: Adam amplifies rounding there
                continue
            rel = np.linalg.norm(got[name].astype(np.float64) - ref[name]) / np.linalg.norm(ref[name].astype(np.float64))
            assert rel < 1e-5, (k, name, rel)
