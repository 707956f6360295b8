"""HF ``Qwen2ForCausalLM`` safetensors <-> MindFormers legacy ``LlamaForCausalLM`` parameter names.

Why: MindFormers 1.9 trains Qwen2.5 through its legacy Llama model, whose parameters are named
``model.layers.0.attention.wq.weight`` where HF says ``model.layers.0.self_attn.q_proj.weight``.
Users start from HF weights and must end with HF weights (transformers, vLLM, lighteval). MF's own
``convert_name`` is a chain of substring replaces (``'output.'`` -> ``'lm_head.'`` would also hit any
name containing ``output.``) and its reverse script writes a torch ``.bin`` without ``config.json``.
Here the mapping is an explicit per-layer table, unknown names are errors (not silent copies),
tied embeddings are handled both ways, and the file-level converters rename tensors *inside* the
safetensors bytes, so every dtype (bf16 included, which numpy lacks) round-trips bit for bit.

Library::

    hf_to_mf(state, tie_word_embeddings)      # dict[str, np.ndarray] -> dict (MF names)
    mf_to_hf(state, tie_word_embeddings)      # dict (MF names, optimizer states ignored) -> dict (HF)
    convert_hf_to_mf(src_dir, dst)            # HF model dir -> MF safetensors (file or dir)
    convert_mf_to_hf(src, dst_dir, config=…)  # MF safetensors (file/dir) -> HF model dir + config.json

CLI: ``distill convert hf-to-mf SRC_DIR DST``, ``distill convert mf-to-hf SRC DST_DIR --config
YAML|HF_DIR`` and ``distill convert merge-lora SRC DST_DIR --config LORA_YAML [--base HF_DIR]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from distilled.train.hf_mf_names import (HF_EMBED, LAYER_RE, LM_HEAD, LORA_PARAMS, MF_EMBED, hf_config_from_mf_model_config,
                                   hf_name_to_mf, is_mf_model_weight, mf_name_to_hf)
from distilled.settings import add_arguments, from_args, option

__all__ = [
    "hf_to_mf",
    "mf_to_hf",
    "convert_hf_to_mf",
    "convert_mf_to_hf",
    "hf_config_from_mf_yaml",
    "ConversionError",
    "merge_lora",
    "convert_merge_lora",
    "register_cli",
]


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message names the file and tensor."""


def _looks_like_model_param(name: str) -> bool:
    return name.startswith(("model.", "lm_head."))


def _equal(a: Any, b: Any) -> bool:
    import numpy as np

    return a.shape == b.shape and a.dtype == b.dtype and bool(np.array_equal(a, b))


def hf_to_mf(state: dict[str, Any], tie_word_embeddings: bool) -> dict[str, Any]:
    """Rename an HF ``Qwen2ForCausalLM`` state dict to MindFormers legacy Llama names.

    Arrays are passed through untouched (no copy, no dtype change), so the round trip is exact.
    With tied embeddings MindFormers shares one parameter (``model.tok_embeddings.embedding_weight``)
    and has no separate ``lm_head.weight``: an HF ``lm_head.weight`` equal to the embedding is
    dropped, a different one is an error. Untied models must carry ``lm_head.weight``.

    >>> import numpy as np
    >>> sorted(hf_to_mf({"model.embed_tokens.weight": np.zeros((4, 2)),
    ...                  "model.norm.weight": np.ones(2)}, tie_word_embeddings=True))
    ['model.norm_out.weight', 'model.tok_embeddings.embedding_weight']
    """
    out: dict[str, Any] = {}
    unknown = []
    for name, value in state.items():
        if name == LM_HEAD and tie_word_embeddings:
            emb = state.get(HF_EMBED)
            if emb is not None and not _equal(emb, value):
                raise ConversionError(
                    "tie_word_embeddings is True but lm_head.weight differs from model.embed_tokens.weight; "
                    "convert with tie_word_embeddings=False (model.model_config.tie_word_embeddings: False)")
            continue
        try:
            out[hf_name_to_mf(name)] = value
        except KeyError:
            unknown.append(name)
    if unknown:
        raise ConversionError(f"{len(unknown)} tensor(s) are not Qwen2ForCausalLM parameters: {unknown[:5]}")
    if HF_EMBED not in state:
        raise ConversionError(f"missing {HF_EMBED}")
    if not tie_word_embeddings and LM_HEAD not in state:
        raise ConversionError("tie_word_embeddings is False but the checkpoint has no lm_head.weight "
                              "(a tied model? pass tie_word_embeddings=True)")
    return out


