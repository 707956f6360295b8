"""MindSpore backend: MindFormers' legacy ``LlamaForCausalLM`` (the Qwen2.5 path), in process.

Why in process (not through the Trainer): parity needs per-step losses, grad norms, logits and
parameters from the exact same batches. This backend uses MindFormers' own pieces for everything
that defines the numbers -- the model built from the YAML's ``model_config``, its loss
(``CrossEntropyLoss`` with the loss mask), ``mindformers.core.optim.adamw.AdamW``,
``LinearWithWarmUpLR`` and ``ClipGradNorm`` -- and only replaces the Trainer's loop.

GRAPH_MODE by default, as the 7B YAML runs (``context.mode: 0``): the forward, the per-micro-batch
gradient, the gradient accumulation and MindFormers' clip + AdamW are compiled ``nn.Cell``s
(``mode="pynative"`` for debugging). float32 on CPU (``bfloat16`` sets ``compute_dtype`` only;
parameters, layernorm, softmax and RoPE stay float32 as in the 7B YAML). Gradient accumulation is
per token over all micro-batches of a step (see :meth:`MindSporeBackend.train_step`). Tied
students keep ``tie_word_embeddings`` so ``LlamaForCausalLM`` shares the embedding with lm_head.
Weights come from HF safetensors through ``distilled.train.convert.hf_to_mf``. The packed-mask fix
``distilled.train.mindformers_compat.apply_packed_mask_shim`` is applied by default; ``packed_shim=False``
runs stock MindFormers 1.9 (tests use it to prove the packing check catches its leak).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from distilled.train.backends.base import (Backend, ForwardResult, LoraSettings, PackedBatch,
                                     StepResult, TrainSettings, as_micro_batches, lora_regex_from_targets,
                                     wants_weight_decay)
from distilled.train.convert import hf_to_mf, mf_to_hf
from distilled.train.hf_mf_names import (check_model_config, hf_lora_name_to_mf, hf_name_to_mf, mf_lora_name_to_hf,
                                   mf_model_config_from_hf)

# MindFormers model_config keys this backend forces, and why (reported, never silent).
FORCED = {
    "use_past": False,  # training, no KV cache
    "use_flash_attention": False,  # FlashAttentionScore has no CPU kernel
    "use_rope_slice": True,  # batched RoPE matmul cannot broadcast on CPU
    "input_sliced_sig": True,  # packed labels are already shifted
    "qkv_concat": False,  # separate wq/wk/wv, as HF stores them
}


def hf_to_mf_state(state: Mapping[str, np.ndarray], tie_word_embeddings: bool) -> dict[str, np.ndarray]:
    """HF state -> MindFormers names, through the project's converter (unknown names are errors)."""
    return {k: np.asarray(v) for k, v in hf_to_mf(dict(state), tie_word_embeddings).items()}


def mf_to_hf_state(state: Mapping[str, np.ndarray], tie_word_embeddings: bool) -> dict[str, np.ndarray]:
    """MindFormers names -> HF names (tied: no ``lm_head.weight``), through the project's converter."""
    return {k: np.asarray(v) for k, v in mf_to_hf(dict(state), tie_word_embeddings).items()}


