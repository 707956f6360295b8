"""Every MindFormers 1.9 compatibility shim this project applies, each named, explained and tested.

Why this module exists: MindFormers 1.9 (the newest release that installs from PyPI beside
MindSpore 2.9) runs the Qwen2.5 training path, the legacy ``LlamaForCausalLM``, on Ascend only,
and even there it trains packed rows wrongly. Rather than scattering monkey-patches over scripts,
each fix is one small function here with a docstring saying *why*, and ``tests/
test_mindformers_compat.py`` proves each one changes what it claims to change.

Two entry points (a contract with ``distilled/backends`` and ``run_mindformer.py``):

* :func:`apply_cpu_shims` -- what the legacy model and MindFormers' Trainer need to run on a CPU
  (FACTS section 2): composed RMSNorm, a real isfinite overflow check, an AllReduce barrier, and
  complete checkpoints loaded on every data-parallel rank. ``run_mindformer.py`` (and the
  ``mindspore`` backend) call it only when ``device_target`` is CPU. It returns the shim names.
* :func:`apply_packed_rope_shim` -- packed-sequence correctness for every device. MindFormers 1.9's
  ``LlamaModel.construct`` (a) ignores ``position_ids`` in training, so RoPE positions keep counting
  across document boundaries inside a packed row, and (b) without flash attention, *adds* the
  packed ``attention_mask`` (uint8, 1 = masked) to the attention scores instead of masking with a
  large negative number, so every token sees the future and the other documents. The shim gathers
  the RoPE cos/sin tables by ``position_ids`` and turns the 0/1 mask into an additive ``-1e4``
  mask on the non-flash path; with flash attention the 0/1 mask (or the compressed EOD mask with
  ``actual_seq_len``) is already what the kernel wants, so only the RoPE positions change.

Nothing here imports MindSpore or MindFormers at module import time (``distill --help`` stays fast).
"""

from __future__ import annotations

from typing import Any, Callable

__all__ = [
    "apply_cpu_shims",
    "apply_packed_rope_shim",
    "packed_rope_shim_enabled",
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
    from mindspore import ops
    import mindspore.common.dtype as mstype

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

    Why an AllReduce: ``ops.Barrier`` has no CPU kernel, AllReduce has one (FACTS section 1), and
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
# Packed-sequence shim (every device)
# --------------------------------------------------------------------------------------------

def _packed_llama_model_construct(self, tokens, input_embeds=None, batch_valid_length=None, batch_index=None,
                                  zactivate_len=None, block_tables=None, slot_mapping=None,
                                  prefix_keys_values=None, attention_mask=None, position_ids=None,
                                  q_seq_lens=None, seq_range=None, actual_seq_len=None):  # noqa: ANN001
    """``LlamaModel.construct`` that honours packed ``position_ids`` and ``attention_mask``.

    Only the no-KV-cache forward with ``position_ids`` and either an ``attention_mask`` or the
    compressed EOD mask (``use_eod_attn_mask_compression``) changes; every other call goes to
    MindFormers' own construct unchanged.
    """
    from mindspore import ops
    import mindspore.common.dtype as mstype

    original = _ORIGINALS["LlamaModel.construct"]
    # Flash attention with a compressed EOD mask (TND layout, actual_seq_len): MindFormers' own
    # causal mask is right there, only the RoPE positions need fixing.
    eod_compressed = self.use_eod_attn_mask_compression and not self.use_ring_attention
    if (position_ids is None or (attention_mask is None and not eod_compressed) or self.use_past
            or self.chunk_prefill or self.parallel_decoding or self.seq_pipe or prefix_keys_values is not None):
        return original(self, tokens, input_embeds, batch_valid_length, batch_index, zactivate_len,
                        block_tables, slot_mapping, prefix_keys_values, attention_mask, position_ids,
                        q_seq_lens, seq_range, actual_seq_len)

    bs, seq_len = self.shape(tokens)
    if position_ids.shape[-1] != seq_len:
        raise ValueError(
            f"packed data: position_ids has length {position_ids.shape[-1]} but the model sees {seq_len} "
            "tokens; set model.model_config.input_sliced_sig: True (packed labels are already shifted)")
    if actual_seq_len is not None:
        actual_seq_len = self.reshape(actual_seq_len, (-1,))

    # RoPE by position: gather the precomputed cos/sin rows for each token's own position, so
    # positions restart at 0 for every document of the row (as HF's Qwen2 does with position_ids).
    pos = ops.reshape(ops.cast(position_ids, mstype.int32), (-1,))
    head_dim = self.freqs_mgr.head_dim
    freqs_cos = ops.reshape(ops.gather(self.freqs_mgr.freqs_cos, pos, 0), (bs, 1, seq_len, head_dim))
    freqs_sin = ops.reshape(ops.gather(self.freqs_mgr.freqs_sin, pos, 0), (bs, 1, seq_len, head_dim))
    freqs_cis = (freqs_cos, freqs_sin, self.freqs_mgr.swap_mask)

    # Mask. Compressed EOD (flash attention, TND): MindFormers' own compressed causal mask, the
    # document boundaries travel in actual_seq_len. Otherwise the data gives 1 = masked
    # (block-diagonal causal), shape (bs, S, S) or (bs, 1, S, S).
    if eod_compressed:
        mask = self.casual_mask()
    else:
        mask = attention_mask
        if mask.ndim == 3:
            mask = ops.expand_dims(mask, 1)
        if self.use_flash_attention:
            mask = self.cast(mask, mstype.uint8)  # FlashAttentionScore: 1 = masked, as given
        else:
            # The non-flash path *adds* the mask to the scores (MindFormers' own causal mask is
            # (1 - allowed) * -10000); a raw 0/1 mask would only add 1 to masked scores.
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


def apply_packed_rope_shim(enabled: bool = True) -> bool:
    """Install (``enabled=True``) or remove the packed-sequence shim on ``LlamaModel.construct``.

    Why: MindFormers 1.9's legacy Llama (the Qwen2.5 path) builds RoPE from ``freqs_mgr(seq_len)``
    and never reads ``position_ids`` in training, and on the non-flash path it adds the packed 0/1
    mask to the scores. A packed row then trains each document with the wrong positions and lets
    it attend to the documents before it (and to future tokens on CPU). With the shim a packed
    row's loss equals the token-weighted loss of its documents run one by one (tested).

    Returns whether the shim is installed after the call.
    """
    from mindformers.models.llama.llama import LlamaModel

    _ORIGINALS.setdefault("LlamaModel.construct", LlamaModel.construct)
    if enabled:
        LlamaModel.construct = _packed_llama_model_construct
        _APPLIED.add("packed_rope")
    else:
        LlamaModel.construct = _ORIGINALS["LlamaModel.construct"]
        _APPLIED.discard("packed_rope")
    return enabled


def packed_rope_shim_enabled() -> bool:
    """Whether ``LlamaModel.construct`` is currently the packed-aware replacement."""
    from mindformers.models.llama.llama import LlamaModel

    return LlamaModel.construct is _packed_llama_model_construct
