"""The logits-distillation loss in MindSpore, graph-mode compatible (see :mod:`distilled.kd.loss_torch`
for the definition; the two are held to fp32 tolerance by tests/test_kd_loss.py).

Why a separate module: MindSpore's graph compiler rejects ``import`` inside compiled code and many
Python constructs, so this file imports at module level and uses ops only: no Python branching on
tensor values, no in-place updates. ``alpha`` and ``temperature`` are Python floats (compile-time
constants). It imports MindSpore at import time: import it only where MindSpore is used.
"""

from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops

NEG = -1.0e4
TAIL_CLAMP = -1.0e-6


def _tail(logp):
    """``log(1 - sum(exp(logp)))`` over the last axis, kept finite."""
    lse = ops.minimum(ops.logsumexp(logp, -1, True), TAIL_CLAMP)
    return ops.log(-ops.expm1(lse))


def kd_loss_terms_ms(logits, labels, mask, topk_ids, topk_logprobs, alpha: float = 0.5, temperature: float = 1.0,
                     ignore_index: int = -100):
    """``(numerator, tokens, ce_sum, kl_sum)`` over the local batch.

    ``logits`` ``[N, V]``, ``labels`` ``[N]`` int, ``mask`` ``[N]`` float (MindFormers' loss_mask;
    multiplied by ``labels != ignore_index``), ``topk_ids`` ``[N, K]`` int, ``topk_logprobs``
    ``[N, K]`` float16/32.
    """
    z = ops.cast(logits, ms.float32)
    trained = ops.cast(ops.not_equal(labels, ignore_index), ms.float32)
    w = trained * ops.cast(mask, ms.float32)
    logp = ops.log_softmax(z, -1)
    safe_labels = ops.cast(ops.maximum(labels, 0), ms.int32)
    ce = -ops.gather_elements(logp, 1, ops.expand_dims(safe_labels, -1)).squeeze(-1)
    ids = ops.cast(topk_ids, ms.int32)
    valid = ops.greater_equal(ids, 0)
    has = ops.cast(valid[:, 0], ms.float32) * w
    slog = ops.log_softmax(z / temperature, -1)
    neg = ops.full_like(ops.cast(topk_logprobs, ms.float32), NEG)
    s_k = ops.where(valid, ops.gather_elements(slog, 1, ops.maximum(ids, 0)), neg)
    sb = ops.concat((s_k, _tail(s_k)), -1)
    t_k = ops.stop_gradient(ops.where(valid, ops.cast(topk_logprobs, ms.float32), neg))
    tb = ops.log_softmax(ops.concat((t_k, _tail(t_k)), -1) / temperature, -1)
    kl = (ops.exp(tb) * (tb - sb)).sum(-1)
    ce_sum = (ce * w).sum()
    kl_sum = (kl * has).sum()
    return alpha * ce_sum + (1.0 - alpha) * kl_sum, w.sum(), ce_sum, kl_sum


class KDLoss(nn.Cell):
    """Cell form: ``construct(logits, labels, mask, topk_ids, topk_logprobs) -> (numerator, denominator)``
    or the per-token mean when ``per_token_outputs=False`` (denominator + 1e-8, as MindFormers'
    CrossEntropyLoss)."""

    def __init__(self, alpha: float = 0.5, temperature: float = 1.0, per_token_outputs: bool = False,
                 ignore_index: int = -100):
        super().__init__()
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.per_token_outputs = per_token_outputs
        self.ignore_index = int(ignore_index)

    def construct(self, logits, labels, mask, topk_ids, topk_logprobs):
        num, den, _, _ = kd_loss_terms_ms(logits, labels, mask, topk_ids, topk_logprobs, self.alpha,
                                          self.temperature, self.ignore_index)
        den = den + 1e-8
        if self.per_token_outputs:
            return num, den
        return num / den
