"""Every MindFormers 1.9 compatibility shim this project applies, each named, explained and tested.

Why this module exists: MindFormers 1.9 (the newest release that installs from PyPI beside
MindSpore 2.9) runs the Qwen2.5 training path, the legacy ``LlamaForCausalLM``, on Ascend only,
and even there it trains packed rows wrongly on the non-flash path. Rather than scattering
monkey-patches over scripts, each fix is one small function here with a docstring saying *why*,
and ``tests/test_mindformers_compat.py`` proves each one changes what it claims to change.

Three entry points (a contract with ``distilled/backends`` and ``run_mindformer.py``):

* :func:`apply_cpu_shims` -- what the legacy model and MindFormers' Trainer need to run on a CPU:
  composed RMSNorm, a real isfinite overflow check, an AllReduce barrier, and complete checkpoints
  loaded on every data-parallel rank. ``run_mindformer.py`` (and the ``mindspore`` backend) call
  it only when ``device_target`` is CPU. It returns the shim names.
* :func:`apply_packed_mask_shim` -- packed rows on the **non-flash** attention path (every
  device). There MindFormers 1.9's ``LlamaModel.construct`` passes the loader's packed 0/1 mask
  (1 = masked) straight to the attention, which *adds* it to the scores (it expects MindFormers'
  own ``-10000`` adder): masked scores get +1, so every token sees the future and the other
  documents of its row. The shim turns the 0/1 mask into ``mask x -10000``. It changes nothing
  else: with flash attention (a uint8 mask, or the compressed EOD mask with ``actual_seq_len``)
  MindFormers already masks per document, so ``run_mindformer.py`` does not install it there.
  RoPE positions do not restart inside a packed row (the legacy model ignores ``position_ids``
  in training), and that is harmless: with a correct block-diagonal mask a RoPE score depends
  only on the distance between two tokens of the same document, so a packed row's loss equals
  its documents' token-weighted loss run one by one (tested, to 1e-5 in fp32).
* :func:`shim_global_token_mean_data_parallel` -- per-token loss over the whole data-parallel
  batch. With ``calculate_per_token_loss`` MindFormers 1.9 divides each rank's gradient by that
  rank's own trained-token count and then *averages* the ranks (``DistributedGradReducer``), a
  mean of per-rank means; the shim all-reduces the token count first, so the step is
  sum(token losses over all ranks and micro-batches) / (trained tokens in the global batch).

MindSpore is imported at module level because the graph compiler rejects ``import`` statements
inside anything it compiles (``RuntimeError: Unsupported statement 'ImportFrom'``). Only MindSpore
code paths import this module (``distilled.train.mindformers_run.run`` and the ``mindspore`` backend, both
lazily), so ``distill --help`` does not pay for it.
"""

from __future__ import annotations

from typing import Any, Callable

import mindspore.common.dtype as mstype
from mindspore import ops

__all__ = [
    "apply_cpu_shims",
    "apply_packed_mask_shim",
    "packed_mask_shim_enabled",
    "shim_global_token_mean_data_parallel",
    "shim_grad_accumulation_data_parallel",
    "shim_disable_fused_rmsnorm",
    "shim_finite_overflow_check",
    "shim_barrier_via_allreduce",
    "shim_full_checkpoint_per_rank",
    "CPU_SHIMS",
]

# Names of shims already applied in this process (apply_cpu_shims is idempotent).
_APPLIED: set[str] = set()
# Originals kept so that a shim can be undone (tests compare with and without).
_ORIGINALS: dict[str, Any] = {}


# --------------------------------------------------------------------------------------------
# CPU shims
# --------------------------------------------------------------------------------------------

def shim_disable_fused_rmsnorm() -> None:
    """Make the legacy Llama use the composed RMSNorm instead of the fused Ascend kernel.

    Why: ``mindformers.models.llama.llama_layer.LlamaRMSNorm`` picks the fused ``RmsNorm`` op
    whenever ``check_rmsnorm_big_kernel_valid()`` is true, which it is on everything but a 910A.
    That op has no CPU kernel, so building the model on CPU fails. The composed path (square, mean,
    rsqrt, mul) is numerically the same RMSNorm and runs everywhere.
    """
    import mindformers.models.llama.llama_layer as llama_layer

    _ORIGINALS.setdefault("check_rmsnorm_big_kernel_valid", llama_layer.check_rmsnorm_big_kernel_valid)

    def check_rmsnorm_big_kernel_valid() -> bool:  # noqa: D401 - replacement with the same name
        """CPU: the fused RmsNorm kernel does not exist, use the composed one."""
        return False

    llama_layer.check_rmsnorm_big_kernel_valid = check_rmsnorm_big_kernel_valid