def mf_to_hf(state: dict[str, Any], tie_word_embeddings: bool) -> dict[str, Any]:
    """Rename a MindFormers legacy Llama state dict to HF ``Qwen2ForCausalLM`` names.

    Optimizer and trainer states saved beside the weights (``adam_m.*``, ``global_step``, ...) are
    skipped; a ``model.*``/``lm_head.*`` name that is not a known parameter is an error (it would
    otherwise vanish from the exported model). Tied: the HF file holds only the embedding
    (transformers re-ties ``lm_head`` on load); a separate MF ``lm_head.weight`` must equal it.

    >>> import numpy as np
    >>> sorted(mf_to_hf({"model.tok_embeddings.embedding_weight": np.zeros((4, 2)),
    ...                  "lm_head.weight": np.ones((4, 2)), "adam_m.lm_head.weight": np.ones((4, 2))},
    ...                 tie_word_embeddings=False))
    ['lm_head.weight', 'model.embed_tokens.weight']
    """
    out: dict[str, Any] = {}
    unknown = []
    for name, value in state.items():
        if name == LM_HEAD and tie_word_embeddings:
            emb = state.get(MF_EMBED)
            if emb is not None and not _equal(emb, value):
                raise ConversionError("tie_word_embeddings is True but lm_head.weight differs from the embedding")
            continue
        try:
            out[mf_name_to_hf(name)] = value
        except KeyError:
            if _looks_like_model_param(name):
                unknown.append(name)
    if unknown:
        raise ConversionError(f"{len(unknown)} model tensor(s) have no HF Qwen2 name: {unknown[:5]} "
                              "(qkv_concat checkpoints, w_qkv/w_gate_hidden, are not supported: train with "
                              "qkv_concat: False)")
    if MF_EMBED not in state:
        raise ConversionError(f"missing {MF_EMBED} (is this a MindFormers LlamaForCausalLM checkpoint?)")
    if not tie_word_embeddings and LM_HEAD not in state:
        raise ConversionError("tie_word_embeddings is False but the checkpoint has no lm_head.weight")
    return out


# --------------------------------------------------------------------------------------------
# safetensors at the byte level: rename without decoding (bf16-safe, exact, streaming)
# --------------------------------------------------------------------------------------------

