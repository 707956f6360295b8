"""The logits-distillation loss in torch: ``alpha * CE + (1 - alpha) * KL`` per trained token.

Definition (identical in :mod:`distilled.kd.loss_ms`; ``distill parity`` and the tests hold the
two to fp32 tolerance, loss and gradients):

* CE at each trained position (``labels != -100``, times ``mask`` when given): ``-log softmax(z)[label]``.
* KL at each trained position that has teacher data (``topk_ids[..., 0] >= 0``): forward
  ``KL(teacher || student)`` over ``K + 1`` buckets, the teacher's top-K tokens plus one tail
  bucket for all other tokens (TRL's server-side distillation loss, ``_add_tail_bucket``):

  - student buckets: ``log softmax(z / T)`` gathered at the teacher's ids, tail
    ``log(1 - sum(exp(.)))``;
  - teacher buckets: the stored log-probabilities (at T = 1, as servers return them) and their
    tail, re-tempered as ``log_softmax(buckets / T)``; at ``T = 1`` that is the identity, so the
    loss is exactly TRL's. (With ``T != 1`` tempering the K+1 buckets is an approximation: the
    teacher's tail is one bucket, not its 150k tokens.) No ``T^2`` factor, as in TRL.
  - entries with id ``-1`` (fewer than K returned) have zero probability on both sides.

* Normalisation: ``sum(per-token loss) / N`` with ``N`` the trained tokens of the **global**
  batch (all micro-batches and data-parallel ranks: pass ``num_items``), TRL's
  ``num_items_in_batch`` semantics; :func:`kd_loss_terms` returns the numerator and the local
  token count so callers can sum both before dividing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NEG = -1.0e4  # "minus infinity" that stays finite: exp(-1e4) == 0 in float32, no inf - inf NaNs
TAIL_CLAMP = -1.0e-6  # log of the top-K mass is clamped below 0 so the tail log stays finite


def _tail(logp: torch.Tensor) -> torch.Tensor:
    """``log(1 - sum(exp(logp)))`` over the last axis, kept finite."""
    lse = torch.logsumexp(logp, dim=-1, keepdim=True).clamp(max=TAIL_CLAMP)
    return torch.log(-torch.expm1(lse))


def kd_loss_terms(logits: torch.Tensor, labels: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                  alpha: float = 0.5, temperature: float = 1.0, mask: torch.Tensor | None = None,
                  ignore_index: int = -100) -> dict[str, torch.Tensor]:
    """Sums over the local batch: ``numerator`` (the loss sum), ``tokens`` (trained count),
    ``ce_sum``, ``kl_sum`` and ``kd_tokens`` (positions with teacher data).

    ``logits`` ``[..., V]`` (any float dtype; computed in float32), ``labels`` ``[...]`` already
    aligned with the logits (position p predicts labels[p]), ``topk_ids`` ``[..., K]`` int,
    ``topk_logprobs`` ``[..., K]`` float16/32, ``mask`` ``[...]`` optional float weights
    (MindFormers' ``loss_mask``).
    """
    z = logits.float()
    trained = labels != ignore_index
    w = trained.float() if mask is None else trained.float() * mask.float()
    logp = F.log_softmax(z, dim=-1)
    ce = -logp.gather(-1, labels.clamp(min=0).long().unsqueeze(-1)).squeeze(-1)
    valid = topk_ids >= 0
    has = valid[..., 0].float() * w
    slog = logp if temperature == 1.0 else F.log_softmax(z / temperature, dim=-1)
    s_k = torch.where(valid, slog.gather(-1, topk_ids.clamp(min=0).long()), torch.full_like(slog[..., :1], NEG))
    sb = torch.cat([s_k, _tail(s_k)], dim=-1)
    t_k = torch.where(valid, topk_logprobs.float(), torch.full_like(s_k, NEG)).detach()
    tb = F.log_softmax(torch.cat([t_k, _tail(t_k)], dim=-1) / temperature, dim=-1)
    kl = (tb.exp() * (tb - sb)).sum(-1)
    ce_sum = (ce * w).sum()
    kl_sum = (kl * has).sum()
    return {"numerator": alpha * ce_sum + (1.0 - alpha) * kl_sum, "tokens": w.sum(), "ce_sum": ce_sum,
            "kl_sum": kl_sum, "kd_tokens": has.sum()}


def kd_loss(logits: torch.Tensor, labels: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
            alpha: float = 0.5, temperature: float = 1.0, num_items: float | torch.Tensor | None = None,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """The loss of this batch normalised by ``num_items`` trained tokens (default: this batch's)."""
    t = kd_loss_terms(logits, labels, topk_ids, topk_logprobs, alpha, temperature, mask)
    den = t["tokens"] if num_items is None else torch.as_tensor(num_items, dtype=torch.float32)
    return t["numerator"] / den.clamp(min=1.0)
