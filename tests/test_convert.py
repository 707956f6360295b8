"""HF Qwen2 <-> MindFormers legacy Llama checkpoint conversion: names, tied/untied, exactness,
loadability by transformers and by MindFormers' own LlamaForCausalLM (same logits as HF)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import yaml

from distilled.train.convert import (ConversionError, convert_hf_to_mf, convert_mf_to_hf, hf_config_from_mf_yaml,
                               hf_to_mf, load_safetensors_np, mf_to_hf)
from distilled.train.hf_mf_names import hf_name_to_mf, mf_name_to_hf

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hf_untied(tmp_path_factory) -> Path:
    from distilled.train.tiny_model import make_tiny_qwen2

    return make_tiny_qwen2(tmp_path_factory.mktemp("conv") / "untied", seed=1)


@pytest.fixture(scope="module")
def hf_tied(tmp_path_factory) -> Path:
    from distilled.train.tiny_model import TinyQwen2Shape, make_tiny_qwen2

    return make_tiny_qwen2(tmp_path_factory.mktemp("conv") / "tied", TinyQwen2Shape(tie_word_embeddings=True), seed=2)


def _st_names(path: Path) -> list[str]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return [k for k in json.loads(f.read(n)) if k != "__metadata__"]


def test_name_maps_are_inverse_and_cover_qwen2(hf_untied):
    state = load_safetensors_np(hf_untied)
    assert any(k.endswith("q_proj.bias") for k in state)  # Qwen2: qkv bias present
    for name in state:
        assert mf_name_to_hf(hf_name_to_mf(name)) == name
    assert hf_name_to_mf("model.embed_tokens.weight") == "model.tok_embeddings.embedding_weight"
    assert hf_name_to_mf("model.norm.weight") == "model.norm_out.weight"
    assert hf_name_to_mf("model.layers.1.mlp.gate_proj.weight") == "model.layers.1.feed_forward.w1.weight"
    with pytest.raises(KeyError):
        hf_name_to_mf("model.layers.0.self_attn.rotary_emb.inv_freq")


def test_dict_round_trip_exact_untied_and_optimizer_states_skipped(hf_untied):
    state = load_safetensors_np(hf_untied)
    mf = hf_to_mf(state, tie_word_embeddings=False)
    assert "lm_head.weight" in mf and "model.layers.0.attention.wq.bias" in mf
    mf_with_opt = dict(mf, **{"adam_m.lm_head.weight": np.ones(3), "global_step": np.array([5])})
    back = mf_to_hf(mf_with_opt, tie_word_embeddings=False)
    assert set(back) == set(state)
    for k in state:
        assert back[k].dtype == state[k].dtype and np.array_equal(back[k], state[k])


def test_dict_tied_and_bad_inputs(hf_tied):
    state = load_safetensors_np(hf_tied)
    state["lm_head.weight"] = state["model.embed_tokens.weight"].copy()  # some exporters write both
    mf = hf_to_mf(state, tie_word_embeddings=True)
    assert "lm_head.weight" not in mf
    back = mf_to_hf(mf, tie_word_embeddings=True)
    assert "lm_head.weight" not in back
    with pytest.raises(ConversionError, match="no lm_head.weight"):
        hf_to_mf({k: v for k, v in state.items() if k != "lm_head.weight"}, tie_word_embeddings=False)
    bad = dict(state, **{"lm_head.weight": state["model.embed_tokens.weight"] + 1})
    with pytest.raises(ConversionError, match="differs"):
        hf_to_mf(bad, tie_word_embeddings=True)
    with pytest.raises(ConversionError, match="not Qwen2ForCausalLM parameters"):
        hf_to_mf(dict(state, **{"model.foo.weight": np.zeros(1)}), tie_word_embeddings=True)
    with pytest.raises(ConversionError, match="no HF Qwen2 name"):
        mf_to_hf(dict(mf, **{"model.layers.0.attention.w_qkv.weight": np.zeros(1)}), tie_word_embeddings=True)


def test_files_round_trip_loads_in_transformers(hf_untied, tmp_path):
    import torch
    from transformers import Qwen2ForCausalLM

    mf_file = convert_hf_to_mf(hf_untied, tmp_path / "mf")
    assert mf_file.name == "qwen2_mf.safetensors"
    assert "model.tok_embeddings.embedding_weight" in _st_names(mf_file)
    out = convert_mf_to_hf(mf_file, tmp_path / "hf", config=hf_untied)
    a, b = load_safetensors_np(hf_untied), load_safetensors_np(out)
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["torch_dtype"] == "float32"
    ids = torch.tensor([[9707, 1879, 151645, 5, 7]])
    with torch.no_grad():
        ref = Qwen2ForCausalLM.from_pretrained(hf_untied).eval()(ids).logits
        got = Qwen2ForCausalLM.from_pretrained(out).eval()(ids).logits
    assert torch.equal(ref, got)


def test_files_tied_and_config_from_yaml(hf_tied, tmp_path):
    import torch
    from transformers import Qwen2ForCausalLM

    mf_file = convert_hf_to_mf(hf_tied, tmp_path / "m.safetensors")
    assert "lm_head.weight" not in _st_names(mf_file)
    yaml_cfg = hf_config_from_mf_yaml(REPO / "configs" / "finetune_qwen2_5_tiny_cpu.yaml")
    assert yaml_cfg["num_hidden_layers"] == 2 and yaml_cfg["vocab_size"] == 151936
    out = convert_mf_to_hf(mf_file, tmp_path / "hf", config=hf_tied)
    model = Qwen2ForCausalLM.from_pretrained(out).eval()
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ref = Qwen2ForCausalLM.from_pretrained(hf_tied).eval()
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, model(ids).logits)


def test_bf16_bytes_round_trip_and_sharding(tmp_path):
    """bf16 (which numpy cannot hold) survives both directions bit for bit, across shards."""
    import torch
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    hf = {"model.embed_tokens.weight": torch.randn(32, 8, dtype=torch.bfloat16),
          "model.norm.weight": torch.randn(8, dtype=torch.bfloat16),
          "lm_head.weight": torch.randn(32, 8, dtype=torch.bfloat16)}
    for i in range(2):
        for n, shape in [("self_attn.q_proj.weight", (8, 8)), ("self_attn.q_proj.bias", (8,)),
                         ("self_attn.k_proj.weight", (4, 8)), ("self_attn.k_proj.bias", (4,)),
                         ("self_attn.v_proj.weight", (4, 8)), ("self_attn.v_proj.bias", (4,)),
                         ("self_attn.o_proj.weight", (8, 8)), ("mlp.gate_proj.weight", (16, 8)),
                         ("mlp.up_proj.weight", (16, 8)), ("mlp.down_proj.weight", (8, 16)),
                         ("input_layernorm.weight", (8,)), ("post_attention_layernorm.weight", (8,))]:
            hf[f"model.layers.{i}.{n}"] = torch.randn(*shape, dtype=torch.bfloat16)
    src = tmp_path / "src"
    src.mkdir()
    save_file(hf, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 32,
        "tie_word_embeddings": False}))
    mf_file = convert_hf_to_mf(src, tmp_path / "mf")
    out = convert_mf_to_hf(mf_file.parent, tmp_path / "hf", config=src, max_shard_bytes=600)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    back = {}
    for f in sorted(out.glob("*.safetensors")):
        back.update(load_file(str(f)))
    assert set(back) == set(hf)
    assert all(back[k].dtype == torch.bfloat16 and torch.equal(back[k], hf[k]) for k in hf)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with pytest.raises(ConversionError, match="layers"):
        bad_cfg = tmp_path / "bad.json"
        bad_cfg.write_text(json.dumps(dict(json.loads((src / "config.json").read_text()), num_hidden_layers=3)))
        convert_mf_to_hf(mf_file, tmp_path / "hf2", config=bad_cfg)


def test_cli_convert_round_trip_and_errors(hf_untied, tmp_path, capsys):
    from distilled.cli import main

    assert main(["convert", "hf-to-mf", str(hf_untied), str(tmp_path / "mf")]) == 0
    assert main(["convert", "mf-to-hf", str(tmp_path / "mf"), str(tmp_path / "hf"),
                 "--config", str(REPO / "configs" / "finetune_qwen2_5_tiny_cpu.yaml")]) == 0
    a, b = load_safetensors_np(hf_untied), load_safetensors_np(tmp_path / "hf")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert main(["convert", "hf-to-mf", str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_mindformers_model_loads_converted_weights_with_hf_logits(hf_untied):
    """The converted names/shapes are exactly MindFormers' LlamaForCausalLM parameters, and the
    MF model with those weights gives HF's logits (qkv bias, GQA, RoPE theta, RMSNorm eps)."""
    import mindspore as ms
    import torch
    from transformers import Qwen2ForCausalLM

    from distilled.train.mindformers_compat import apply_cpu_shims

    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
    apply_cpu_shims()
    from mindformers import LlamaForCausalLM

    cfg = _mf_llama_config(hf_untied, seq_length=16)
    model = LlamaForCausalLM(cfg)
    mf = hf_to_mf(load_safetensors_np(hf_untied), tie_word_embeddings=False)
    params = {p.name: tuple(p.shape) for p in model.get_parameters()}
    assert set(params) == set(mf)
    assert all(params[k] == mf[k].shape for k in mf)
    not_loaded, _ = ms.load_param_into_net(model, {k: ms.Parameter(ms.Tensor(v), name=k) for k, v in mf.items()})
    assert not not_loaded
    model.set_train(False)
    ids = np.random.RandomState(0).randint(0, 151000, (1, 16)).astype(np.int32)
    logits = model(ms.Tensor(ids))[0].asnumpy().reshape(16, -1)
    with torch.no_grad():
        ref = Qwen2ForCausalLM.from_pretrained(hf_untied).eval()(torch.tensor(ids, dtype=torch.long)).logits[0].numpy()
    assert np.abs(logits - ref).max() < 1e-4