def _read_header(path: Path) -> tuple[dict, int]:
    """Return (header dict, byte offset where tensor data starts) of a safetensors file."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ConversionError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise ConversionError(f"{path}: not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except ValueError as exc:
            raise ConversionError(f"{path}: not a safetensors file ({exc})") from exc
    return header, 8 + n


def _safetensors_files(src: Path) -> list[Path]:
    if src.is_file():
        return [src]
    if src.is_dir():
        files = sorted(src.glob("*.safetensors"))
        if files:
            return files
        raise ConversionError(f"{src}: no *.safetensors files")
    raise ConversionError(f"{src}: no such file or directory")


def _tensor_bytes(path: Path, data_start: int, info: dict) -> bytes:
    begin, end = info["data_offsets"]
    with open(path, "rb") as f:
        f.seek(data_start + begin)
        return f.read(end - begin)


def _write_renamed(dst: Path, items: list[tuple[str, Path, int, dict]], metadata: dict | None) -> int:
    """Write ``items`` (new_name, src_file, src_data_start, src_info) to ``dst`` atomically.

    Returns the number of data bytes. Tensors keep their dtype and shape; data is streamed.
    """
    from distilled.io_utils import atomic_write

    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, _, _, info in items:
        size = info["data_offsets"][1] - info["data_offsets"][0]
        header[name] = {"dtype": info["dtype"], "shape": info["shape"], "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * ((8 - len(blob) % 8) % 8)  # align data to 8 bytes, as safetensors does
    with atomic_write(dst, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, src, start, info in items:
            begin, end = info["data_offsets"]
            with open(src, "rb") as s:
                s.seek(start + begin)
                remaining = end - begin
                while remaining:
                    chunk = s.read(min(remaining, 64 << 20))
                    if not chunk:
                        raise ConversionError(f"{src}: truncated tensor data")
                    f.write(chunk)
                    remaining -= len(chunk)
    return offset


def _collect(files: list[Path]) -> dict[str, tuple[Path, int, dict]]:
    tensors: dict[str, tuple[Path, int, dict]] = {}
    for path in files:
        header, start = _read_header(path)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if name in tensors:
                raise ConversionError(f"{path}: tensor {name} also in {tensors[name][0]}")
            tensors[name] = (path, start, info)
    return tensors


def _byte_equal(a: tuple[Path, int, dict], b: tuple[Path, int, dict]) -> bool:
    ia, ib = a[2], b[2]
    if ia["dtype"] != ib["dtype"] or ia["shape"] != ib["shape"]:
        return False
    return _tensor_bytes(a[0], a[1], ia) == _tensor_bytes(b[0], b[1], ib)


def _rename_plan(tensors: dict[str, tuple[Path, int, dict]], direction: str,
                 tie_word_embeddings: bool, where: str) -> list[tuple[str, Path, int, dict]]:
    """Apply hf_to_mf/mf_to_hf naming rules to header entries (same checks, no data decoded)."""
    rename = hf_name_to_mf if direction == "hf2mf" else mf_name_to_hf
    embed = HF_EMBED if direction == "hf2mf" else MF_EMBED
    plan, unknown = [], []
    for name, (path, start, info) in tensors.items():
        if name == LM_HEAD and tie_word_embeddings:
            if embed in tensors and not _byte_equal(tensors[embed], tensors[name]):
                raise ConversionError(f"{where}: tie_word_embeddings is True but lm_head.weight differs from {embed}")
            continue
        try:
            plan.append((rename(name), path, start, info))
        except KeyError:
            if direction == "hf2mf" or _looks_like_model_param(name):
                unknown.append(name)
    if unknown:
        raise ConversionError(f"{where}: {len(unknown)} tensor(s) with no mapping, e.g. {unknown[:5]}")
    if embed not in tensors:
        raise ConversionError(f"{where}: missing {embed}")
    if not tie_word_embeddings and LM_HEAD not in tensors:
        raise ConversionError(f"{where}: tie_word_embeddings is False but there is no lm_head.weight")
    return plan


def _shard_plan(plan: list[tuple[str, Path, int, dict]], max_shard_bytes: int) -> list[list]:
    shards: list[list] = [[]]
    size = 0
    for item in plan:
        n = item[3]["data_offsets"][1] - item[3]["data_offsets"][0]
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += n
    return shards


def _layer_sort_key(item: tuple) -> tuple:
    m = re.match(r"^model\.layers\.(\d+)\.", item[0])
    return (int(m.group(1)) if m else (-1 if item[0].startswith("model.embed") else 1 << 30), item[0])


def convert_hf_to_mf(src_dir: str | os.PathLike, dst: str | os.PathLike,
                     tie_word_embeddings: bool | None = None) -> Path:
    """Convert an HF Qwen2 model directory (``config.json`` + ``*.safetensors``) to one MindFormers
    safetensors file.

    ``dst`` ending in ``.safetensors`` is the output file; otherwise it is a directory and the file
    is ``dst/qwen2_mf.safetensors`` (point ``load_checkpoint:`` at that directory, with
    ``load_ckpt_format: safetensors`` and ``auto_trans_ckpt: True`` for parallel runs).
    ``tie_word_embeddings`` defaults to ``config.json``'s value.
    """
    src = Path(src_dir)
    if not src.exists():
        raise ConversionError(f"{src}: no such file or directory")
    if tie_word_embeddings is None:
        cfg_path = src / "config.json" if src.is_dir() else src.parent / "config.json"
        if not cfg_path.exists():
            raise ConversionError(f"{cfg_path}: missing; pass --tie-word-embeddings/--untied explicitly")
        tie_word_embeddings = bool(json.loads(cfg_path.read_text()).get("tie_word_embeddings", False))
    files = _safetensors_files(src)
    plan = _rename_plan(_collect(files), "hf2mf", tie_word_embeddings, str(src))
    plan.sort(key=_layer_sort_key)
    dst = Path(dst)
    out = dst if dst.suffix == ".safetensors" else dst / "qwen2_mf.safetensors"
    _write_renamed(out, plan, {"format": "ms", "converted_from": "hf_qwen2"})
    return out


def hf_config_from_mf_yaml(yaml_path: str | os.PathLike, torch_dtype: str = "bfloat16") -> dict:
    """Build an HF ``Qwen2Config`` dict from a MindFormers YAML's ``model.model_config``.

    Why: ``mf-to-hf`` output must load in transformers and vLLM, which need ``config.json``.
    """
    import yaml

    cfg = yaml.safe_load(Path(yaml_path).read_text())
    try:
        mc = cfg["model"]["model_config"]
    except (KeyError, TypeError) as exc:
        raise ConversionError(f"{yaml_path}: no model.model_config block") from exc
    try:
        return hf_config_from_mf_model_config(mc, torch_dtype, where=f"{yaml_path}: model.model_config")
    except ValueError as exc:
        raise ConversionError(str(exc)) from exc


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "generation_config.json")
_ST_DTYPE_TO_TORCH = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def convert_mf_to_hf(src: str | os.PathLike, dst_dir: str | os.PathLike, config: str | os.PathLike,
                     tie_word_embeddings: bool | None = None, tokenizer_dir: str | os.PathLike | None = None,
                     max_shard_bytes: int = 5 << 30, eval_run: str | os.PathLike | None = None,
                     recipe: str | None = None, base_model: str | None = None, data: str | None = None) -> Path:
    """Convert a MindFormers safetensors checkpoint (a file, or a directory of unified files) to an
    HF model directory: ``model*.safetensors`` (+ index when sharded), ``config.json`` and, when
    given, the tokenizer files. Optimizer states in the checkpoint are skipped.

    ``config`` is the training YAML (its ``model.model_config``) or an HF directory / config.json to
    copy. The output directory appears atomically. Beside the weights it writes
    ``generation_config.json`` (``<|im_end|>`` first in ``eos_token_id``) and a model card
    ``README.md`` naming base, recipe, data, the YAML's training settings and, with ``eval_run``
    (a ``distill eval`` output folder), its results (:mod:`distilled.train.model_card`).
    """
    from distilled.io_utils import atomic_dir

    src = Path(src)
    files = _safetensors_files(src)
    tensors = _collect(files)
    cfg_src = Path(config)
    if cfg_src.suffix in {".yaml", ".yml"}:
        hf_cfg = hf_config_from_mf_yaml(cfg_src)
    else:
        cfg_file = cfg_src / "config.json" if cfg_src.is_dir() else cfg_src
        if not cfg_file.exists():
            raise ConversionError(f"{cfg_file}: missing (give the training YAML or an HF model dir)")
        hf_cfg = json.loads(cfg_file.read_text())
    if tie_word_embeddings is None:
        tie_word_embeddings = bool(hf_cfg.get("tie_word_embeddings", False))
    hf_cfg["tie_word_embeddings"] = tie_word_embeddings
    plan = _rename_plan(tensors, "mf2hf", tie_word_embeddings, str(src))
    plan.sort(key=_layer_sort_key)
    dtypes = {item[3]["dtype"] for item in plan}
    if len(dtypes) == 1 and next(iter(dtypes)) in _ST_DTYPE_TO_TORCH:
        hf_cfg["torch_dtype"] = _ST_DTYPE_TO_TORCH[next(iter(dtypes))]
    # shape checks against the config: catch a YAML that does not match the checkpoint
    emb = tensors[MF_EMBED][2]["shape"]
    if list(emb) != [hf_cfg["vocab_size"], hf_cfg["hidden_size"]]:
        raise ConversionError(f"{src}: embedding shape {emb} does not match config vocab_size/hidden_size "
                              f"[{hf_cfg['vocab_size']}, {hf_cfg['hidden_size']}]")
    n_layers = len({int(m.group(1)) for n in tensors if (m := LAYER_RE.match(n)) and is_mf_model_weight(n)})
    if n_layers != hf_cfg["num_hidden_layers"]:
        raise ConversionError(f"{src}: checkpoint has {n_layers} layers, config says {hf_cfg['num_hidden_layers']}")

    dst_dir = Path(dst_dir)
    shards = _shard_plan(plan, max_shard_bytes)
    with atomic_dir(dst_dir) as tmp:
        if len(shards) == 1:
            _write_renamed(tmp / "model.safetensors", shards[0], {"format": "pt"})
        else:
            weight_map, total = {}, 0
            for i, shard in enumerate(shards, start=1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                total += _write_renamed(tmp / fname, shard, {"format": "pt"})
                weight_map.update({item[0]: fname for item in shard})
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        if tokenizer_dir is not None:
            for name in _TOKENIZER_FILES:
                f = Path(tokenizer_dir) / name
                if f.is_file():
                    shutil.copy2(f, tmp / name)
        from distilled.train.model_card import write_export_extras

        write_export_extras(tmp, hf_cfg, train_yaml=cfg_src if cfg_src.suffix in {".yaml", ".yml"} else None,
                            tokenizer_dir=tokenizer_dir, recipe_name=recipe, base_model=base_model, data=data,
                            eval_run=eval_run)
    return dst_dir


def load_safetensors_np(path: str | os.PathLike) -> dict[str, Any]:
    """Read every tensor of one or more safetensors files as numpy arrays (float32/16 etc.)."""
    from safetensors.numpy import load_file

    out: dict[str, Any] = {}
    for f in _safetensors_files(Path(path)):
        out.update(load_file(str(f)))
    return out


# --------------------------------------------------------------------------------------------
# LoRA (MindFormers PET / mindpet LoRADense) merge
# --------------------------------------------------------------------------------------------

LORA_A, LORA_B = ("." + mf for _hf, mf in LORA_PARAMS)  # ".mindpet_delta_lora_a", ".mindpet_delta_lora_b"


def merge_lora(state: dict[str, Any], lora_alpha: float) -> dict[str, Any]:
    """Fold MindFormers LoRA adapters into their base weights: ``W + (alpha / r) * B @ A``.

    ``state`` uses MindFormers names: ``<layer>.weight`` (out, in), ``<layer>.mindpet_delta_lora_a``
    (r, in) and ``<layer>.mindpet_delta_lora_b`` (out, r), as ``mindpet.delta.lora.LoRADense``
    defines them (its forward adds ``scaling * x A^T B^T`` with ``scaling = alpha / r``). Values are
    numpy arrays or torch tensors; the sum is done in float32 and cast back to the weight's dtype.
    Returns a new dict without adapter tensors. A missing base weight is an error.
    """
    out = {k: v for k, v in state.items() if not k.endswith((LORA_A, LORA_B))}
    prefixes = sorted({k[: -len(LORA_A)] for k in state if k.endswith(LORA_A)})
    if not prefixes:
        raise ConversionError("no LoRA tensors (*.mindpet_delta_lora_a) in the checkpoint")
    for prefix in prefixes:
        a, b = state[prefix + LORA_A], state.get(prefix + LORA_B)
        w_name = prefix + ".weight"
        if b is None:
            raise ConversionError(f"{prefix}: lora_a without lora_b")
        if w_name not in out:
            raise ConversionError(f"{w_name}: base weight missing (pass the base model with --base)")
        w = out[w_name]
        r = a.shape[0]
        if tuple(b.shape) != (w.shape[0], r) or tuple(a.shape) != (r, w.shape[1]):
            raise ConversionError(f"{prefix}: shapes A{tuple(a.shape)} B{tuple(b.shape)} do not fit W{tuple(w.shape)}")
        scale = float(lora_alpha) / r
        if hasattr(w, "float"):  # torch
            out[w_name] = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
        else:
            import numpy as np

            out[w_name] = (w.astype(np.float32) + scale * (b.astype(np.float32) @ a.astype(np.float32))).astype(w.dtype)
    return out


def _lora_alpha_from_config(config: str | os.PathLike) -> float | None:
    p = Path(config)
    if p.suffix not in {".yaml", ".yml"}:
        return None
    import yaml

    pet = ((yaml.safe_load(p.read_text()) or {}).get("model", {}).get("model_config", {}) or {}).get("pet_config")
    return None if not pet or pet.get("lora_alpha") is None else float(pet["lora_alpha"])


def convert_merge_lora(src: str | os.PathLike, dst_dir: str | os.PathLike, config: str | os.PathLike,
                       base: str | os.PathLike | None = None, lora_alpha: float | None = None,
                       tokenizer_dir: str | os.PathLike | None = None, **card: Any) -> Path:
    """Merge a MindFormers LoRA checkpoint into full HF ``Qwen2ForCausalLM`` safetensors.

    ``src``: a MindFormers safetensors file/dir from a LoRA run (adapters, and usually the frozen
    base weights too). ``base``: where the base weights come from when ``src`` lacks them (an HF
    model dir or a MindFormers safetensors file/dir). ``lora_alpha`` defaults to the YAML's
    ``pet_config.lora_alpha``. Needs torch (bf16-safe arithmetic).
    """
    import tempfile

    from safetensors.torch import load_file, save_file

    alpha = lora_alpha if lora_alpha is not None else _lora_alpha_from_config(config)
    if alpha is None:
        raise ConversionError("lora_alpha unknown: give the LoRA YAML as --config or pass --lora-alpha")
    state: dict[str, Any] = {}
    if base is not None:
        base_files = _safetensors_files(Path(base))
        base_state: dict[str, Any] = {}
        for f in base_files:
            base_state.update(load_file(str(f)))
        if any(k in base_state for k in (HF_EMBED, "model.norm.weight")):
            tie = HF_EMBED in base_state and LM_HEAD not in base_state
            base_state = hf_to_mf(base_state, tie_word_embeddings=tie)
        state.update(base_state)
    for f in _safetensors_files(Path(src)):
        for k, v in load_file(str(f)).items():
            # adapters of the model only: the optimizer's adam_m./adam_v. copies end the same way
            if is_mf_model_weight(k) or (k.endswith((LORA_A, LORA_B)) and _looks_like_model_param(k)):
                state[k] = v
    merged = merge_lora(state, alpha)
    with tempfile.TemporaryDirectory(dir=Path(dst_dir).parent if Path(dst_dir).parent.exists() else None) as tmp:
        tmp_file = Path(tmp) / "merged_mf.safetensors"
        save_file({k: v.contiguous() for k, v in merged.items()}, str(tmp_file))
        tie = None if MF_EMBED not in merged else (LM_HEAD not in merged)
        return convert_mf_to_hf(tmp_file, dst_dir, config=config, tie_word_embeddings=tie,
                                tokenizer_dir=tokenizer_dir, **card)  # card: eval_run, recipe, base_model, data


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

@dataclass(kw_only=True)
class CardArgs:
    """Model card inputs (README.md beside the weights; docs/recipes.md)."""

    eval_run: str | None = option(None, metavar="DIR", help="a `distill eval` output: its results table "
                                                             "goes into the model card")
    recipe: str | None = option(None, help="recipe name for the card (default: found from --config's file name)")
    base_model: str | None = option(None, help="base model id for the card (default: the recipe's student)")
    data: str | None = option(None, help="training data for the card (default: the recipe's data)")


@dataclass(kw_only=True)
class HfToMfArgs:
    """``distill convert hf-to-mf`` (``--tie-word-embeddings``/``--untied``: :func:`_tie_flags`)."""

    src: str = option(positional=True, help="HF model directory (config.json + *.safetensors)")
    dst: str = option(positional=True, help="output .safetensors file, or a directory")


@dataclass(kw_only=True)
class MfToHfArgs:
    """``distill convert mf-to-hf`` (plus :func:`_tie_flags` and :class:`CardArgs`)."""

    src: str = option(positional=True, help="MindFormers .safetensors file or a directory of unified files")
    dst: str = option(positional=True, help="output HF model directory (written atomically)")
    config: str = option(help="the training YAML (model.model_config) or an HF dir/config.json to copy")
    tokenizer: str | None = option(None, help="directory whose tokenizer files to copy")


@dataclass(kw_only=True)
class MergeLoraArgs:
    """``distill convert merge-lora`` (plus :class:`CardArgs`)."""

    src: str = option(positional=True, help="MindFormers safetensors file/dir of the LoRA run (adapters, usually + base)")
    dst: str = option(positional=True, help="output HF model directory (written atomically)")
    config: str = option(help="the LoRA training YAML (pet_config, model shape) or an HF dir")
    base: str | None = option(None, help="base weights when SRC holds only adapters (HF dir or MF file/dir)")
    lora_alpha: float | None = option(None, help="default: the YAML's pet_config.lora_alpha")
    tokenizer: str | None = option(None, help="directory whose tokenizer files to copy")


def _tie_flags(q: argparse.ArgumentParser) -> None:
    """Two flags for one tri-state value (None: from config.json), so not a settings field."""
    g = q.add_mutually_exclusive_group()
    g.add_argument("--tie-word-embeddings", dest="tie_word_embeddings", action="store_true", default=None,
                   help="embedding and lm_head are one tensor (Qwen2.5 0.5B-3B)")
    g.add_argument("--untied", dest="tie_word_embeddings", action="store_false",
                   help="separate lm_head.weight (Qwen2.5-7B; default from config)")


def _card_args(args: argparse.Namespace) -> dict:
    return dataclasses.asdict(from_args(CardArgs, args))


def _cmd_hf_to_mf(args: argparse.Namespace) -> int:
    try:
        a = from_args(HfToMfArgs, args)
        out = convert_hf_to_mf(a.src, a.dst, tie_word_embeddings=args.tie_word_embeddings)
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    n = len(_read_header(out)[0]) - 1
    print(f"hf-to-mf: wrote {n} tensors to {out}")
    return 0


def _cmd_mf_to_hf(args: argparse.Namespace) -> int:
    try:
        a = from_args(MfToHfArgs, args)
        out = convert_mf_to_hf(a.src, a.dst, config=a.config, tie_word_embeddings=args.tie_word_embeddings,
                               tokenizer_dir=a.tokenizer, **_card_args(args))
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"mf-to-hf: wrote HF Qwen2ForCausalLM to {out}")
    return 0


def _cmd_merge_lora(args: argparse.Namespace) -> int:
    try:
        a = from_args(MergeLoraArgs, args)
        out = convert_merge_lora(a.src, a.dst, config=a.config, base=a.base, lora_alpha=a.lora_alpha,
                                 tokenizer_dir=a.tokenizer, **_card_args(args))
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"merge-lora: wrote merged HF Qwen2ForCausalLM to {out}")
    return 0


def register_cli(sub: Any) -> None:
    """Add ``distill convert hf-to-mf|mf-to-hf`` (and ``merge-lora`` when present)."""
    p = sub.add_parser("convert", help="convert checkpoints between HF Qwen2 and MindFormers names")
    csub = p.add_subparsers(dest="convert_command", metavar="DIRECTION")

    a = csub.add_parser("hf-to-mf", help="HF Qwen2ForCausalLM dir -> MindFormers safetensors")
    add_arguments(a, HfToMfArgs)
    _tie_flags(a)
    a.set_defaults(func=_cmd_hf_to_mf)

    b = csub.add_parser("mf-to-hf", help="MindFormers safetensors -> HF Qwen2ForCausalLM dir")
    add_arguments(b, MfToHfArgs)
    _tie_flags(b)
    add_arguments(b, CardArgs)
    b.set_defaults(func=_cmd_mf_to_hf)

    c = csub.add_parser("merge-lora", help="MindFormers LoRA checkpoint -> merged HF Qwen2ForCausalLM dir")
    add_arguments(c, MergeLoraArgs)
    add_arguments(c, CardArgs)
    c.set_defaults(func=_cmd_merge_lora)

    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
