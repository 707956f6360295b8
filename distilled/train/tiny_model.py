"""Tiny random-initialised Qwen2.5-architecture students, saved as HF safetensors.

Why: CI, the demo and the parity checks need a real ``Qwen2ForCausalLM`` (qkv bias, GQA, RoPE,
RMSNorm, untied lm_head like Qwen2.5-7B, or tied with :meth:`TinyQwen2Shape.tied`) that trains in seconds on 2 CPU cores. The shape
defaults here are the single source for ``configs/finetune_qwen2_5_tiny_cpu.yaml``'s model block.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class TinyQwen2Shape:
    """Shape of the tiny student. vocab_size matches Qwen2.5 small models (151,936 rows >= the
    151,665 tokens of the real tokenizer), so the real tokenizer is used unchanged."""

    vocab_size: int = 151936
    hidden_size: int = 64
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 4096
    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False

    @classmethod
    def tied(cls, **kw: object) -> "TinyQwen2Shape":
        """The tied variant (``lm_head`` is the embedding), like the usual R1-distill students
        Qwen2.5-0.5B/1.5B/3B and Qwen2.5-Math-1.5B; tests use it on every tied-embedding path."""
        return cls(tie_word_embeddings=True, **kw)  # type: ignore[arg-type]


def make_tiny_qwen2(output_dir: str | Path, shape: TinyQwen2Shape = TinyQwen2Shape(), seed: int = 0,
                    tokenizer_dir: str | Path | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (float32) of a random tiny Qwen2 to
    ``output_dir`` atomically; copy tokenizer files from ``tokenizer_dir`` when given.

    >>> make_tiny_qwen2("runs/tiny-student")  # doctest: +SKIP
    """
    import shutil

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from distilled.io_utils import atomic_dir

    endoftext: int | None = 151643
    im_end: int | None = 151645
    if tokenizer_dir is not None:  # a trimmed tokenizer (`--bpe-tokens`) moves the special ids
        from distilled.data.tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer_dir)
        if len(tok) > shape.vocab_size:
            raise ValueError(f"{tokenizer_dir}: the tokenizer has {len(tok)} tokens but vocab_size is "
                             f"{shape.vocab_size}")
        endoftext, im_end = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    elif shape.vocab_size <= im_end:  # no tokenizer and a vocabulary without Qwen's special ids
        endoftext = im_end = None
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        **asdict(shape),
        hidden_act="silu",
        initializer_range=0.02,
        use_cache=True,
        use_sliding_window=False,
        bos_token_id=endoftext,
        eos_token_id=im_end,
        pad_token_id=endoftext,
        torch_dtype="float32",
    )
    model = Qwen2ForCausalLM(cfg).to(torch.float32)
    out = Path(output_dir)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer_dir is not None:
            for f in Path(tokenizer_dir).iterdir():
                if f.is_file() and (f.name.startswith("tokenizer") or f.name in {"vocab.json", "merges.txt", "special_tokens_map.json", "chat_template.jinja"}):
                    shutil.copy2(f, tmp / f.name)
        (tmp / "distilled_tiny.json").write_text(json.dumps({"seed": seed, **asdict(shape)}, indent=2))
    return out
