"""``distill parity`` on CPU: MindFormers' legacy Llama vs transformers' Qwen2 on the same tiny
weights and packed batches. It must pass as is, and fail on a perturbed weight and on models that
leak attention across packed documents."""

from __future__ import annotations

import json

import numpy as np
import pytest

from backend_helpers import make_small_qwen2, packed_rows, rows_with_trained_tokens, write_packed, write_yaml
from distilled.train.backends import BACKENDS, register_backend
from distilled.train.backends.base import StepResult, as_micro_batches
from distilled.train.backends.torch_backend import TorchBackend
from distilled.train.parity import TOLERANCES, packing_check, run_parity


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("parity")
    weights = make_small_qwen2(d / "weights")
    data = write_packed(d / "packed", packed_rows(6, 48, seed=0))
    # batch 1 x GA 2: the clean run exercises per-token accumulation on both backends
    cfg = write_yaml(d / "tiny.yaml", lr=5e-3, warmup_ratio=0.34, batch_size=1, grad_accum=2)
    return d, weights, data, cfg


@pytest.fixture(scope="module")
def passing(setup):
    d, weights, data, cfg = setup
    return run_parity(cfg, weights, data, steps=3, report=d / "report", check="all", quiet=True), d / "report"


@pytest.mark.slow
def test_parity_passes_on_same_weights(passing):
    res, report = passing
    assert res["ok"], res["failures"]
    s = res["train"]["summary"]
    tol = TOLERANCES["float32"]
    assert s["loss_rel_diff_step0"] <= tol["loss_rel_step0"]
    assert s["loss_rel_diff_max"] <= tol["loss_rel"]
    assert s["grad_norm_rel_diff_max"] <= tol["grad_norm_rel"]
    assert s["param_drift"]["global_rel"] <= tol["param_drift_rel"]
    assert s["gradient_accumulation_steps"] == 2 and s["global_batch_rows"] == 2
    # every tensor is within its own bound, and the q/v biases (small, start at 0) are bounded tightly
    assert s["tensors_over_bound"] == []
    per = s["param_drift"]["per_tensor_rel"]
    assert len(per) == len(s["tensor_drift_bounds"]) == 2 * 12 + 3
    assert s["tensor_drift_bounds"]["model.layers.0.self_attn.q_proj.bias"] == tol["tensor_drift_rel"]
    assert per["model.layers.0.self_attn.q_proj.bias"] <= tol["tensor_drift_rel"]
    assert s["lr_max_abs_diff"] < 1e-9
    steps = res["train"]["steps"]
    assert len(steps) == 3
    # warmup: lr 0 at step 0 (MindFormers reads the schedule before incrementing), then > 0
    assert steps[0]["lr_mindspore"] == 0.0 and steps[1]["lr_torch"] > 0
    # the weights did move, and identically
    assert steps[2]["loss_torch"] != steps[0]["loss_torch"]
    for name in ("mindspore", "torch"):
        assert res["packing"][name]["ok"], res["packing"][name]
    on_disk = json.loads((report / "parity.json").read_text())
    assert on_disk["ok"] is True and on_disk["train"]["summary"]["steps"] == 3
    md = (report / "parity.md").read_text()
    assert "**PASS**" in md and "Packing check" in md and "tensors past their drift bound" in md
    assert (report / "parity_loss.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_perturbed_weight_fails(setup, tmp_path):
    from safetensors.numpy import load_file, save_file
    import shutil

    d, weights, data, cfg = setup
    bad = tmp_path / "perturbed"
    shutil.copytree(weights, bad)
    st = load_file(str(bad / "model.safetensors"))
    rng = np.random.default_rng(0)
    k = "model.layers.1.mlp.down_proj.weight"
    st[k] = (st[k] + rng.normal(0, 1e-3, st[k].shape)).astype(np.float32)
    save_file(st, str(bad / "model.safetensors"), metadata={"format": "pt"})
    res = run_parity(cfg, weights, data, steps=1, check="train", weights_override={"torch": bad},
                     report=tmp_path / "rep", quiet=True)
    assert not res["ok"]
    assert any("step-0 loss relative difference" in f for f in res["failures"])
    assert "**FAIL**" in (tmp_path / "rep" / "parity.md").read_text()


def test_packing_check_catches_stock_mindformers(setup):
    """Without apply_packed_mask_shim, MindFormers 1.9 adds the 0/1 mask to the scores and ignores
    position_ids: the packed row's loss no longer equals its documents' loss."""
    from distilled.train.loop import load_packed

    d, weights, data, cfg = setup
    rows = load_packed(data)
    try:
        res = packing_check("mindspore", weights, rows, max_rows=1, backend_kwargs={"mindspore": {"packed_shim": False}})
    finally:
        from distilled.train.mindformers_compat import apply_packed_mask_shim

        apply_packed_mask_shim(True)
    assert not res["ok"] and res["max_rel_diff"] > 1e-3


def test_packing_check_catches_torch_leaks(setup):
    from distilled.train.loop import load_packed

    d, weights, data, cfg = setup
    rows = load_packed(data)
    leaky = packing_check("torch", weights, rows, max_rows=1, backend_kwargs={"torch": {"block_mask": False}})
    assert not leaky["ok"] and leaky["max_rel_diff"] > 1e-3
    no_restart = packing_check("torch", weights, rows, max_rows=1, restart_positions=False)
    assert not no_restart["ok"]


def test_cli_packing_torch_only(setup, tmp_path, capsys):
    from distilled.cli import main

    d, weights, data, cfg = setup
    rc = main(["parity", "--config", str(cfg), "--weights", str(weights), "--data", str(data), "--check", "packing",
               "--backends", "torch", "--report", str(tmp_path / "r")])
    assert rc == 0
    assert "packing[torch] PASS" in capsys.readouterr().err
    rc = main(["parity", "--config", str(cfg), "--weights", str(tmp_path / "nope"), "--data", str(data),
               "--check", "packing", "--backends", "torch"])
    assert rc == 2


@pytest.mark.slow
def test_parity_with_lora_on_both_sides(setup, tmp_path):
    """MindFormers' pet_config LoRA (MindPet LoRADense) vs PEFT LoRA: same A, B = 0, same steps."""
    d, weights, data, _ = setup
    cfg = write_yaml(tmp_path / "lora.yaml", lr=1e-2, warmup_ratio=0.0, lora_rank=4)
    res = run_parity(cfg, weights, data, steps=2, check="train", quiet=True)
    assert res["ok"], res["failures"]
    assert res["lora"]["rank"] == 4
    drift = res["train"]["summary"]["param_drift"]
    assert not drift["only_in_first"] and not drift["only_in_second"]


def test_mindspore_lora_trains_only_adapters(setup):
    from distilled.train.backends import get_backend
    from distilled.train.backends.base import LoraSettings, TrainSettings, packed_batch

    d, weights, data, _ = setup
    be = get_backend("mindspore")
    be.load_hf(weights, seq_length=48, batch_size=1)
    be.enable_lora(LoraSettings(rank=4, alpha=8))
    before = be.named_parameters()
    lora_names = [k for k in before if ".lora_" in k]
    assert len(lora_names) == 2 * 4 * 2  # A and B on q/k/v/o in 2 layers
    be.setup_training(TrainSettings(learning_rate=1e-2, total_steps=2))
    be.train_step(packed_batch(packed_rows(1, 48, seed=9)))
    after = be.named_parameters()
    for k in before:
        if ".lora_" not in k:  # frozen base weights
            assert np.array_equal(before[k], after[k]), k
    # B starts at 0, so the first step moves B (A's gradient is B^T... = 0)
    assert all(not np.array_equal(before[k], after[k]) for k in lora_names if ".lora_B" in k)


def test_bf16_packing_check_on_torch_and_clear_mindspore_cpu_error(setup):
    from distilled.train.backends import get_backend
    from distilled.train.loop import load_packed

    d, weights, data, cfg = setup
    rows = load_packed(data)
    tol = TOLERANCES["bfloat16"]["packing_rel"]
    ok = packing_check("torch", weights, rows, dtype="bfloat16", max_rows=1)
    assert ok["ok"] and ok["tolerance"] == tol
    leaky = packing_check("torch", weights, rows, dtype="bfloat16", max_rows=1,
                          backend_kwargs={"torch": {"block_mask": False}})
    assert not leaky["ok"]
    with pytest.raises(ValueError, match="no bfloat16 kernel"):
        get_backend("mindspore").load_hf(weights, dtype="bfloat16")


# ------------------------------------------------------------------ planted bugs
class FrozenQKVBiasTorch(TorchBackend):
    """Planted bug: the q/k/v biases never update (e.g. left out of the optimizer)."""

    def setup_training(self, settings):
        for n, p in self.module.named_parameters():
            if n.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
                p.requires_grad_(False)
        super().setup_training(settings)


class PerMicroBatchMeanTorch(TorchBackend):
    """Planted bug: gradient accumulation that averages each micro-batch's own token mean (the
    pre-fix HF Trainer / MindFormers GradAccumulationCell weighting)."""

    def train_step(self, batch):
        micro = as_micro_batches(batch)
        lr = self.settings.lr_at(self.step_count)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        losses = []
        for mb in micro:
            loss, _, _, _ = self._loss(mb)
            (loss / len(micro)).backward()
            losses.append(float(loss.detach()))
        norm = self._clip()
        self.optimizer.step()
        self.step_count += 1
        return StepResult(self.step_count - 1, sum(losses) / len(losses), norm, lr,
                          sum(mb.num_loss_tokens for mb in micro))


@pytest.fixture
def planted():
    """Register the buggy backends for one test only (the plug-in API a user would use)."""
    added = {"torch_frozen_bias": lambda **kw: FrozenQKVBiasTorch(**kw),
             "torch_ga_mean": lambda **kw: PerMicroBatchMeanTorch(**kw),
             "torch_leaky": lambda **kw: TorchBackend(block_mask=False, **kw),
             "torch_ref": lambda **kw: TorchBackend(**kw)}
    for k, f in added.items():
        register_backend(k, f)
    yield
    for k in added:
        BACKENDS.pop(k, None)


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """Rows with 10, 400, 30 and 350 trained tokens, batch 1 x GA 2."""
    d = tmp_path_factory.mktemp("uneven")
    weights = make_small_qwen2(d / "weights")
    data = write_packed(d / "packed", rows_with_trained_tokens([10, 400, 30, 350], 420, seed=7))
    cfg = write_yaml(d / "ga.yaml", lr=5e-3, warmup_ratio=0.0, batch_size=1, grad_accum=2, seq_length=420)
    return weights, data, cfg


def test_clean_torch_pair_passes_and_each_planted_bug_fails(setup, uneven, planted, tmp_path):
    """The clean reference passes; a frozen q/k/v bias, per-micro-batch GA averaging and a leaked
    mask each fail parity, on the check that should catch them."""
    d, weights, data, cfg = setup
    clean = run_parity(cfg, weights, data, steps=2, check="all", backends=("torch", "torch_ref"), quiet=True)
    assert clean["ok"], clean["failures"]

    frozen = run_parity(cfg, weights, data, steps=2, check="train", backends=("torch", "torch_frozen_bias"),
                        quiet=True)
    assert not frozen["ok"]
    over = frozen["train"]["summary"]["tensors_over_bound"]
    assert {f"model.layers.{i}.self_attn.{m}_proj.bias" for i in (0, 1) for m in "qkv"} <= set(over), over
    # the loss alone would not have caught it within tolerance at step 0
    assert frozen["train"]["summary"]["loss_rel_diff_step0"] <= TOLERANCES["float32"]["loss_rel_step0"]
    assert any("per-tensor drift" in f for f in frozen["failures"])

    gw, gdata, gcfg = uneven
    ga = run_parity(gcfg, gw, gdata, steps=2, check="train", backends=("torch", "torch_ga_mean"), quiet=True)
    assert not ga["ok"]
    assert ga["train"]["summary"]["loss_rel_diff_step0"] > 1e-3  # mean of means vs per-token mean (~4.5e-3)
    assert any("step-0 loss" in f for f in ga["failures"])
    ga_clean = run_parity(gcfg, gw, gdata, steps=2, check="train", backends=("torch", "torch_ref"), quiet=True)
    assert ga_clean["ok"], ga_clean["failures"]

    leak = run_parity(cfg, weights, data, steps=1, check="all", backends=("torch", "torch_leaky"), quiet=True)
    assert not leak["ok"]
    assert leak["packing"]["torch"]["ok"] and not leak["packing"]["torch_leaky"]["ok"]
    assert any(f.startswith("packing[torch_leaky]") for f in leak["failures"])
    assert any("step-0 loss" in f for f in leak["failures"])


class FrozenBiasMindSpore:
    """Planted bug on the MindSpore side: biases excluded from the optimizer."""

    @staticmethod
    def make(**kw):
        from distilled.train.backends.mindspore_backend import MindSporeBackend

        class _Frozen(MindSporeBackend):
            def setup_training(self, settings):
                for p in self.model.get_parameters():
                    if p.name.endswith(("wq.bias", "wk.bias", "wv.bias")):
                        p.requires_grad = False
                super().setup_training(settings)

        return _Frozen(**kw)


@pytest.mark.slow
def test_mindspore_side_frozen_bias_fails_parity(setup, tmp_path):
    d, weights, data, cfg = setup
    register_backend("mindspore_frozen_bias", FrozenBiasMindSpore.make)
    try:
        res = run_parity(cfg, weights, data, steps=2, check="train", backends=("mindspore_frozen_bias", "torch"),
                         quiet=True)
    finally:
        BACKENDS.pop("mindspore_frozen_bias", None)
    assert not res["ok"]
    over = res["train"]["summary"]["tensors_over_bound"]
    assert {f"model.layers.{i}.self_attn.{m}_proj.bias" for i in (0, 1) for m in "qv"} <= set(over), over


@pytest.mark.slow
def test_parity_tied_student(tmp_path):
    """tie_word_embeddings: True through distill parity (MindSpore graph mode vs torch)."""
    weights = make_small_qwen2(tmp_path / "tied", tied=True, seed=5)
    data = write_packed(tmp_path / "packed", packed_rows(4, 48, seed=6))
    cfg = write_yaml(tmp_path / "tied.yaml", lr=5e-3, warmup_ratio=0.0, tied=True)
    res = run_parity(cfg, weights, data, steps=2, check="train", quiet=True)
    assert res["ok"], res["failures"]
    per = res["train"]["summary"]["param_drift"]["per_tensor_rel"]
    assert "lm_head.weight" not in per and "model.embed_tokens.weight" in per