class MindSporeBackend(Backend):
    """MindFormers 1.9 legacy ``LlamaForCausalLM``, compiled in GRAPH_MODE by default (as the 7B
    YAML's ``context.mode: 0`` runs it); ``mode="pynative"`` for debugging."""

    name = "mindspore"

    def __init__(self, device_target: str = "CPU", packed_shim: bool = True, mode: str = "graph"):
        if mode not in ("graph", "pynative"):
            raise ValueError(f"mode must be 'graph' or 'pynative', got {mode!r}")
        self.mode = mode
        self.device_target = device_target
        self.packed_shim = packed_shim
        self.model = None
        self.optimizer = None
        self.settings: TrainSettings | None = None
        self.step_count = 0
        self.forced: dict[str, tuple[Any, Any]] = {}
        self.lora: LoraSettings | None = None

    # ---------------------------------------------------------------- loading and saving
    def load_hf(self, weights_dir, model_config=None, dtype="float32", seq_length=None, batch_size=1) -> None:
        import mindspore as ms
        from safetensors.numpy import load_file

        from distilled.train import mindformers_compat as compat

        if dtype == "bfloat16" and self.device_target == "CPU":
            raise ValueError("dtype bfloat16: MindSpore 2.9's CPU MatMul has no bfloat16 kernel; run bf16 parity "
                             "on Ascend (device_target Ascend) or use --dtype float32 on CPU")
        weights_dir = Path(weights_dir)
        cfg_path = weights_dir / "config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{weights_dir}: no config.json (expected an HF model directory)")
        hf = json.loads(cfg_path.read_text())
        check_model_config(model_config, hf, str(cfg_path))
        self.hf_config = hf
        self.weights_dir = weights_dir

        ms.set_context(mode=ms.GRAPH_MODE if self.mode == "graph" else ms.PYNATIVE_MODE,
                       device_target=self.device_target)
        if self.device_target == "CPU":
            compat.apply_cpu_shims()
        compat.apply_packed_mask_shim(self.packed_shim)
        from mindformers import LlamaConfig, LlamaForCausalLM

        mc = mf_model_config_from_hf(hf)
        if model_config:
            mc.update({k: v for k, v in dict(model_config).items() if k != "type"})
        for k, v in FORCED.items():
            if k in mc and mc[k] != v:
                self.forced[k] = (mc[k], v)
            mc[k] = v
        compute = "bfloat16" if dtype == "bfloat16" else "float32"
        for k, v in (("compute_dtype", compute), ("param_init_type", "float32"),
                     ("layernorm_compute_type", "float32"), ("softmax_compute_type", "float32"),
                     ("rotary_dtype", "float32")):
            if k in mc and mc[k] != v:
                self.forced[k] = (mc[k], v)
            mc[k] = v
        if seq_length is not None:
            mc["seq_length"] = int(seq_length)
        mc["batch_size"] = int(batch_size)
        mc.pop("checkpoint_name_or_path", None)
        # tied students (Qwen2.5-0.5B/1.5B/3B): LlamaForCausalLM shares one Parameter between
        # tok_embeddings and lm_head when the config says so; config.json decides (a YAML that
        # disagrees was already refused by check_model_config)
        self.tie = bool(hf.get("tie_word_embeddings", mc.get("tie_word_embeddings", False)))
        mc["tie_word_embeddings"] = self.tie
        model = LlamaForCausalLM(LlamaConfig(**mc))

        files = sorted(weights_dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{weights_dir}: no *.safetensors files")
        state: dict[str, np.ndarray] = {}
        for f in files:
            state.update(load_file(str(f)))
        mf_state = hf_to_mf_state(state, self.tie)
        params = {p.name: p for p in model.get_parameters()}
        missing = [n for n in params if n not in mf_state and params[n].requires_grad]
        extra = [n for n in mf_state if n not in params]
        if missing or extra:
            raise ValueError(f"{weights_dir}: weights do not fit the MindFormers model: "
                             f"missing {missing[:5]}, unexpected {extra[:5]}")
        for n, p in params.items():
            if n in mf_state:
                v = mf_state[n].astype(np.float32)
                if tuple(v.shape) != tuple(p.shape):
                    raise ValueError(f"{weights_dir}: {n} has shape {v.shape}, model wants {tuple(p.shape)}")
                p.set_data(ms.Tensor(v, dtype=p.dtype))
        self.model = model
        self.model.set_train(True)

    def enable_lora(self, lora: LoraSettings) -> None:
        """MindFormers' own LoRA: ``LoraAdapter.get_pet_model`` swaps the target ``Linear`` cells for
        MindPet ``LoRADense`` (scaling alpha/rank, A He-uniform, B zeros); everything else is frozen,
        as MindFormers' ``freeze_pretrained_model`` does for ``pet_type: lora``."""
        from mindformers.pet.tuners.lora_adapter import LoraAdapter

        if self.optimizer is not None:
            raise RuntimeError("enable_lora() must come before setup_training()")
        cfg = {"pet_type": "lora", "lora_rank": int(lora.rank), "lora_alpha": int(lora.alpha),
               "lora_dropout": float(lora.dropout), "target_modules": lora_regex_from_targets(lora.targets)}
        if float(int(lora.alpha)) != float(lora.alpha):
            raise ValueError(f"lora alpha {lora.alpha} must be an integer (MindFormers casts it with int())")
        self.model = LoraAdapter.get_pet_model(self.model, cfg)
        n = 0
        for p in self.model.get_parameters():
            p.requires_grad = "mindpet_delta_lora" in p.name
            n += p.requires_grad
        if n == 0:
            raise ValueError(f"LoRA targets {lora.targets} matched no layer of the MindFormers model")
        self.lora = lora

    def named_parameters(self) -> dict[str, np.ndarray]:
        base, lora = {}, {}
        for p in self.model.get_parameters():
            hf = mf_lora_name_to_hf(p.name)
            if hf is not None:
                lora[hf] = p.asnumpy().astype(np.float32).copy()
            else:
                base[p.name] = p.asnumpy().astype(np.float32).copy()
        out = mf_to_hf_state(base, self.tie)
        out.update(lora)
        return out

    def load_named_parameters(self, params: Mapping[str, np.ndarray]) -> None:
        """Overwrite parameters by HF name (tests perturb weights, parity syncs LoRA A through this)."""
        import mindspore as ms

        own = {p.name: p for p in self.model.get_parameters()}
        for hf, v in params.items():
            try:
                k = hf_lora_name_to_mf(hf) or hf_name_to_mf(hf)
            except KeyError:
                raise KeyError(f"{hf!r} is not an HF Qwen2 parameter name (distilled.train.hf_mf_names)") from None
            if k not in own:
                raise KeyError(f"no parameter {k!r} (HF {hf!r}) in the MindSpore model")
            own[k].set_data(ms.Tensor(np.asarray(v, dtype=np.float32), dtype=own[k].dtype))

    def save_hf(self, output_dir) -> Path:
        from safetensors.numpy import save_file

        from distilled.io_utils import atomic_dir

        out = Path(output_dir)
        state = {k: np.ascontiguousarray(v) for k, v in self.named_parameters().items()}
        if self.lora is not None:  # merge: W + (alpha/rank) * B @ A, HF layout
            scale = float(int(self.lora.alpha)) / int(self.lora.rank)
            for k in [k for k in state if k.endswith(".lora_A.weight")]:
                mod = k[: -len("lora_A.weight")]
                a, b = state.pop(k), state.pop(mod + "lora_B.weight")
                state[mod + "weight"] = (state[mod + "weight"] + scale * (b @ a)).astype(np.float32)
        with atomic_dir(out) as tmp:
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            (tmp / "config.json").write_text(json.dumps(self.hf_config, indent=2))
        return out

    # ---------------------------------------------------------------- forward and loss
    def _tensors(self, batch: PackedBatch):
        import mindspore as ms

        return (ms.Tensor(batch.input_ids.astype(np.int32)), ms.Tensor(batch.labels.astype(np.int32)),
                ms.Tensor(batch.loss_mask.astype(np.int32)), ms.Tensor(batch.position_ids.astype(np.int32)),
                ms.Tensor(batch.mindformers_attention_mask()))

    def _fwd(self, ids, labels, loss_mask, pos, mask):
        return self.model(ids, labels=labels, loss_mask=loss_mask, position_ids=pos, attention_mask=mask)

    def forward(self, batch: PackedBatch, return_logits: bool = False) -> ForwardResult:
        t = self._tensors(batch)
        self.model.set_train(True)
        loss = float(self._fwd(*t).asnumpy().reshape(-1)[0])
        count = batch.num_loss_tokens
        logits = None
        if return_logits:
            self.model.set_train(False)
            try:
                out = self._fwd(*t)
            finally:
                self.model.set_train(True)
            logits = out[0].asnumpy().astype(np.float32).reshape(batch.batch_size, batch.seq_length, -1)
        return ForwardResult(loss, loss * (count + 1e-8), count, logits)

    # ---------------------------------------------------------------- training
    def setup_training(self, settings: TrainSettings) -> None:
        import mindspore as ms
        from mindformers.core.clip_grad import ClipGradNorm
        from mindformers.core.lr import LinearWithWarmUpLR
        from mindformers.core.optim.adamw import AdamW

        if settings.kd_alpha is not None:  # the in-process MindSpore backend has no KD loss path
            raise ValueError("the mindspore backend trains CE only; train a KD YAML with run_mindformer.py (MindFormers' "
                             "Trainer with KDLlamaForCausalLM) or --backend torch; `distill parity --check kd` compares "
                             "the two KD losses")
        ms.set_seed(settings.seed)
        params = self.model.trainable_params()
        decay = [p for p in params if wants_weight_decay(p.name, len(p.shape))]
        no_decay = [p for p in params if not wants_weight_decay(p.name, len(p.shape))]
        groups = []
        if decay:
            groups.append({"params": decay, "weight_decay": float(settings.weight_decay)})
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        groups.append({"order_params": params})
        if settings.lr_schedule == "constant":
            lr = float(settings.learning_rate)
        else:
            lr = LinearWithWarmUpLR(learning_rate=float(settings.learning_rate), total_steps=int(settings.total_steps),
                                    warmup_steps=int(settings.warmup_steps),
                                    warmup_lr_init=float(settings.warmup_lr_init))
        self.lr_schedule = lr
        self.optimizer = AdamW(groups, learning_rate=lr, betas=tuple(float(b) for b in settings.betas),
                               eps=float(settings.eps), weight_decay=float(settings.weight_decay))
        clip = ClipGradNorm(max_norm=float(settings.max_grad_norm)) if settings.max_grad_norm else None
        self._grad_cell = _ScaledGradCell(self.model, self.optimizer.parameters)
        self._add_cell = _AddGrads()
        self._update_cell = _ClipAndUpdate(self.optimizer, clip)
        self.settings = settings
        self.step_count = 0

    def train_step(self, batch: PackedBatch | Sequence[PackedBatch]) -> StepResult:
        """One optimizer step over one batch or a list of micro-batches (gradient accumulation),
        per token: each micro-batch's MindFormers loss (its own token mean) is scaled by
        ``(its tokens + 1e-8) / (all trained tokens of the step + 1e-8)`` before its gradient is
        added, so the step's gradient is that of ``sum(token CE) / (total tokens + 1e-8)`` --
        what MF 1.9's ``calculate_per_token_loss`` computes (numerator / summed denominator),
        not ``GradAccumulationCell``'s sum of per-micro-batch means. The gradient, accumulation
        and clip+AdamW pieces are three ``nn.Cell``s, compiled in GRAPH_MODE."""
        import mindspore as ms

        if self.optimizer is None:
            raise RuntimeError("call setup_training() before train_step()")
        micro = as_micro_batches(batch)
        self.model.set_train(True)
        total = float(sum(mb.num_loss_tokens for mb in micro))
        grads = None
        loss_sum = 0.0
        for mb in micro:
            w = (mb.num_loss_tokens + 1e-8) / (total + 1e-8)
            loss, g = self._grad_cell(*self._tensors(mb), ms.Tensor(w, ms.float32))
            loss_sum += float(loss.asnumpy().reshape(-1)[0]) * (mb.num_loss_tokens + 1e-8)
            # mutable: a plain tuple of Tensors is a graph *constant* and would recompile every call
            grads = ms.mutable(tuple(g)) if grads is None else ms.mutable(tuple(self._add_cell(grads, ms.mutable(tuple(g)))))
        if isinstance(self.lr_schedule, float):
            lr = self.lr_schedule
        else:  # MindFormers' own schedule value for this step (the optimizer reads the same)
            lr = float(self.lr_schedule(ms.Tensor(self.step_count, ms.int32)).asnumpy())
        norm = self._update_cell(grads)
        res = StepResult(self.step_count, loss_sum / (total + 1e-8), float(np.asarray(norm.asnumpy()).reshape(-1)[0]),
                         lr, int(total))
        self.step_count += 1
        return res


def _cells():
    """The three training Cells, defined on first use so that importing this module never imports
    MindSpore. Every construct here is graph-mode safe: no imports, no Python-side state."""
    import mindspore as ms
    from mindspore import nn, ops

    class LossNet(nn.Cell):
        """MindFormers' loss of one micro-batch (its own token mean), positional inputs only."""

        def __init__(self, model):
            super().__init__(auto_prefix=False)
            self.model = model

        def construct(self, ids, labels, loss_mask, pos, mask):
            return self.model(ids, labels=labels, position_ids=pos, attention_mask=mask, loss_mask=loss_mask)

    class ScaledGradCell(nn.Cell):
        """(loss, grads of ``scale * loss``) for one micro-batch: the sensitivity is the scale,
        exactly how MindSpore's TrainOneStepCell feeds its loss scale."""

        def __init__(self, model, weights):
            super().__init__(auto_prefix=False)
            self.net = LossNet(model)
            self.weights = weights
            self.grad = ops.GradOperation(get_by_list=True, sens_param=True)

        def construct(self, ids, labels, loss_mask, pos, mask, scale):
            loss = self.net(ids, labels, loss_mask, pos, mask)
            sens = ops.cast(scale, loss.dtype) * ops.ones_like(loss)
            grads = self.grad(self.net, self.weights)(ids, labels, loss_mask, pos, mask, sens)
            return loss, grads

    class AddGrads(nn.Cell):
        """Element-wise sum of two gradient tuples (the accumulation buffer)."""

        def __init__(self):
            super().__init__(auto_prefix=False)
            self.map = ops.HyperMap()
            self.add = ops.Add()

        def construct(self, a, b):
            return self.map(self.add, a, b)

    class ClipAndUpdate(nn.Cell):
        """MindFormers' ClipGradNorm (global norm before clipping) then its AdamW."""

        def __init__(self, optimizer, clip):
            super().__init__(auto_prefix=False)
            self.optimizer = optimizer
            self.clip = clip
            self.use_clip = clip is not None

        def construct(self, grads):
            if self.use_clip:
                grads, norm = self.clip(grads)
            else:
                sq = ops.zeros((), ms.float32)
                for g in grads:
                    sq = sq + ops.sum(ops.square(ops.cast(g, ms.float32)))
                norm = ops.sqrt(sq)
            self.optimizer(grads)
            return norm

    return ScaledGradCell, AddGrads, ClipAndUpdate


def _ScaledGradCell(model, weights):  # noqa: N802 - factory named like the Cell it builds
    return _cells()[0](model, weights)


def _AddGrads():  # noqa: N802
    return _cells()[1]()


def _ClipAndUpdate(optimizer, clip):  # noqa: N802
    return _cells()[2](optimizer, clip)
