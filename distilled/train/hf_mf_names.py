"""The one HF ``Qwen2ForCausalLM`` <-> MindFormers legacy ``LlamaForCausalLM`` table.

Why one module: the same fact -- "MindFormers calls ``rope_theta`` ``theta``", "HF's
``self_attn.q_proj`` is MindFormers' ``attention.wq``" -- was written in five places (the
converter, both training backends, ``distill train``'s key list and the LoRA target translation),
and a rename upstream had to be made in all of them. Here each fact is one row:

- :data:`CONFIG_KEYS`: ``model.model_config`` key <-> ``config.json`` key, whether it fixes the
  model's shape (and so must agree between the YAML and the weights), and the default each side
  assumes when the key is absent.
- :data:`LAYER_PARAMS` / :data:`GLOBAL_PARAMS`: parameter names (biases on q/k/v only, as Qwen2).
- :data:`LORA_PARAMS`: MindPet ``LoRADense`` adapter suffixes <-> PEFT's.

Unknown names are errors (``KeyError``), never silent copies: MindFormers' own ``convert_name`` is a
chain of substring replaces that would also rename any name containing ``output.``.

>>> hf_name_to_mf("model.layers.3.self_attn.k_proj.bias")
'model.layers.3.attention.wk.bias'
>>> mf_lora_name_to_hf("model.layers.0.attention.wq.mindpet_delta_lora_a")
'model.layers.0.self_attn.q_proj.lora_A.weight'
>>> mf_model_config_from_hf({"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
...     "vocab_size": 16, "intermediate_size": 4, "rope_theta": 1e6})["theta"]
1000000.0
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

__all__ = [
    "ConfigKey", "CONFIG_KEYS", "SHAPE_KEYS", "mf_model_config_from_hf", "hf_config_from_mf_model_config",
    "check_model_config", "LAYER_PARAMS", "GLOBAL_PARAMS", "LORA_PARAMS", "MODULE_NAMES",
    "HF_EMBED", "MF_EMBED", "LM_HEAD", "hf_name_to_mf", "mf_name_to_hf", "is_mf_model_weight",
    "mf_lora_name_to_hf", "hf_lora_name_to_mf",
]


# --------------------------------------------------------------------------------------------
# model config keys
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ConfigKey:
    """One ``model.model_config`` key and its ``config.json`` twin.

    ``shape``: the key fixes the model (a YAML that disagrees with the weights is refused).
    ``cast``: the type written into ``config.json``. ``hf_default``: the ``config.json`` value when
    the YAML lacks the key (a callable gets the YAML's ``model_config``; ``None``: the YAML must
    give it). ``mf_default``: the ``model_config`` value when ``config.json`` lacks it.
    """

    mf: str
    hf: str
    cast: type
    shape: bool = False
    hf_default: Any = None
    mf_default: Any = None


CONFIG_KEYS: tuple[ConfigKey, ...] = (
    ConfigKey("hidden_size", "hidden_size", int, shape=True),
    ConfigKey("num_layers", "num_hidden_layers", int, shape=True),
    ConfigKey("num_heads", "num_attention_heads", int, shape=True),
    # absent: as many KV heads as query heads (MHA), on both sides
    ConfigKey("n_kv_heads", "num_key_value_heads", int, shape=True, hf_default=lambda mc: mc["num_heads"]),
    ConfigKey("vocab_size", "vocab_size", int, shape=True),
    ConfigKey("intermediate_size", "intermediate_size", int, shape=True),
    ConfigKey("rms_norm_eps", "rms_norm_eps", float, shape=True, hf_default=1e-6, mf_default=1e-6),
    ConfigKey("theta", "rope_theta", float, shape=True, hf_default=10000.0, mf_default=10000.0),
    ConfigKey("tie_word_embeddings", "tie_word_embeddings", bool, shape=True, hf_default=False, mf_default=False),
    ConfigKey("max_position_embedding", "max_position_embeddings", int,
              hf_default=lambda mc: mc.get("seq_length") or 32768, mf_default=4096),
    ConfigKey("pad_token_id", "pad_token_id", int, mf_default=0),
    ConfigKey("bos_token_id", "bos_token_id", int, hf_default=151643, mf_default=0),
    ConfigKey("eos_token_id", "eos_token_id", int, hf_default=151645, mf_default=0),
)
# keys that fix the model's shape: the YAML and config.json must agree on each
SHAPE_KEYS: tuple[ConfigKey, ...] = tuple(k for k in CONFIG_KEYS if k.shape)
# never written into config.json (HF takes the pad token from the tokenizer)
_MF_ONLY = {"pad_token_id"}
# HF-only fields of a Qwen2 config.json that MindFormers has no key for
_HF_FIXED = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
             "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True, "use_sliding_window": False}


def mf_model_config_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    """A legacy ``LlamaConfig`` dict for an HF Qwen2 ``config.json`` (Qwen2 has q/k/v biases).

    A key absent (or null) in ``config.json`` takes :attr:`ConfigKey.mf_default`; ``n_kv_heads``
    stays ``None``, which ``LlamaConfig`` reads as one KV head per query head.
    """
    out: dict[str, Any] = {}
    for k in CONFIG_KEYS:
        value = hf.get(k.hf)
        out[k.mf] = k.mf_default if value is None else value
    out["qkv_has_bias"] = True
    return out


def hf_config_from_mf_model_config(mc: Mapping[str, Any], torch_dtype: str = "bfloat16",
                                   where: str = "model.model_config") -> dict[str, Any]:
    """An HF ``Qwen2Config`` dict from a MindFormers ``model_config`` (``ValueError`` names what lacks).

    Why: ``mf-to-hf`` output must load in transformers and vLLM, which need ``config.json``.
    """
    missing = [k.mf for k in CONFIG_KEYS if k.hf_default is None and k.mf not in _MF_ONLY and mc.get(k.mf) is None]
    if missing:
        raise ValueError(f"{where} lacks {missing}")
    out: dict[str, Any] = dict(_HF_FIXED)
    for k in CONFIG_KEYS:
        if k.mf in _MF_ONLY:
            continue
        value = mc.get(k.mf)
        if value is None:
            value = k.hf_default(mc) if callable(k.hf_default) else k.hf_default
        out[k.hf] = k.cast(value)
    out["torch_dtype"] = torch_dtype
    return out


def check_model_config(model_config: Mapping[str, Any] | None, hf_config: Mapping[str, Any], where: str) -> None:
    """Refuse weights whose shape differs from the YAML's ``model_config`` (names both values)."""
    if not model_config:
        return
    bad = []
    for k in SHAPE_KEYS:
        if k.mf in model_config and k.hf in hf_config:
            a, b = model_config[k.mf], hf_config[k.hf]
            if isinstance(b, float) or isinstance(a, float):
                ok = abs(float(a) - float(b)) <= 1e-12 * max(1.0, abs(float(b)))
            else:
                ok = a == b
            if not ok:
                bad.append(f"model_config.{k.mf}={a!r} but config.json {k.hf}={b!r}")
    if bad:
        raise ValueError(f"{where}: the YAML's model does not match the weights: " + "; ".join(bad))