def _finite_get_overflow_status(self, status, compute_output):  # noqa: ANN001 - MindSpore signature
    """A real overflow test: True when any gradient holds an inf or a NaN.

    ``compute_output`` is the tuple of (already all-reduced) gradients; ``status`` only orders the
    check after the backward pass on Ascend and is unused here. Every rank sees the same reduced
    gradients, so every rank reaches the same verdict without another collective.
    """
    flags = ()
    for grad in compute_output:
        flags += (ops.cast(ops.logical_not(ops.isfinite(grad).all()), mstype.float32),)
    if not flags:
        return ops.zeros((), mstype.bool_)
    return ops.stack(flags).sum() > 0


def shim_finite_overflow_check() -> None:
    """Replace ``TrainOneStepWithLossScaleCell.get_overflow_status`` with a finite test on CPU.

    Why: on a device that is neither GPU nor Ascend 910B, MindSpore falls into the 910A branch,
    which calls the Ascend-only ``NPUGetFloatStatusV2`` op and fails on CPU. MindFormers'
    ``MFTrainOneStepCell`` skips the optimizer step when this returns True, so a constant False
    would silently apply inf/NaN updates; instead we check ``isfinite`` over every gradient.
    """
    from mindspore.nn.wrap.loss_scale import TrainOneStepWithLossScaleCell

    _ORIGINALS.setdefault("get_overflow_status", TrainOneStepWithLossScaleCell.get_overflow_status)
    TrainOneStepWithLossScaleCell.get_overflow_status = _finite_get_overflow_status


def _allreduce_barrier(group: Any = None) -> None:
    """Block until every rank of ``group`` gets here: an AllReduce of one number, then a host sync.

    Why an AllReduce: ``ops.Barrier`` has no CPU kernel, AllReduce has one, and
    a collective cannot complete before all ranks have entered it, which is what a barrier is.
    """
    import mindspore as ms
    from mindspore import ops
    from mindspore.communication import GlobalComm

    op = ops.AllReduce(group=group or GlobalComm.WORLD_COMM_GROUP)
    op(ms.Tensor([1.0], ms.float32)).asnumpy()


# Modules that did ``from mindspore.communication.comm_func import barrier`` (a name copy each).
_BARRIER_MODULES = (
    "mindspore.communication.comm_func",
    "mindformers.version_control",          # skip_barrier_controller (HFDataLoader after loading)
    "mindformers.trainer.utils",
    "mindformers.utils.load_checkpoint_utils",  # loading a checkpoint with use_parallel
    "mindformers.core.callback.callback",
)


def shim_barrier_via_allreduce() -> None:
    """Replace MindSpore's ``barrier`` (where MindFormers uses it) by an AllReduce-based barrier.

    Why: MindFormers lines ranks up with ``mindspore.communication.comm_func.barrier`` (after the
    dataset is built, around checkpoint loading and saving). It runs ``ops.Barrier``, which has no
    CPU kernel, so a 2-worker CPU run dies there ("Unsupported op [Barrier] on CPU"). A no-op would
    let rank 1 read a checkpoint rank 0 is still writing; an AllReduce is a real barrier and runs on
    CPU. Each rank still builds its own data shard, so the YAML needs ``use_broadcast_data: False``
    (checked by run_mindformer.py).
    """
    import importlib

    for name in _BARRIER_MODULES:
        mod = importlib.import_module(name)
        _ORIGINALS.setdefault(f"{name}.barrier", getattr(mod, "barrier"))
        mod.barrier = _allreduce_barrier


