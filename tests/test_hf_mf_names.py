"""distilled.train.hf_mf_names: the one HF <-> MindFormers table round-trips every key and name."""

from __future__ import annotations

import doctest

import pytest

from distilled.train import hf_mf_names as names
from distilled.train.hf_mf_names import (CONFIG_KEYS, GLOBAL_PARAMS, LAYER_PARAMS, LORA_PARAMS, MODULE_NAMES, SHAPE_KEYS,
                                   check_model_config, hf_config_from_mf_model_config, hf_lora_name_to_mf,
                                   hf_name_to_mf, is_mf_model_weight, mf_lora_name_to_hf, mf_model_config_from_hf,
                                   mf_name_to_hf)

QWEN2_5_7B_HF = {  # Qwen/Qwen2.5-7B-Instruct config.json (the model fields)
    "hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
    "vocab_size": 152064, "intermediate_size": 18944, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "tie_word_embeddings": False, "max_position_embeddings": 32768, "pad_token_id": None,
    "bos_token_id": 151643, "eos_token_id": 151645,
}


def test_module_doctest():
    assert doctest.testmod(names).failed == 0


def test_every_config_key_round_trips():
    mc = mf_model_config_from_hf(QWEN2_5_7B_HF)
    assert mc["qkv_has_bias"] is True
    hf = hf_config_from_mf_model_config(mc)
    for k in CONFIG_KEYS:
        if k.mf == "pad_token_id":  # never written to config.json (the tokenizer's)
            assert "pad_token_id" not in hf and mc["pad_token_id"] == 0
            continue
        assert hf[k.hf] == QWEN2_5_7B_HF[k.hf], k
        assert type(hf[k.hf]) is k.cast, k
    assert mf_model_config_from_hf(hf) == {**mc, "pad_token_id": 0}
    assert hf["architectures"] == ["Qwen2ForCausalLM"] and hf["model_type"] == "qwen2"


def test_config_keys_are_unique_and_cover_the_shape():
    assert len({k.mf for k in CONFIG_KEYS}) == len({k.hf for k in CONFIG_KEYS}) == len(CONFIG_KEYS)
    assert {k.mf for k in SHAPE_KEYS} == {"hidden_size", "num_layers", "num_heads", "n_kv_heads", "vocab_size",
                                         "intermediate_size", "rms_norm_eps", "theta", "tie_word_embeddings"}


def test_defaults_each_direction():
    mc = {"hidden_size": 8, "num_layers": 2, "num_heads": 4, "vocab_size": 32, "intermediate_size": 16,
          "seq_length": 256}
    hf = hf_config_from_mf_model_config(mc)
    assert (hf["num_key_value_heads"], hf["max_position_embeddings"], hf["rope_theta"], hf["rms_norm_eps"],
            hf["tie_word_embeddings"], hf["bos_token_id"], hf["eos_token_id"]) == (4, 256, 10000.0, 1e-6, False,
                                                                                   151643, 151645)
    back = mf_model_config_from_hf({"hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 4,
                                    "vocab_size": 32, "intermediate_size": 16})
    assert (back["n_kv_heads"], back["max_position_embedding"], back["theta"], back["pad_token_id"]) == (
        None, 4096, 10000.0, 0)


def test_missing_required_key_is_named():
    with pytest.raises(ValueError, match=r"cfg.yaml: model.model_config lacks \['vocab_size'\]"):
        hf_config_from_mf_model_config({"hidden_size": 8, "num_layers": 2, "num_heads": 4, "intermediate_size": 16},
                                       where="cfg.yaml: model.model_config")


def test_check_model_config_names_both_values():
    mc = mf_model_config_from_hf(QWEN2_5_7B_HF)
    check_model_config(mc, QWEN2_5_7B_HF, "w/config.json")
    with pytest.raises(ValueError, match=r"model_config.theta=10000.0 but config.json rope_theta=1000000.0"):
        check_model_config({**mc, "theta": 10000.0}, QWEN2_5_7B_HF, "w/config.json")


def test_every_parameter_name_round_trips():
    for hf_suffix, mf_suffix in LAYER_PARAMS:
        for layer in (0, 27):
            hf, mf = f"model.layers.{layer}.{hf_suffix}", f"model.layers.{layer}.{mf_suffix}"
            assert hf_name_to_mf(hf) == mf and mf_name_to_hf(mf) == hf
            assert is_mf_model_weight(mf)
    for hf, mf in GLOBAL_PARAMS:
        assert hf_name_to_mf(hf) == mf and mf_name_to_hf(mf) == hf
    assert len({m for _, m in LAYER_PARAMS}) == len(LAYER_PARAMS)


def test_lora_names_round_trip_for_every_module():
    for mf_module, hf_module in MODULE_NAMES.items():
        section_hf = "self_attn" if hf_module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        section_mf = "attention" if mf_module.startswith("w") and mf_module[1] in "qkvo" else "feed_forward"
        for hf_suffix, mf_suffix in LORA_PARAMS:
            hf = f"model.layers.1.{section_hf}.{hf_module}.{hf_suffix}"
            mf = f"model.layers.1.{section_mf}.{mf_module}.{mf_suffix}"
            assert hf_lora_name_to_mf(hf) == mf and mf_lora_name_to_hf(mf) == hf
    assert mf_lora_name_to_hf("model.layers.0.attention.wq.weight") is None
    assert hf_lora_name_to_mf("model.layers.0.self_attn.q_proj.weight") is None


def test_unknown_names_are_errors_not_copies():
    for bad in ("model.layers.0.attention.w_qkv.weight", "model.output.weight", "adam_m.lm_head.weight"):
        with pytest.raises(KeyError):
            mf_name_to_hf(bad)
        assert not is_mf_model_weight(bad)
    with pytest.raises(KeyError):
        hf_name_to_mf("model.layers.0.self_attn.rotary_emb.inv_freq")