# --------------------------------------------------------------------------------------------
# parameter names
# --------------------------------------------------------------------------------------------

# Per-layer suffixes (HF, MindFormers). Biases exist on q/k/v only (Qwen2).
LAYER_PARAMS: tuple[tuple[str, str], ...] = (
    ("self_attn.q_proj.weight", "attention.wq.weight"),
    ("self_attn.q_proj.bias", "attention.wq.bias"),
    ("self_attn.k_proj.weight", "attention.wk.weight"),
    ("self_attn.k_proj.bias", "attention.wk.bias"),
    ("self_attn.v_proj.weight", "attention.wv.weight"),
    ("self_attn.v_proj.bias", "attention.wv.bias"),
    ("self_attn.o_proj.weight", "attention.wo.weight"),
    ("mlp.gate_proj.weight", "feed_forward.w1.weight"),
    ("mlp.down_proj.weight", "feed_forward.w2.weight"),
    ("mlp.up_proj.weight", "feed_forward.w3.weight"),
    ("input_layernorm.weight", "attention_norm.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
)
HF_EMBED = "model.embed_tokens.weight"
MF_EMBED = "model.tok_embeddings.embedding_weight"
LM_HEAD = "lm_head.weight"
# Whole-model names (HF, MindFormers). With tied embeddings MindFormers has no separate lm_head.
GLOBAL_PARAMS: tuple[tuple[str, str], ...] = (
    (HF_EMBED, MF_EMBED),
    ("model.norm.weight", "model.norm_out.weight"),
    (LM_HEAD, LM_HEAD),
)
# LoRA adapter suffixes (PEFT, MindPet LoRADense) after the module name
LORA_PARAMS: tuple[tuple[str, str], ...] = (
    ("lora_A.weight", "mindpet_delta_lora_a"),
    ("lora_B.weight", "mindpet_delta_lora_b"),
)
# MindFormers module name -> HF module name (LoRA target_modules), read off LAYER_PARAMS
MODULE_NAMES: dict[str, str] = {m.split(".")[-2]: h.split(".")[-2] for h, m in LAYER_PARAMS
                                if h.endswith("_proj.weight")}

_HF2MF_LAYER = dict(LAYER_PARAMS)
_MF2HF_LAYER = {m: h for h, m in LAYER_PARAMS}
_HF2MF_GLOBAL = dict(GLOBAL_PARAMS)
_MF2HF_GLOBAL = {m: h for h, m in GLOBAL_PARAMS}
LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _rename(name: str, glob: Mapping[str, str], layer: Mapping[str, str]) -> str:
    if name in glob:
        return glob[name]
    m = LAYER_RE.match(name)
    if m and m.group(2) in layer:
        return f"model.layers.{m.group(1)}.{layer[m.group(2)]}"
    raise KeyError(name)


def hf_name_to_mf(name: str) -> str:
    """Map one HF Qwen2 parameter name to MindFormers' legacy Llama name (KeyError if unknown)."""
    return _rename(name, _HF2MF_GLOBAL, _HF2MF_LAYER)


def mf_name_to_hf(name: str) -> str:
    """Map one MindFormers legacy Llama parameter name to the HF Qwen2 name (KeyError if unknown).

    >>> mf_name_to_hf("model.tok_embeddings.embedding_weight")
    'model.embed_tokens.weight'
    """
    return _rename(name, _MF2HF_GLOBAL, _MF2HF_LAYER)


def is_mf_model_weight(name: str) -> bool:
    """True for a model parameter name, False for optimizer/trainer state that MindFormers saves in
    the same checkpoint (``adam_m.*``, ``adam_v.*``, ``global_step``, ``scale_sense``, ...)."""
    try:
        mf_name_to_hf(name)
        return True
    except KeyError:
        return False


def _lora_rename(name: str, pairs: tuple[tuple[str, str], ...], rename: Callable[[str], str]) -> str | None:
    """Rename the adapter's module through its ``.weight`` (the module names are LAYER_PARAMS')."""
    for src_suffix, dst_suffix in pairs:
        if name.endswith("." + src_suffix):
            module = rename(name[: -len(src_suffix)] + "weight")[: -len("weight")]
            return module + dst_suffix
    return None


def mf_lora_name_to_hf(name: str) -> str | None:
    """``...attention.wq.mindpet_delta_lora_a`` -> ``...self_attn.q_proj.lora_A.weight``; ``None``
    for a name that is not a LoRA adapter (KeyError for an adapter on an unknown module)."""
    return _lora_rename(name, tuple((m, h) for h, m in LORA_PARAMS), mf_name_to_hf)


def hf_lora_name_to_mf(name: str) -> str | None:
    """``...self_attn.q_proj.lora_A.weight`` -> ``...attention.wq.mindpet_delta_lora_a``; ``None``
    for a name that is not a LoRA adapter."""
    return _lora_rename(name, LORA_PARAMS, hf_name_to_mf)