def shim_full_checkpoint_per_rank() -> None:
    """Let every data-parallel rank load a complete checkpoint directory without auto_trans_ckpt.

    Why: MindFormers 1.9 refuses a directory of complete safetensors (an HF model dir, or a
    ``distill convert hf-to-mf`` output) when ``use_parallel`` is True unless ``auto_trans_ckpt``
    is set, and auto_trans then reads a parallel-strategy file that a data-parallel CPU run never
    writes ("The strategy file type should be one of json or protobuf"). On CPU only data
    parallelism runs, so each rank holds the full model and loading the complete files on every
    rank (MindFormers' own single-device path, HF names converted) is exactly right. Only the
    "complete files + use_parallel" check is relaxed; the other file-mode checks stay.
    """
    import mindformers.utils.load_checkpoint_utils as lcu

    original = _ORIGINALS.setdefault("validate_config_with_file_mode", lcu.validate_config_with_file_mode)

    def validate_config_with_file_mode(ckpt_file_mode, use_parallel, auto_trans_ckpt):  # noqa: ANN001
        """CPU (data parallel only): complete checkpoint files load on every rank as they are."""
        if ckpt_file_mode == lcu.CheckpointFileMode.MULTI_CHECKPOINT_FILE.value and use_parallel:
            return None
        return original(ckpt_file_mode, use_parallel, auto_trans_ckpt)

    lcu.validate_config_with_file_mode = validate_config_with_file_mode


CPU_SHIMS: dict[str, Callable[[], None]] = {
    "disable_fused_rmsnorm": shim_disable_fused_rmsnorm,
    "finite_overflow_check": shim_finite_overflow_check,
    "barrier_via_allreduce": shim_barrier_via_allreduce,
    "full_checkpoint_per_rank": shim_full_checkpoint_per_rank,
}


def apply_cpu_shims() -> list[str]:
    """Apply every CPU shim once per process and return the names of all applied shims.

    Idempotent: a second call changes nothing and returns the same list.

    >>> apply_cpu_shims()  # doctest: +SKIP
    ['disable_fused_rmsnorm', 'finite_overflow_check', 'barrier_via_allreduce', 'full_checkpoint_per_rank']
    """
    for name, fn in CPU_SHIMS.items():
        if name not in _APPLIED:
            fn()
            _APPLIED.add(name)
    return [name for name in CPU_SHIMS if name in _APPLIED]


# --------------------------------------------------------------------------------------------
# Packed-row mask shim (non-flash attention, every device)
# --------------------------------------------------------------------------------------------

def _packed_llama_model_construct(self, tokens, input_embeds=None, batch_valid_length=None, batch_index=None,
                                  zactivate_len=None, block_tables=None, slot_mapping=None,
                                  prefix_keys_values=None, attention_mask=None, position_ids=None,
                                  q_seq_lens=None, seq_range=None, actual_seq_len=None):  # noqa: ANN001
    """``LlamaModel.construct`` that applies a packed 0/1 ``attention_mask`` as a mask, not as +1.

    Only the training forward of the non-flash path with a dense ``attention_mask`` changes (the
    same branch of MindFormers' construct, with ``mask x -10000`` instead of the raw uint8 mask);
    every other call (flash attention, the compressed EOD mask, KV cache, no mask) goes to
    MindFormers' own construct unchanged. RoPE stays MindFormers' own ``freqs_mgr(seq_len)``.
    Compiled by MindSpore in graph mode: no imports or unsupported statements in here.
    """
    original = _ORIGINALS["LlamaModel.construct"]
    if (attention_mask is None or self.use_flash_attention or self.use_past or self.chunk_prefill
            or self.parallel_decoding or self.seq_pipe or prefix_keys_values is not None
            or (self.use_eod_attn_mask_compression and not self.use_ring_attention)):
        return original(self, tokens, input_embeds, batch_valid_length, batch_index, zactivate_len,
                        block_tables, slot_mapping, prefix_keys_values, attention_mask, position_ids,
                        q_seq_lens, seq_range, actual_seq_len)

    bs, seq_len = self.shape(tokens)
    if attention_mask.shape[-1] != seq_len:
        raise ValueError("packed data: attention_mask is longer than the tokens the model sees; set "
                         "model.model_config.input_sliced_sig: True (packed labels are already shifted)")
    if actual_seq_len is not None:
        actual_seq_len = self.reshape(actual_seq_len, (-1,))
    freqs_cis = self.freqs_mgr(seq_len)
    # The data gives 1 = masked (block-diagonal causal), shape (bs, S, S) or (bs, 1, S, S); the
    # non-flash attention adds its mask to the scores, as MindFormers' own (1 - allowed) * -10000.
    mask = attention_mask
    if mask.ndim == 3:
        mask = ops.expand_dims(mask, 1)
    mask = ops.mul(self.cast(mask, self.dtype), ops.cast(-10000.0, self.dtype))

    if input_embeds is not None:
        h = self.cast(input_embeds, self.dtype)
    else:
        h = self.cast(self.tok_embeddings(tokens), self.dtype)
    rmsnorm_compute_2d = self.training and self.rmsnorm_compute_2d
    if not rmsnorm_compute_2d:
        h = self.reshape(h, (bs, seq_len, self.hidden_size))
    for i in range(self.num_layers):
        h = self.layers[i](h, freqs_cis, mask, batch_valid_length=batch_valid_length, block_tables=block_tables,
                           slot_mapping=slot_mapping, prefix_keys_values=None, q_seq_lens=q_seq_lens,
                           kv_mask=None, seq_chunk=None, actual_seq_len=actual_seq_len)
    if rmsnorm_compute_2d:
        h = self.reshape(h, (bs * seq_len, -1))
    return self.norm_out(h)


