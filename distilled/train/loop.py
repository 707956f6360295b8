"""``distill train``: train from the MindFormers finetune YAML with a pluggable backend.

Why: the same YAML and packed Arrow that drive MindFormers on Ascend drive a torch run on GPU (or
CPU here), so a user can cross-check a run or use spare GPUs. The YAML's training keys map onto the
backend's settings one by one (:func:`settings_from_yaml`); every key that is not applied is
*listed* with the reason, and a key whose value would change the training maths but cannot be
honoured stops the run with a message naming it.

    distill train --backend torch --config configs/finetune_qwen2_5_tiny_cpu.yaml \\
        --data runs/packed --weights runs/tiny-student --output runs/torch-train --steps 20

Several GPUs: ``torchrun --nproc_per_node N -m distilled.train --backend torch --config ...``
(DDP). The step's global batch is MindFormers' for the same YAML: ``runner_config.batch_size x
parallel_config.data_parallel x runner_config.gradient_accumulation_steps`` rows. torchrun ranks
stand in for data-parallel ranks only: each rank runs ``data_parallel x GA / N`` micro-batches of
``batch_size`` rows, and a world size that does not divide ``data_parallel x GA`` is refused (the
7B YAML, dp1 x mp4 x cp2, has a global batch of one row, so 8 torch ranks cannot reproduce it).
The loss is per token over the whole global batch (every micro-batch, every rank).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from distilled.train.backends.base import LoraSettings, TrainSettings, lora_targets_from_regex, warmup_steps_from
from distilled.train.hf_mf_names import SHAPE_KEYS
from distilled.settings import add_arguments, from_args, option

# Dotted YAML keys that are read and mapped onto backend settings.
MAPPED = {
    "seed": "TrainSettings.seed",
    "output_dir": "--output default",
    "load_checkpoint": "--weights default (an HF safetensors directory)",
    "runner_config.epochs": "number of passes over the packed rows",
    "runner_config.batch_size": "rows per step per device",
    "runner_config.gradient_accumulation_steps": "micro-batches per step (per-token loss over all of them)",
    "parallel_config.data_parallel": "global batch factor; torchrun ranks stand in for data-parallel ranks",
    "calculate_per_token_loss": "always on: sum(token CE) / trained tokens of the global batch",
    "runner_wrapper.calculate_per_token_loss": "always on (MindFormers' GA wrapper reads this copy)",
    "optimizer.type": "AdamW (MindFormers semantics)",
    "optimizer.betas": "AdamW betas",
    "optimizer.eps": "AdamW eps",
    "optimizer.weight_decay": "AdamW weight decay (not on 1-D tensors or biases)",
    "optimizer.learning_rate": "used when lr_schedule is absent",
    "lr_schedule.type": "LinearWithWarmUpLR or ConstantWarmUpLR without warmup",
    "lr_schedule.learning_rate": "peak learning rate",
    "lr_schedule.warmup_ratio": "warmup steps = int(total_steps * ratio)",
    "lr_schedule.warmup_steps": "warmup steps (when no ratio)",
    "lr_schedule.warmup_lr_init": "start of warmup",
    "lr_schedule.total_steps": "-1: epochs * rows // (batch_size * data_parallel * GA)",
    "runner_wrapper.use_clip_grad": "clip by global norm on/off",
    "runner_wrapper.max_grad_norm": "clip threshold",
    "runner_wrapper.scale_sense": "loss scale; must be 1.0 (float32/bf16 need none)",
    "train_dataset.data_loader.dataset_path": "--data default (packed Arrow)",
    "train_dataset.data_loader.shuffle": "True: a seeded permutation of the rows per epoch (not MindSpore's order)",
    "train_dataset.drop_remainder": "partial batches are dropped",
    "model.model_config.compute_dtype": "float32 or bfloat16 (autocast)",
    "callbacks.CheckpointMonitor.save_checkpoint_steps": "--save-steps default",
    "model.model_config.pet_config.pet_type": "lora (PEFT on torch)",
    "model.model_config.pet_config.lora_rank": "LoRA rank",
    "model.model_config.pet_config.lora_alpha": "LoRA alpha (scaling alpha/rank)",
    "model.model_config.pet_config.lora_dropout": "LoRA dropout",
    "model.model_config.pet_config.target_modules": "regex over wq/wk/wv/wo/w1/w2/w3 -> q/k/v/o/gate/down/up_proj",
    "model.model_config.pet_config.lora_b_init": "B starts at zero (PEFT and MindPet)",
    "model.model_config.kd_alpha": "KD (arch KDLlamaForCausalLM): alpha * CE + (1 - alpha) * KL",
    "model.model_config.kd_temperature": "KD softmax temperature",
    "model.model_config.kd_top_k": "KD: K of the data's top-K columns (checked against the data)",
}
# model_config keys that are applied: the shape keys are checked against the weights' config.json
# (distilled.train.hf_mf_names), seq_length against the packed rows; qkv_has_bias is Qwen2's (always on)
MODEL_SHAPE_KEYS = tuple(k.mf for k in SHAPE_KEYS) + ("seq_length", "qkv_has_bias")
# Whole sections that describe MindSpore/Ascend execution, not the maths of a step.
NOT_APPLICABLE = {
    "context": "MindSpore device/graph context",
    "parallel": "MindSpore auto-parallel context (torch uses DDP via torchrun)",
    "parallel_config": "MindSpore model/pipeline parallel layout",
    "recompute_config": "activation recompute (memory only)",
    "use_parallel": "MindSpore distributed switch (torch: torchrun)",
    "run_mode": "MindFormers run mode",
    "trainer": "MindFormers trainer class",
    "train_dataset_task": "MindFormers dataset wrapper",
    "auto_trans_ckpt": "MindFormers checkpoint resharding",
    "load_ckpt_format": "torch reads HF safetensors directories",
    "src_strategy_path_or_dir": "MindFormers checkpoint resharding",
    "only_save_strategy": "MindFormers parallel strategy",
    "resume_training": "not supported by distill train (start from --weights)",
    "model.arch": "model class (torch: Qwen2ForCausalLM)",
    "profile": "MindSpore profiler",
    "moe_config": "not a MoE model",
    "micro_batch_interleave_num": "MindSpore parallel",
    "swap_config": "MindSpore memory offload",
    "runner_config.sink_mode": "MindSpore data sink",
    "runner_config.sink_size": "MindSpore data sink",
    "runner_wrapper.type": "MindFormers one-step cell",
    "train_dataset.input_columns": "MindFormers column plumbing",
    "train_dataset.construct_args_key": "MindFormers column plumbing",
    "train_dataset.num_parallel_workers": "loader threads",
    "train_dataset.python_multiprocessing": "loader processes",
    "train_dataset.numa_enable": "loader NUMA",
    "train_dataset.prefetch_size": "loader prefetch",
    "train_dataset.dynamic_batch": "fixed-length packed rows",
    "train_dataset.data_loader.type": "loader class",
    "train_dataset.data_loader.load_func": "loader function",
    "train_dataset.data_loader.create_attention_mask": "masks are always built from actual_seq_len",
    "train_dataset.data_loader.use_broadcast_data": "MindSpore data broadcast",
    "train_dataset.data_loader.create_compressed_eod_mask": "Ascend flash-attention mask format (torch masks from positions)",
    "train_dataset.data_loader.compressed_eod_mask_length": "Ascend flash-attention mask format",
    "model.model_config.use_eod_attn_mask_compression": "Ascend flash-attention mask format",
    "train_dataset.data_loader.handler": "preprocessing (already done: --data is packed)",
    "callbacks": "MindFormers callbacks (loss.jsonl is always written)",
    "model.model_config.type": "config class",
    "model.model_config.batch_size": "runner_config.batch_size is used",
    "model.model_config.param_init_type": "master weights are float32",
    "model.model_config.layernorm_compute_type": "transformers computes RMSNorm in float32",
    "model.model_config.softmax_compute_type": "SDPA softmax is float32 under autocast",
    "model.model_config.rotary_dtype": "transformers computes RoPE in float32",
    "model.model_config.use_flash_attention": "torch picks SDPA / flash-attn itself",
    "model.model_config.use_rope_slice": "MindSpore CPU workaround",
    "model.model_config.input_sliced_sig": "labels are always pre-shifted",
    "model.model_config.use_past": "no KV cache in training",
    "model.model_config.pad_token_id": "loss mask comes from labels != -100",
    "model.model_config.ignore_token_id": "-100",
    "model.model_config.max_position_embedding": "from config.json",
    "model.model_config.checkpoint_name_or_path": "use --weights",
    "model.model_config.offset": "pipeline layout",
    "model.model_config.bos_token_id": "tokenizer",
    "model.model_config.eos_token_id": "tokenizer",
    "model.model_config.qkv_concat": "weight layout",
    "model.model_config.fine_grain_interleave": "MindSpore parallel",
    "model.model_config.use_fused_rope": "kernel choice",
    "model.model_config.use_fused_swiglu": "kernel choice",
    "model.model_config.use_fused_rms_norm": "kernel choice",
    "model.model_config.extend_method": "no RoPE scaling",
    "model.model_config.scaling_factor": "no RoPE scaling",
    "model.model_config.repetition_penalty": "generation",
    "model.model_config.max_decode_length": "generation",
    "model.model_config.top_k": "generation",
    "model.model_config.top_p": "generation",
    "model.model_config.do_sample": "generation",
    "model.model_config.multiple_of": "intermediate_size is given",
    "model.model_config.ffn_dim_multiplier": "intermediate_size is given",
    "model.model_config.residual_dtype": "float32 residual",
    "processor": "tokenizer config (data is already tokenized)",
    "model.model_config.pet_config.lora_a_init": "MindFormers 1.9's LoraAdapter does not pass it to LoRADense "
                                                 "(A is He-uniform there, as in PEFT); parity copies A across",
    "model.model_config.pet_config.param_init_type": "adapter weights are float32",
    "model.model_config.pet_config.compute_dtype": "follows compute_dtype",
    "eval_dataset": "evaluation is distill eval",
    "eval_dataset_task": "evaluation is distill eval",
    "do_eval": "evaluation is distill eval",
    "metric": "evaluation is distill eval",
    "monitor_config": "MindFormers monitors",
}


@dataclass
class YamlPlan:
    """What the YAML means for a torch (or in-process MindSpore) run."""

    settings: TrainSettings
    batch_size: int
    epochs: int
    dtype: str
    model_config: dict
    data: str | None
    weights: str | None
    output: str | None
    save_steps: int | None
    yaml_total_steps: int
    lora: LoraSettings | None = None
    shuffle: bool = False
    grad_accum: int = 1  # micro-batches per rank per optimizer step (after the world-size split)
    data_parallel: int = 1
    yaml_grad_accum: int = 1
    global_batch: int = 1  # rows per optimizer step over all ranks: batch_size x dp x GA
    applied: dict[str, Any] = field(default_factory=dict)
    not_applicable: dict[str, str] = field(default_factory=dict)
    unsupported: list[str] = field(default_factory=list)

    def describe(self) -> str:
        lines = [f"applied {len(self.applied)} keys; {len(self.not_applicable)} MindSpore-only keys not "
                 f"applicable to this backend"]
        if self.unsupported:
            lines.append("UNSUPPORTED keys (not applied): " + ", ".join(self.unsupported))
        return "\n".join(lines)


class ConfigError(ValueError):
    """A YAML value this backend cannot honour (names the key and the value)."""


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, Mapping):
        for k, v in d.items():
            key = f"{prefix}{k}"
            if isinstance(v, Mapping) and v:
                out.update(_flatten(v, key + "."))
            else:
                out[key] = v
    return out


def load_yaml(path: str | os.PathLike) -> dict:
    """Read the finetune YAML (plain YAML; MindFormers' ``&anchors`` resolve as usual)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: config file not found")
    with open(p, encoding="utf-8") as f:
        cfg = yaml.safe_load(f)
    if not isinstance(cfg, dict):
        raise ConfigError(f"{p}: expected a YAML mapping at the top level")
    return cfg


def _is_not_applicable(key: str) -> str | None:
    parts = key.split(".")
    for i in range(len(parts), 0, -1):
        reason = NOT_APPLICABLE.get(".".join(parts[:i]))
        if reason:
            return reason
    return None


def settings_from_yaml(cfg: Mapping[str, Any], num_rows: int | None = None, world_size: int = 1,
                       steps: int | None = None, where: str = "config") -> YamlPlan:
    """Map the MindFormers finetune YAML onto :class:`TrainSettings`.

    ``steps`` caps the run; when the YAML's ``total_steps`` is -1 the schedule's total is the
    number of steps actually run, so warmup and decay span the whole (possibly shortened) run.
    """
    flat = _flatten(cfg)
    rc = cfg.get("runner_config") or {}
    opt = cfg.get("optimizer") or {}
    lrs = cfg.get("lr_schedule") or {}
    rw = cfg.get("runner_wrapper") or {}
    mc = dict(((cfg.get("model") or {}).get("model_config") or {}))
    dl = (((cfg.get("train_dataset") or {}).get("data_loader")) or {})

    def bad(key: str, value: Any, why: str) -> ConfigError:
        return ConfigError(f"{where}: {key}={value!r} is not supported by this backend ({why})")

    opt_type = opt.get("type", "AdamW")
    if opt_type not in ("AdamW", "adamw", "FusedAdamW"):
        raise bad("optimizer.type", opt_type, "only AdamW has MindFormers-identical semantics here")
    gas = int(rc.get("gradient_accumulation_steps", 1) or 1)
    if gas < 1:
        raise bad("runner_config.gradient_accumulation_steps", gas, "must be >= 1")
    dp = int(((cfg.get("parallel_config") or {}).get("data_parallel", 1)) or 1)
    if dp < 1:
        raise bad("parallel_config.data_parallel", dp, "must be >= 1")
    grad_accum = micro_batches_per_rank(dp, gas, world_size, where)
    scale = rw.get("scale_sense", 1.0)
    if isinstance(scale, Mapping) or float(scale) != 1.0:
        raise bad("runner_wrapper.scale_sense", scale, "only a fixed loss scale of 1.0")
    lr_type = lrs.get("type", "LinearWithWarmUpLR" if lrs else "constant")
    batch_size = int(rc.get("batch_size", mc.get("batch_size", 1)))
    epochs = int(rc.get("epochs", 1))
    yaml_total = int(lrs.get("total_steps", -1) if lrs.get("total_steps") is not None else -1)
    global_batch = batch_size * dp * gas
    per_epoch = None
    if num_rows is not None:
        per_epoch = num_rows // global_batch
        if per_epoch == 0:
            raise ConfigError(f"{where}: {num_rows} packed rows are fewer than one global batch "
                              f"(runner_config.batch_size {batch_size} x parallel_config.data_parallel {dp} x "
                              f"runner_config.gradient_accumulation_steps {gas} = {global_batch} rows)")
    run_steps = steps if steps is not None else (epochs * per_epoch if per_epoch is not None else None)
    total = yaml_total if yaml_total and yaml_total > 0 else (run_steps or 1)
    lr = float(lrs.get("learning_rate", opt.get("learning_rate", 1e-5)))
    if lr_type == "LinearWithWarmUpLR":
        warm = warmup_steps_from(lrs.get("warmup_ratio"), lrs.get("warmup_steps"), total)
        schedule = "LinearWithWarmUpLR"
    elif lr_type in ("constant", "ConstantWarmUpLR") and not lrs.get("warmup_steps") and not lrs.get("warmup_ratio"):
        warm, schedule = 0, "constant"
    else:
        raise bad("lr_schedule.type", lr_type, "supported: LinearWithWarmUpLR, or a constant lr")
    clip = bool(rw.get("use_clip_grad", False))
    settings = TrainSettings(
        learning_rate=lr, warmup_lr_init=float(lrs.get("warmup_lr_init", 0.0)), warmup_steps=warm,
        total_steps=int(total), betas=tuple(float(b) for b in opt.get("betas", (0.9, 0.999))),
        eps=float(opt.get("eps", 1e-8)), weight_decay=float(opt.get("weight_decay", 0.0)),
        max_grad_norm=float(rw.get("max_grad_norm", 1.0)) if clip else None,
        seed=int(cfg.get("seed", 0) or 0), lr_schedule=schedule)
    if ((cfg.get("model") or {}).get("arch") or {}).get("type") == "KDLlamaForCausalLM":  # distilled/kd
        settings.kd_alpha = float(mc.get("kd_alpha", 0.5))
        settings.kd_temperature = float(mc.get("kd_temperature", 1.0))
    compute = str(mc.get("compute_dtype", "float32"))
    if compute not in ("float32", "bfloat16", "float16"):
        raise bad("model.model_config.compute_dtype", compute, "float32 or bfloat16")
    if compute == "float16":
        raise bad("model.model_config.compute_dtype", compute, "float16 needs loss scaling; use bfloat16")
    lora = None
    pet = mc.pop("pet_config", None)
    if pet:
        if str(pet.get("pet_type", "")).lower() != "lora":
            raise bad("model.model_config.pet_config.pet_type", pet.get("pet_type"), "only lora")
        lora = LoraSettings(rank=int(pet.get("lora_rank", 8)), alpha=float(pet.get("lora_alpha", 16)),
                            dropout=float(pet.get("lora_dropout", 0.0)),
                            targets=lora_targets_from_regex(str(pet.get("target_modules") or ".*wq|.*wk|.*wv|.*wo")))
    save_steps = None
    for cb in cfg.get("callbacks") or []:
        if isinstance(cb, Mapping) and cb.get("type") == "CheckpointMonitor" and cb.get("save_checkpoint_steps"):
            save_steps = int(cb["save_checkpoint_steps"])
    applied, na, unsupported = {}, {}, []
    for k, v in flat.items():
        if k in MAPPED or k.startswith("lr_schedule.") and k.split(".")[1] in ("type",):
            applied[k] = v
        elif k.startswith("model.model_config.") and k.split(".")[-1] in MODEL_SHAPE_KEYS:
            applied[k] = v  # checked against config.json when the weights load
        elif (reason := _is_not_applicable(k)) is not None:
            na[k] = reason
        else:
            unsupported.append(k)
    return YamlPlan(settings=settings, batch_size=batch_size, epochs=epochs, dtype=compute, model_config=mc,
                    data=dl.get("dataset_path"), weights=cfg.get("load_checkpoint") or None,
                    output=cfg.get("output_dir"), save_steps=save_steps, yaml_total_steps=yaml_total, lora=lora,
                    shuffle=bool(dl.get("shuffle", False)), grad_accum=grad_accum, data_parallel=dp,
                    yaml_grad_accum=gas, global_batch=global_batch, applied=applied, not_applicable=na, unsupported=sorted(unsupported))


def micro_batches_per_rank(data_parallel: int, grad_accum: int, world_size: int, where: str = "config") -> int:
    """Micro-batches each of ``world_size`` torch ranks runs per step so that the global batch is
    MindFormers' ``batch_size x data_parallel x gradient_accumulation_steps``.

    Why refuse instead of rounding: a different global batch means another number of steps and
    another LR schedule, i.e. a different training run from the same YAML.

    >>> micro_batches_per_rank(2, 2, 1), micro_batches_per_rank(2, 2, 2), micro_batches_per_rank(8, 1, 8)
    (4, 2, 1)
    """
    units = data_parallel * grad_accum
    if world_size < 1 or units % world_size:
        raise ConfigError(
            f"{where}: {world_size} torch ranks cannot reproduce MindFormers' global batch of runner_config."
            f"batch_size x parallel_config.data_parallel ({data_parallel}) x runner_config."
            f"gradient_accumulation_steps ({grad_accum}): torchrun ranks stand in for data-parallel ranks, "
            f"so the number of ranks must divide data_parallel x gradient_accumulation_steps = {units} "
            f"(use --nproc_per_node {data_parallel if data_parallel > 1 else 1}, or raise "
            "gradient_accumulation_steps so that it does)")
    return units // world_size


PACKED_COLUMNS = ("input_ids", "labels", "actual_seq_len", "position_ids")


def load_packed(path: str | os.PathLike):
    """Open a packed Arrow directory (``save_to_disk`` layout or a folder of .arrow/.parquet
    files) and check its columns; returns a ``datasets.Dataset`` (rows read lazily)."""
    import datasets

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: packed data not found (run distill preprocess first)")
    if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "state.json").exists()):
        ds = datasets.load_from_disk(str(p))
    elif p.is_dir() and (p / "dataset_dict.json").exists():
        ds = datasets.load_from_disk(str(p))["train"]
    else:
        files = sorted(p.glob("*.arrow")) if p.is_dir() else [p]
        if not files:
            from distilled.io_utils import load_rows

            ds = load_rows(str(p))
        elif files[0].suffix == ".arrow":
            ds = datasets.concatenate_datasets([datasets.Dataset.from_file(str(f)) for f in files])
        else:
            from distilled.io_utils import load_rows

            ds = load_rows(str(p))
    missing = [c for c in ("input_ids", "labels", "actual_seq_len") if c not in ds.column_names]
    if missing:
        raise ValueError(f"{p}: packed data lacks column(s) {missing}; has {ds.column_names} "
                         "(see docs/data-contracts.md §5)")
    keep = [c for c in PACKED_COLUMNS + ("topk_ids", "topk_logprobs") if c in ds.column_names]  # + KD columns
    return ds.select_columns(keep)