def test_merge_lora_equals_mindformers_lora_forward(hf_untied, tmp_path):
    """A MindFormers PET-LoRA model (q/k/v/o) with non-zero adapters, merged by `distill convert
    merge-lora`, gives the same logits in transformers as the unmerged LoRA model in MindFormers.
    Only the adapter tensors are trainable in the PET model."""
    import mindspore as ms
    import torch
    from safetensors.numpy import save_file
    from transformers import Qwen2ForCausalLM

    from distilled.train.convert import convert_merge_lora
    from distilled.train.mindformers_compat import apply_cpu_shims
    from distilled.cli import main

    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
    apply_cpu_shims()
    from mindformers import LlamaForCausalLM
    from mindformers.pet import LoraConfig, get_pet_model

    cfg = _mf_llama_config(hf_untied, seq_length=8)
    base = LlamaForCausalLM(cfg)
    mf = hf_to_mf(load_safetensors_np(hf_untied), tie_word_embeddings=False)
    ms.load_param_into_net(base, {k: ms.Parameter(ms.Tensor(v), name=k) for k, v in mf.items()})
    pet = LoraConfig(lora_rank=4, lora_alpha=8, lora_dropout=0.0, target_modules=".*wq|.*wk|.*wv|.*wo",
                     param_init_type="float32", compute_dtype="float32")
    model = get_pet_model(base, pet)
    trainable = [p.name for p in model.trainable_params()]
    assert trainable and all(n.endswith(("mindpet_delta_lora_a", "mindpet_delta_lora_b")) for n in trainable)
    assert len(trainable) == 2 * 4 * cfg.num_layers
    rng = np.random.RandomState(0)
    for p in model.trainable_params():  # B starts at 0: give both matrices real values
        p.set_data(ms.Tensor(rng.normal(0, 0.05, p.shape).astype(np.float32)))
    model.set_train(False)
    ids = rng.randint(0, 151000, (1, 8)).astype(np.int32)
    lora_logits = model(ms.Tensor(ids))[0].asnumpy().reshape(8, -1)

    ckpt = tmp_path / "lora_run.safetensors"
    params = {p.name: p.asnumpy() for p in model.get_parameters()}
    # as MindFormers saves it: optimizer moments of the adapters sit beside them, with the same suffixes
    params.update({f"adam_m.{n}": np.ones_like(v) for n, v in params.items() if "mindpet_delta" in n})
    save_file(params, str(ckpt))
    out = convert_merge_lora(ckpt, tmp_path / "merged", config=hf_untied, lora_alpha=8)
    with torch.no_grad():
        merged = Qwen2ForCausalLM.from_pretrained(out).eval()(torch.tensor(ids, dtype=torch.long)).logits[0].numpy()
    assert np.abs(merged - lora_logits).max() < 1e-4
    with torch.no_grad():
        base_logits = Qwen2ForCausalLM.from_pretrained(hf_untied).eval()(torch.tensor(ids, dtype=torch.long)).logits[0]
    assert np.abs(base_logits.numpy() - lora_logits).max() > 1e-3  # the adapters did change the model

    # adapter-only checkpoint + --base, alpha from the LoRA YAML, through the CLI
    adapters = tmp_path / "adapters.safetensors"
    save_file({n: p.asnumpy() for n, p in ((p.name, p) for p in model.trainable_params())}, str(adapters))
    lora_yaml = Path(__file__).resolve().parents[1] / "configs" / "finetune_qwen2_5_tiny_cpu_lora.yaml"
    raw = yaml.safe_load(lora_yaml.read_text())
    raw["model"]["model_config"]["pet_config"]["lora_alpha"] = 8
    yml = tmp_path / "lora.yaml"
    yml.write_text(yaml.safe_dump(raw))
    assert main(["convert", "merge-lora", str(adapters), str(tmp_path / "merged2"), "--config", str(yml),
                 "--base", str(hf_untied)]) == 0
    a, b = load_safetensors_np(out), load_safetensors_np(tmp_path / "merged2")
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert main(["convert", "merge-lora", str(hf_untied), str(tmp_path / "m3"), "--config", str(yml)]) == 2


def _mf_llama_config(hf_dir, seq_length: int):
    """MindFormers' legacy LlamaConfig for the tiny HF Qwen2 in ``hf_dir`` (float32, CPU settings)."""
    from mindformers import LlamaConfig

    hf_cfg = json.loads((hf_dir / "config.json").read_text())
    return LlamaConfig(batch_size=1, seq_length=seq_length, hidden_size=hf_cfg["hidden_size"],
                       num_layers=hf_cfg["num_hidden_layers"], num_heads=hf_cfg["num_attention_heads"],
                       n_kv_heads=hf_cfg["num_key_value_heads"], vocab_size=hf_cfg["vocab_size"],
                       intermediate_size=hf_cfg["intermediate_size"], qkv_has_bias=True, use_flash_attention=False,
                       compute_dtype="float32", layernorm_compute_type="float32", softmax_compute_type="float32",
                       rotary_dtype="float32", param_init_type="float32", use_past=False, pad_token_id=151643,
                       use_rope_slice=True, input_sliced_sig=True, theta=hf_cfg["rope_theta"],
                       rms_norm_eps=hf_cfg["rms_norm_eps"])