def apply_packed_mask_shim(enabled: bool = True) -> bool:
    """Install (``enabled=True``) or remove the packed-mask shim on ``LlamaModel.construct``.

    Why: on the non-flash path MindFormers 1.9 adds the packed 0/1 mask to the attention scores,
    so a packed row lets every token attend to the future and to the other documents of its row
    (tested: document 1's loss changes when document 2's tokens change). With the shim a packed
    row's loss equals the token-weighted loss of its documents run one by one. Install it only
    where ``use_flash_attention`` is False; the replacement hands flash-attention calls back to
    MindFormers unchanged anyway.

    Returns whether the shim is installed after the call.
    """
    from mindformers.models.llama.llama import LlamaModel

    _ORIGINALS.setdefault("LlamaModel.construct", LlamaModel.construct)
    if enabled:
        LlamaModel.construct = _packed_llama_model_construct
        _APPLIED.add("packed_mask")
    else:
        LlamaModel.construct = _ORIGINALS["LlamaModel.construct"]
        _APPLIED.discard("packed_mask")
    return enabled


def packed_mask_shim_enabled() -> bool:
    """Whether ``LlamaModel.construct`` is currently the packed-mask replacement."""
    from mindformers.models.llama.llama import LlamaModel

    return LlamaModel.construct is _packed_llama_model_construct


# --------------------------------------------------------------------------------------------
# Per-token loss over data-parallel ranks (every device, data-parallel mode)
# --------------------------------------------------------------------------------------------

def _per_token_train_cell_init(self, *args: Any, **kwargs: Any) -> None:
    """``MFTrainOneStepCell.__init__`` plus what the global token mean needs (an AllReduce and the
    reducer's averaging factor), decided once here so the compiled step sees constants."""
    _ORIGINALS["MFTrainOneStepCell.__init__"](self, *args, **kwargs)
    self.global_token_mean = bool(self.calculate_per_token_loss and self.reducer_flag and self.degree > 1)
    if self.global_token_mean:
        self.token_allreduce = ops.AllReduce()
        # DistributedGradReducer divides by the rank count when gradients_mean is True: undo that
        self.token_count_scale = 1.0 / self.degree if self.mean else 1.0


def _global_token_grads_for_legacy(self, scaling_sens, *inputs):  # noqa: ANN001 - MindFormers signature
    """``MFTrainOneStepCell.grads_for_legacy`` whose per-token denominator is the global token count.

    MindFormers scales the gradients by ``1 / (scaling_sens * grad_scale_factor)`` and then
    all-reduces them. Returning the all-reduced token count (times the reducer's own ``1/degree``
    when it averages) makes the reduced gradient sum_ranks(grad of summed token losses) / total
    tokens; the returned loss is the global token mean, the same number on every rank.
    Compiled in graph mode: no imports in here.
    """
    # MindFormers' own body, repeated: calling the saved original from a compiled method fails
    # in MindSpore 2.9's parser ("'super' object has no attribute '__module__'").
    if not self.calculate_per_token_loss:
        loss = self.network(*inputs)
        scaling_sens_filled = ops.ones_like(loss) * ops.cast(scaling_sens, ops.dtype(loss))
        grads = self.grad(self.network, self.weights)(*inputs, scaling_sens_filled)
        return loss, grads, self.grad_scale_factor
    numerator, denominator = self.network(*inputs)
    scaling_sens_filled = ops.ones_like(numerator) * ops.cast(scaling_sens, ops.dtype(numerator))
    scaling_sens_filled2 = self.zero_t * ops.cast(scaling_sens, ops.dtype(denominator))
    grads = self.grad(self.network, self.weights)(*inputs, (self.cast(scaling_sens_filled, mstype.float32),
                                                            self.cast(scaling_sens_filled2, mstype.float32)))
    if not self.global_token_mean:
        return numerator / denominator, grads, denominator
    total = self.token_allreduce(denominator)
    loss = self.token_allreduce(numerator) / total
    return loss, grads, total * self.token_count_scale


