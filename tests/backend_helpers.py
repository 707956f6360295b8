"""Small fixtures for the backend, parity and torch-training tests: a tiny Qwen2 with a 512-token
vocabulary (fast on 2 cores; the real tokenizer is not needed to compare backends), packed Arrow
rows in the data-contracts §5 layout, and a finetune YAML shaped like the MindFormers one."""

from __future__ import annotations

from pathlib import Path

import numpy as np

VOCAB = 512
SHAPE = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


def make_small_qwen2(path: Path, vocab: int = VOCAB, seed: int = 0, tied: bool = False) -> Path:
    """Random-initialised ``Qwen2ForCausalLM`` (qkv bias, GQA, untied head unless ``tied``: then
    lm_head is the embedding, as in Qwen2.5-0.5B/1.5B/3B) saved as safetensors."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-6,
                      tie_word_embeddings=tied, bos_token_id=0, eos_token_id=1, pad_token_id=0,
                      use_sliding_window=False, **SHAPE)
    model = Qwen2ForCausalLM(cfg).float()
    # std 0.02 makes a near-uniform model; larger weights make attention (and leaks) matter
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(path, safe_serialization=True)
    return Path(path)


def packed_rows(n_rows: int = 6, seq_len: int = 48, vocab: int = VOCAB, seed: int = 0,
                docs_per_row: tuple[int, int] = (2, 4), fill: bool = False) -> list[dict]:
    """Rows of 2-4 documents each: a prompt (not trained) then a response (trained); labels
    shifted inside each document, -100 on the last token of a document and on the padding."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_rows):
        k = int(rng.integers(docs_per_row[0], docs_per_row[1] + 1))
        used = seq_len if fill else int(rng.integers(seq_len - 8, seq_len + 1))
        cuts = np.sort(rng.choice(np.arange(5, used - 4), size=k - 1, replace=False)) if k > 1 else []
        bounds = [0, *[int(c) for c in cuts], used]
        ids = np.zeros(seq_len, dtype=np.int64)
        labels = np.full(seq_len, -100, dtype=np.int64)
        pos = np.zeros(seq_len, dtype=np.int64)
        for s, e in zip(bounds[:-1], bounds[1:]):
            n = e - s
            toks = rng.integers(2, vocab, n)
            prompt = int(rng.integers(1, max(2, n // 2)))
            ids[s:e] = toks
            pos[s:e] = np.arange(n)
            for i in range(n - 1):
                if i + 1 >= prompt:
                    labels[s + i] = toks[i + 1]
        if used < seq_len:
            ids[used:] = 0
            pos[used:] = np.arange(seq_len - used)
        rows.append({"input_ids": ids.tolist(), "labels": labels.tolist(),
                     "actual_seq_len": bounds[1:], "position_ids": pos.tolist()})
    return rows


def rows_with_trained_tokens(counts: list[int], seq_len: int, vocab: int = VOCAB, seed: int = 0) -> list[dict]:
    """One single-document row per entry of ``counts``, with exactly that many trained tokens
    (the rest of the document is prompt, label -100). Why: accumulation tests need micro-batches
    whose token counts differ a lot (10 vs 400), where a mean of per-micro-batch means is visibly
    not the per-token mean."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in counts:
        if not 0 < c < seq_len:
            raise ValueError(f"trained tokens {c} must be in (0, {seq_len})")
        toks = rng.integers(2, vocab, seq_len)
        labels = np.full(seq_len, -100, dtype=np.int64)
        labels[seq_len - 1 - c:seq_len - 1] = toks[seq_len - c:]
        rows.append({"input_ids": toks.tolist(), "labels": labels.tolist(), "actual_seq_len": [seq_len],
                     "position_ids": list(range(seq_len))})
    return rows


def write_packed(path: Path, rows: list[dict]) -> Path:
    import datasets

    cols = {k: [r[k] for r in rows] for k in rows[0]}
    datasets.Dataset.from_dict(cols).save_to_disk(str(path))
    return Path(path)


def write_yaml(path: Path, data: Path | None = None, weights: Path | None = None, batch_size: int = 2,
               lr: float = 5e-3, warmup_ratio: float = 0.25, weight_decay: float = 0.01, max_grad_norm: float = 1.0,
               seq_length: int = 48, vocab: int = VOCAB, extra: str = "", optimizer: str = "AdamW",
               lora_rank: int | None = None, grad_accum: int = 1, data_parallel: int | None = None,
               tied: bool | None = None) -> Path:
    """A finetune YAML with the keys of configs/finetune_qwen2_5_tiny_cpu.yaml (``lora_rank``: add
    MindFormers' LoRA ``pet_config`` on wq/wk/wv/wo, alpha = 2 x rank)."""
    par = "" if data_parallel is None else f"parallel_config:\n  data_parallel: {data_parallel}\n  model_parallel: 1\n"
    tie = "" if tied is None else f"    tie_word_embeddings: {tied}\n"
    pet = "" if lora_rank is None else (
        "    pet_config:\n      pet_type: lora\n      lora_rank: %d\n      lora_alpha: %d\n"
        "      lora_dropout: 0.0\n      target_modules: '.*wq|.*wk|.*wv|.*wo'\n" % (lora_rank, 2 * lora_rank))
    text = f"""
seed: 42
output_dir: './output'
load_checkpoint: '{weights or ''}'
run_mode: 'finetune'
use_parallel: False
trainer:
  type: CausalLanguageModelingTrainer
  model_name: 'tiny_qwen2_5'
runner_config:
  epochs: 2
  batch_size: {batch_size}
  gradient_accumulation_steps: {grad_accum}
  sink_mode: False
  sink_size: 1
runner_wrapper:
  type: MFTrainOneStepCell
  scale_sense: 1.0
  use_clip_grad: True
  max_grad_norm: {max_grad_norm}
optimizer:
  type: {optimizer}
  betas: [0.9, 0.95]
  eps: 1.e-8
  weight_decay: {weight_decay}
lr_schedule:
  type: LinearWithWarmUpLR
  learning_rate: {lr}
  warmup_ratio: {warmup_ratio}
  total_steps: -1
train_dataset: &train_dataset
  input_columns: ["input_ids", "labels", "loss_mask", "position_ids", "attention_mask"]
  construct_args_key: ["input_ids", "labels", "loss_mask", "position_ids", "attention_mask"]
  drop_remainder: True
  data_loader:
    type: CommonDataLoader
    shuffle: False
    load_func: "load_from_disk"
    dataset_path: '{data or ''}'
    create_attention_mask: True
train_dataset_task:
  type: CausalLanguageModelDataset
  dataset_config: *train_dataset
context:
  mode: 1
  device_target: "CPU"
model:
  model_config:
    type: LlamaConfig
    input_sliced_sig: True
    batch_size: {batch_size}
    seq_length: {seq_length}
    hidden_size: 64
    num_layers: 2
    num_heads: 4
    n_kv_heads: 2
    vocab_size: {vocab}
    intermediate_size: 256
    qkv_has_bias: True
    rms_norm_eps: 1.0e-6
    theta: 1000000.0
    pad_token_id: 0
    compute_dtype: "float32"
    layernorm_compute_type: "float32"
    softmax_compute_type: "float32"
    rotary_dtype: "float32"
    param_init_type: "float32"
    use_past: False
    use_flash_attention: False
    use_rope_slice: True
{tie}{pet}  arch:
    type: LlamaForCausalLM
{par}{extra}
"""
    Path(path).write_text(text)
    return Path(path)
