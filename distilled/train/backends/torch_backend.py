"""torch backend: transformers ``Qwen2ForCausalLM`` trained with MindFormers' semantics.

Why: users cross-check an Ascend run on GPU. This backend computes what MindFormers computes:
the loss on pre-shifted labels as ``sum(ce * loss_mask) / (sum(loss_mask) + 1e-8)``, per-document
(block-diagonal causal) attention with restarting ``position_ids``, AdamW with MindFormers' update
and no-decay rule, ``LinearWithWarmUpLR`` and MindFormers' clip-by-global-norm.

Packed attention:
- CPU (and GPU without flash-attn): SDPA with an explicit (B, 1, S, S) boolean block-causal mask.
  An explicit 4-D mask matters: with ``attention_mask=None`` transformers 4.57 silently *infers*
  packing from ``position_ids`` instead.
- CUDA with ``flash_attn`` installed: ``flash_attention_2`` with no mask; transformers derives the
  varlen ``cu_seqlens`` from the restarting ``position_ids``.

The mask is built from document boundaries. By default they are read from ``position_ids``
(a document starts where the position is 0), the same single source flash-attn varlen uses, so a
batch with non-restarting positions visibly leaks across documents and the packing check fails.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from distilled.train.backends.base import (Backend, ForwardResult, LoraSettings, PackedBatch, StepResult,
                                     TrainSettings, as_micro_batches, wants_weight_decay)
from distilled.train.hf_mf_names import check_model_config

def doc_ids_from_positions(position_ids):
    """Document index of each token: a new document starts wherever the position is 0.
    Works on torch tensors or numpy arrays of shape (B, S)."""
    starts = position_ids == 0
    return starts.cumsum(-1)


class TorchBackend(Backend):
    """transformers ``Qwen2ForCausalLM`` on CPU or CUDA (optionally under DDP via ``torchrun``)."""

    name = "torch"

    def __init__(self, device: str | None = None, attn: str = "auto", mask_from: str = "position_ids",
                 block_mask: bool = True, ddp: bool = False, flatten_batch: bool | None = None):
        """``mask_from``: ``position_ids`` (default, like flash varlen) or ``doc_ids`` (the batch's
        ``actual_seq_len``). ``block_mask=False`` gives a plain causal mask across the whole row:
        only for tests proving the packing check catches leaks. ``flatten_batch`` runs a (B, S)
        batch as one (1, B*S) row; rows stay apart because every row starts at position 0. It is
        forced on for flash-attn, whose varlen path (transformers ``_is_packed_sequence``) only
        reads ``position_ids`` when the batch size is 1."""
        import torch

        self.torch = torch
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if ddp and device == "cuda":
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        self.device = torch.device(device)
        self.attn = attn
        self.mask_from = mask_from
        self.block_mask = block_mask
        self.ddp = ddp
        self.flatten_batch = flatten_batch
        self.model = None
        self.module = None  # the unwrapped model
        self.optimizer = None
        self.settings: TrainSettings | None = None
        self.step_count = 0
        self.autocast_dtype = None
        self.lora: LoraSettings | None = None

    # ---------------------------------------------------------------- loading and saving
    def load_hf(self, weights_dir, model_config=None, dtype="float32", seq_length=None, batch_size=1) -> None:
        torch = self.torch
        from transformers import Qwen2ForCausalLM

        weights_dir = Path(weights_dir)
        cfg_path = weights_dir / "config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{weights_dir}: no config.json (expected an HF model directory)")
        check_model_config(model_config, json.loads(cfg_path.read_text()), str(cfg_path))
        attn = self.attn
        if attn == "auto":
            attn = "sdpa"
            if self.device.type == "cuda" and dtype == "bfloat16":  # flash-attn kernels are bf16/fp16 only
                try:
                    import flash_attn  # noqa: F401

                    attn = "flash_attention_2"
                except ImportError:
                    pass
        self.attn_impl = attn
        # master weights stay fp32; bf16 runs under autocast, like MindFormers' fp32 params with
        # bf16 compute_dtype (transformers casts fp32 q/k/v to the autocast dtype for flash-attn)
        model = Qwen2ForCausalLM.from_pretrained(str(weights_dir), dtype=torch.float32, attn_implementation=attn)
        model.config.use_cache = False
        model.to(self.device)
        model.train()
        self.module = model
        self.model = model
        self.autocast_dtype = torch.bfloat16 if dtype == "bfloat16" else None
        if attn == "flash_attention_2" and self.autocast_dtype is None:
            raise ValueError("flash_attention_2 needs --dtype bfloat16; use attn='sdpa' for float32")

    def enable_lora(self, lora: LoraSettings) -> None:
        """PEFT LoRA with MindFormers' settings: rank, alpha (scaling alpha/rank), dropout, targets;
        no bias training, base weights frozen."""
        from peft import LoraConfig, get_peft_model

        if self.optimizer is not None:
            raise RuntimeError("enable_lora() must come before setup_training()")
        cfg = LoraConfig(r=int(lora.rank), lora_alpha=lora.alpha, lora_dropout=float(lora.dropout),
                         target_modules=list(lora.targets), bias="none", init_lora_weights=True)
        self.module = get_peft_model(self.module, cfg)
        self.model = self.module
        self.lora = lora

    @staticmethod
    def _hf_name(name: str) -> str:
        """PEFT names -> plain HF names (``...q_proj.base_layer.weight`` -> ``...q_proj.weight``,
        ``...q_proj.lora_A.default.weight`` -> ``...q_proj.lora_A.weight``)."""
        if name.startswith("base_model.model."):
            name = name[len("base_model.model."):]
        return name.replace(".base_layer.", ".").replace(".default.", ".")

    def _own_params(self) -> dict:
        return {self._hf_name(k): p for k, p in self.module.named_parameters()}

    def named_parameters(self) -> dict[str, np.ndarray]:
        out = {k: p.detach().float().cpu().numpy().copy() for k, p in self._own_params().items()}
        cfg = getattr(self.module, "config", None)
        if getattr(cfg, "tie_word_embeddings", False):
            out.pop("lm_head.weight", None)
        return out

    def load_named_parameters(self, params: Mapping[str, np.ndarray]) -> None:
        """Overwrite parameters by HF name (tests perturb weights, parity syncs LoRA A through this)."""
        torch = self.torch
        own = self._own_params()
        with torch.no_grad():
            for k, v in params.items():
                if k not in own:
                    raise KeyError(f"no parameter {k!r} in the torch model")
                own[k].copy_(torch.as_tensor(np.asarray(v), dtype=own[k].dtype))

    def save_hf(self, output_dir) -> Path:
        from distilled.io_utils import atomic_dir

        out = Path(output_dir)
        with atomic_dir(out) as tmp:
            if self.lora is None:
                self.module.save_pretrained(tmp, safe_serialization=True)
            else:  # the merged model (loads anywhere) and the adapter alone (PEFT layout)
                import copy

                self.module.save_pretrained(tmp / "adapter", safe_serialization=True)
                merged = copy.deepcopy(self.module).merge_and_unload()
                merged.save_pretrained(tmp, safe_serialization=True)
        return out

    # ---------------------------------------------------------------- forward and loss
    def _flat(self) -> bool:
        return self.attn_impl == "flash_attention_2" or bool(self.flatten_batch)

    def _inputs(self, batch: PackedBatch) -> dict:
        torch = self.torch
        dev = self.device
        if self._flat() and batch.batch_size > 1:
            flat = batch.input_ids.reshape(1, -1), batch.position_ids.reshape(1, -1), batch.doc_ids
            # doc ids must stay distinct across rows once the rows are concatenated
            docs = (batch.doc_ids + (batch.doc_ids.max() + 1) * np.arange(batch.batch_size)[:, None]).reshape(1, -1)
            batch = PackedBatch(flat[0], batch.labels.reshape(1, -1), batch.loss_mask.reshape(1, -1), flat[1], docs)
        input_ids = torch.as_tensor(batch.input_ids, dtype=torch.long, device=dev)
        position_ids = torch.as_tensor(batch.position_ids, dtype=torch.long, device=dev)
        kw = {"input_ids": input_ids, "position_ids": position_ids}
        if self.attn_impl == "flash_attention_2":
            if not self.block_mask:
                raise ValueError("block_mask=False is not supported with flash_attention_2")
            return kw  # varlen boundaries come from position_ids
        S = batch.seq_length
        causal = torch.ones(S, S, dtype=torch.bool, device=dev).tril()
        if self.block_mask:
            if self.mask_from == "position_ids":
                docs = doc_ids_from_positions(position_ids)
            else:
                docs = torch.as_tensor(batch.doc_ids, device=dev)
            mask = (docs[:, :, None] == docs[:, None, :]) & causal[None]
        else:
            mask = causal[None].expand(batch.batch_size, S, S)
        if self.attn_impl == "eager":  # eager adds the mask
            neg = torch.finfo(torch.float32).min
            kw["attention_mask"] = torch.zeros(mask.shape, device=dev).masked_fill(~mask, neg)[:, None]
        else:
            kw["attention_mask"] = mask[:, None]
        return kw

    def _loss(self, batch: PackedBatch, return_logits: bool = False):
        torch = self.torch
        kw = self._inputs(batch)
        if self.autocast_dtype is not None:
            ctx = torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)
        else:
            import contextlib

            ctx = contextlib.nullcontext()
        with ctx:
            logits = self.model(**kw, use_cache=False).logits
        logits = logits.float().reshape(batch.batch_size, batch.seq_length, -1)
        labels = torch.as_tensor(batch.labels, dtype=torch.long, device=self.device)
        mask = torch.as_tensor(batch.loss_mask, dtype=torch.float32, device=self.device)
        kd = getattr(self, "settings", None)
        if kd is not None and kd.kd_alpha is not None:  # logits distillation (distilled/kd/loss_torch.py)
            if batch.topk_ids is None:
                raise ValueError("the YAML trains KDLlamaForCausalLM but the data has no topk_ids/topk_logprobs "
                                 "columns (build it with `distill preprocess --kd-sidecar`)")
            from distilled.kd.loss_torch import kd_loss_terms

            t = kd_loss_terms(logits, labels, torch.as_tensor(batch.topk_ids, device=self.device),
                              torch.as_tensor(batch.topk_logprobs, dtype=torch.float32, device=self.device),
                              kd.kd_alpha, kd.kd_temperature, mask=mask)
            loss_sum, count = t["numerator"], t["tokens"]
            return loss_sum / (count + 1e-8), loss_sum, count, (logits if return_logits else None)
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                               labels.reshape(-1).clamp_min(0), reduction="none")
        loss_sum = (ce * mask.reshape(-1)).sum()
        count = mask.sum()
        loss = loss_sum / (count + 1e-8)  # MindFormers CrossEntropyLoss
        return loss, loss_sum, count, (logits if return_logits else None)

    def forward(self, batch: PackedBatch, return_logits: bool = False) -> ForwardResult:
        torch = self.torch
        with torch.no_grad():
            loss, loss_sum, count, logits = self._loss(batch, return_logits)
        return ForwardResult(float(loss), float(loss_sum), int(count.item()),
                             logits.cpu().numpy() if logits is not None else None)

    # ---------------------------------------------------------------- training
    def setup_training(self, settings: TrainSettings) -> None:
        torch = self.torch
        torch.manual_seed(settings.seed)
        if self.ddp and self.model is self.module:  # wrap once, after LoRA (DDP hooks the trainable params)
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(self.module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        decay, no_decay = [], []
        for n, p in self._own_params().items():
            if p.requires_grad:
                (decay if wants_weight_decay(n, p.ndim) else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": settings.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=settings.lr_at(0),
                                           betas=tuple(settings.betas), eps=settings.eps,
                                           foreach=False)
        self.settings = settings
        self.step_count = 0

    def _clip(self) -> float:
        """MindFormers ClipGradNorm: ``coef = max_norm / (max(norm, max_norm) + 1e-6)``."""
        torch = self.torch
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads))
        max_norm = self.settings.max_grad_norm
        if max_norm is not None:
            coef = max_norm / (torch.clamp(norm, min=max_norm) + 1e-6)
            for g in grads:
                g.mul_(coef.to(g.dtype))
        return float(norm)

    def _all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum ``values`` over the data-parallel ranks (torchrun); identity on one process.

        Why float64 on CPU: the token count decides the loss scale of every rank, so all ranks must
        agree on it exactly (gloo and nccl both reduce float64)."""
        torch = self.torch
        if not (self.ddp and torch.distributed.is_available() and torch.distributed.is_initialized()):
            return [float(v) for v in values]
        dev = self.device if self.device.type == "cuda" else torch.device("cpu")
        t = torch.tensor(values, dtype=torch.float64, device=dev)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return [float(v) for v in t.cpu()]

    def _world(self) -> int:
        torch = self.torch
        if self.ddp and torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size()
        return 1

    def train_step(self, batch: PackedBatch | Sequence[PackedBatch]) -> StepResult:
        """One optimizer step over one batch or a list of micro-batches (gradient accumulation).

        Per-token normalisation (TRL ``num_items_in_batch``; MindFormers ``calculate_per_token_loss``):
        the step's loss is ``sum(token CE) / (trained tokens of the whole global batch + 1e-8)``, the
        sum and the count running over every micro-batch *and* every data-parallel rank. So each
        micro-batch backpropagates ``loss_sum * world / global_tokens``: DDP's gradient all-reduce
        averages over ``world``, which the factor undoes. A single micro-batch on one rank is exactly
        MindFormers' ``sum(ce * mask) / (sum(mask) + 1e-8)``."""
        import contextlib

        if self.optimizer is None:
            raise RuntimeError("call setup_training() before train_step()")
        micro = as_micro_batches(batch)
        lr = self.settings.lr_at(self.step_count)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        local_tokens = float(sum(mb.num_loss_tokens for mb in micro))
        (global_tokens,) = self._all_reduce_sum([local_tokens])
        denom = global_tokens + 1e-8
        world = self._world()
        local_sum = 0.0
        for i, mb in enumerate(micro):
            sync = (not self.ddp) or i == len(micro) - 1 or not hasattr(self.model, "no_sync")
            ctx = contextlib.nullcontext() if sync else self.model.no_sync()
            with ctx:
                _, loss_sum, _, _ = self._loss(mb)
                (loss_sum * (world / denom)).backward()
            local_sum += float(loss_sum.detach())
        (global_sum,) = self._all_reduce_sum([local_sum])
        norm = self._clip()
        self.optimizer.step()
        res = StepResult(self.step_count, global_sum / denom, norm, lr, int(global_tokens))
        self.step_count += 1
        return res