def shim_global_token_mean_data_parallel() -> None:
    """Make ``calculate_per_token_loss`` a global token mean under data parallel (``parallel_mode: 0``).

    Why: MindFormers 1.9's legacy path (``MFTrainOneStepCell.grads_for_legacy``) divides each
    rank's gradient by that rank's own trained-token count, then ``DistributedGradReducer``
    averages the ranks. A rank whose rows hold 10 trained tokens then weighs as much as one with
    400: per-rank averaging, the multi-rank form of the gradient-accumulation loss bug. This shim
    all-reduces the token count (and the summed loss) so every rank applies
    sum(token-loss gradients of all ranks) / (trained tokens of all ranks). It is inert without
    ``calculate_per_token_loss``, on one rank, and in semi/auto parallel (no grad reducer there:
    the compiler inserts the reductions; not verified here, see docs/scaling.md).
    """
    from mindformers.wrapper.wrapper import MFTrainOneStepCell

    _ORIGINALS.setdefault("MFTrainOneStepCell.__init__", MFTrainOneStepCell.__init__)
    _ORIGINALS.setdefault("MFTrainOneStepCell.grads_for_legacy", MFTrainOneStepCell.grads_for_legacy)
    MFTrainOneStepCell.__init__ = _per_token_train_cell_init
    MFTrainOneStepCell.grads_for_legacy = _global_token_grads_for_legacy
    _APPLIED.add("global_token_mean_data_parallel")


# --------------------------------------------------------------------------------------------
# Gradient accumulation outside semi/auto parallel (every device)
# --------------------------------------------------------------------------------------------

def _check_grad_accumulation_steps_keep(self) -> None:  # noqa: ANN001 - BaseTrainer method
    """``BaseTrainer._check_grad_accumulation_steps`` without the silent reset to 1 in stand-alone
    and data-parallel mode (semi/auto parallel and invalid values go to MindFormers' own check)."""
    import mindspore as ms

    gas = self.config.runner_config.gradient_accumulation_steps
    mode = ms.get_auto_parallel_context("parallel_mode")
    if (mode in ("semi_auto_parallel", "auto_parallel") or not isinstance(gas, int) or isinstance(gas, bool)
            or gas <= 1):
        return _ORIGINALS["BaseTrainer._check_grad_accumulation_steps"](self)
    return None


def shim_grad_accumulation_data_parallel() -> None:
    """Keep ``gradient_accumulation_steps`` in stand-alone and data-parallel runs.

    Why: MindFormers 1.9 (``BaseTrainer._check_grad_accumulation_steps``) resets
    ``gradient_accumulation_steps`` to 1 with only a log warning unless the run is semi/auto
    parallel, so a YAML with GA 16 silently trains 16x more, 16x smaller steps. Everything else
    the legacy path needs already exists: the Trainer feeds ``batch_size x GA`` rows per step and
    wraps the net in ``GradAccumulationCellWithTwoOutput`` (per-token, with
    ``calculate_per_token_loss``), which sums numerators and denominators over the micro-batches.
    Outside semi/auto parallel that cell runs the micro-batches inside one compiled step, so the
    result is exact accumulation (tested: batch 1 x GA 2 gives batch 2 x GA 1's weights); whether
    it also saves memory like real accumulation was not measured.
    """
    from mindformers.trainer.base_trainer import BaseTrainer

    _ORIGINALS.setdefault("BaseTrainer._check_grad_accumulation_steps", BaseTrainer._check_grad_accumulation_steps)
    BaseTrainer._check_grad_accumulation_steps = _check_grad_accumulation_steps_keep
    _APPLIED.add("grad_accumulation_data_parallel")