def _dist_info() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def run_train(config: str, backend: str = "torch", data: str | None = None, weights: str | None = None,
              output: str | None = None, steps: int | None = None, save_steps: int | None = None,
              device: str | None = None, dtype: str | None = None, quiet: bool = False) -> dict:
    """Train with ``backend`` from the YAML; returns the summary dict also written to
    ``OUTPUT/train_summary.json``. Writes ``loss.jsonl`` (one line per step) and HF safetensors
    checkpoints (``checkpoint-STEP/``, and ``final/``)."""
    from tqdm import tqdm

    from distilled.train.backends.base import iter_batches
    from distilled.io_utils import write_json

    cfg = load_yaml(config)
    rank, world = _dist_info()
    plan0 = settings_from_yaml(cfg, where=str(config))
    data = data or plan0.data
    weights = weights or plan0.weights
    output = output or plan0.output or "output/torch_train"
    if not data:
        raise ConfigError(f"{config}: no --data and no train_dataset.data_loader.dataset_path")
    if not weights:
        raise ConfigError(f"{config}: no --weights and no load_checkpoint (an HF safetensors directory)")
    ds = load_packed(data)
    plan = settings_from_yaml(cfg, num_rows=len(ds), world_size=world, steps=steps, where=str(config))
    n_steps = steps if steps is not None else plan.epochs * (len(ds) // plan.global_batch)
    save_steps = save_steps if save_steps is not None else plan.save_steps
    dtype = dtype or plan.dtype
    if rank == 0 and not quiet:
        print(plan.describe(), file=sys.stderr)

    be = _make_backend(backend, device, world)
    seq_length = len(ds[0]["input_ids"])
    if plan.model_config.get("seq_length") not in (None, seq_length) and rank == 0:
        print(f"note: model_config.seq_length={plan.model_config['seq_length']} but the packed rows of {data} "
              f"hold {seq_length} tokens; the rows' length is used", file=sys.stderr)
    be.load_hf(weights, model_config=plan.model_config, dtype=dtype, seq_length=seq_length,
               batch_size=plan.batch_size)
    if plan.lora is not None:
        be.enable_lora(plan.lora)
    be.setup_training(plan.settings)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    log = _fresh_loss_log(out) if rank == 0 else None
    ga = plan.grad_accum
    rows = _RankRows(ds, rank, world, plan.batch_size * ga, seed=plan.settings.seed if plan.shuffle else None,
                     epochs=plan.epochs)
    t0 = time.perf_counter()
    tokens = 0
    first = last = None
    bar = tqdm(total=n_steps, desc=f"train[{backend}]", disable=quiet or rank != 0, unit="step")
    micro_iter = iter_batches(rows, plan.batch_size, n_steps * ga, where=str(data))
    for _ in range(n_steps):
        micro = [next(micro_iter) for _ in range(ga)]
        r = be.train_step(micro if ga > 1 else micro[0])
        if not math.isfinite(r.loss):
            raise FloatingPointError(f"step {r.step}: loss is {r.loss} (check lr and data)")
        tokens += plan.global_batch * micro[0].seq_length
        elapsed = time.perf_counter() - t0
        rec = {"step": r.step + 1, "loss": r.loss, "grad_norm": r.grad_norm, "lr": r.lr,
               "loss_tokens": r.tokens, "tokens_per_s": tokens / max(elapsed, 1e-9)}
        if log is not None:
            log.write(rec)
        first = first if first is not None else r.loss
        last = r.loss
        bar.update(1)
        bar.set_postfix(loss=f"{r.loss:.4f}")
        if save_steps and (r.step + 1) % save_steps == 0 and (r.step + 1) != n_steps and rank == 0:
            be.save_hf(out / f"checkpoint-{r.step + 1}")
    bar.close()
    elapsed = time.perf_counter() - t0
    summary = {"backend": backend, "config": str(config), "data": str(data), "weights": str(weights),
               "steps": n_steps, "world_size": world, "global_batch_rows": plan.global_batch,
               "micro_batches_per_rank": ga, "first_loss": first, "last_loss": last,
               "tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / max(elapsed, 1e-9),
               "settings": plan.settings.to_dict(), "dtype": dtype,
               "lora": plan.lora.to_dict() if plan.lora else None,
               "unsupported_keys": plan.unsupported, "not_applicable_keys": sorted(plan.not_applicable)}
    if rank == 0:
        final = be.save_hf(out / "final")
        _copy_tokenizer(Path(weights), final)
        write_json(out / "train_summary.json", summary)
        if log is not None:
            log.close()
        if not quiet:
            print(f"trained {n_steps} steps on {backend}: loss {first:.4f} -> {last:.4f}, "
                  f"{summary['tokens_per_s']:.0f} tokens/s, checkpoint {final}", file=sys.stderr)
    return summary


def _make_backend(backend: str, device: str | None, world: int):
    """The backend; torch under torchrun (``world`` > 1) joins the process group first (DDP)."""
    from distilled.train.backends import get_backend

    kw: dict[str, Any] = {}
    if backend == "torch":
        kw = {"device": device, "ddp": world > 1}
        if world > 1:
            import torch
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("nccl" if torch.cuda.is_available() and device != "cpu" else "gloo")
    return get_backend(backend, **kw)


def _fresh_loss_log(out: Path):
    """``OUTPUT/loss.jsonl`` for this run: an old non-empty log is moved aside, never mixed in."""
    from distilled.io_utils import JsonlAppender

    log = JsonlAppender(out / "loss.jsonl")
    if log.path.stat().st_size:
        log.close()
        os.replace(out / "loss.jsonl", out / f"loss.{int(time.time())}.jsonl")
        log = JsonlAppender(out / "loss.jsonl")
    return log


def _copy_tokenizer(src: Path, dst: Path) -> None:
    import shutil

    for f in src.iterdir():
        if f.is_file() and (f.name.startswith("tokenizer") or f.name in {
                "vocab.json", "merges.txt", "special_tokens_map.json", "chat_template.jinja",
                "generation_config.json"}) and not (dst / f.name).exists():
            shutil.copy2(f, dst / f.name)


class _RankRows:
    """The rows this rank reads: global batch b holds rows [b*B*W, (b+1)*B*W); rank r takes its
    B-row slice (B = batch_size x micro-batches per rank). That is the same *set* of rows per
    optimizer step as MindFormers' data-parallel sharding of a non-shuffled dataset; with the
    per-token loss the split of a step's rows over ranks and micro-batches changes no number."""

    def __init__(self, ds, rank: int, world: int, batch_size: int, seed: int | None = None, epochs: int = 1):
        self.ds, self.rank, self.world, self.bs = ds, rank, world, batch_size
        self.n = (len(ds) // (batch_size * world)) * batch_size
        self.seed = seed
        self.epochs = max(1, epochs) if seed is not None else 1
        self._perm: dict[int, Any] = {}

    def __len__(self) -> int:
        return self.n * self.epochs  # with shuffling, every epoch is its own stretch of indices

    def _order(self, epoch: int):
        """``shuffle: True``: the same seeded permutation on every rank, a new one per epoch."""
        if epoch not in self._perm:
            import numpy as np

            self._perm = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.ds))}
        return self._perm[epoch]

    def __getitem__(self, i: int) -> dict:
        epoch, i = divmod(i, self.n)
        b, j = divmod(i, self.bs)
        g = b * self.bs * self.world + self.rank * self.bs + j
        if self.seed is not None:
            g = int(self._order(epoch)[g])
        return self.ds[g]


@dataclass(kw_only=True)  # kw_only: the required --config may follow --backend's default
class TrainArgs:
    """The options of ``distill train``: declared once here, they become the CLI flags."""

    backend: str = option("torch", choices=["torch", "mindspore"],
                          help="torch (transformers Qwen2) or mindspore (in-process MindFormers model); "
                               "for MindFormers' own Trainer use run_mindformer.py")
    config: str = option(help="MindFormers finetune YAML")
    data: str | None = option(None, help="packed Arrow directory (default: the YAML's dataset_path)")
    weights: str | None = option(None, help="HF safetensors directory (default: the YAML's load_checkpoint)")
    output: str | None = option(None, help="output directory (default: the YAML's output_dir)")
    steps: int | None = option(None, help="train this many steps (default: epochs x rows / global batch)")
    save_steps: int | None = option(None, help="checkpoint every N steps (default: CheckpointMonitor)")
    device: str | None = option(None, help="torch device (default: cuda when present, else cpu)")
    dtype: str | None = option(None, choices=["float32", "bfloat16"], help="default: the YAML's compute_dtype")


def _cmd_train(args: argparse.Namespace) -> int:
    try:
        run_train(**dataclasses.asdict(from_args(TrainArgs, args)))
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def add_train_args(p: argparse.ArgumentParser) -> None:
    add_arguments(p, TrainArgs)


def register_cli(sub: Any) -> None:
    """Register ``distill train``."""
    p = sub.add_parser("train", help="train from the finetune YAML with the torch backend",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(p)
    p.set_defaults(func=_cmd_train)


def main(argv: list[str] | None = None) -> int:
    """``python -m distilled.train`` (what torchrun launches)."""
    p = argparse.ArgumentParser(prog="distilled.train.loop")
    add_train_args(p)
    return _cmd_train(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
