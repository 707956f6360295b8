"""``distill parity --check kd``: the KD loss and its gradient, torch vs MindSpore (graph mode).

Why a check of its own: the ``train`` check compares whole training steps of the two backends'
*CE* models; the KD loss is a second piece of maths with two implementations
(:mod:`distilled.kd.loss_torch`, :mod:`distilled.kd.loss_ms`). This check feeds both the same
packed rows and top-K columns and compares

* on the **same logits** (the torch model's): loss and gradient w.r.t. the logits, which isolates
  the loss implementations (fp32 tolerance: relative 1e-5 for the loss, 1e-5 of the largest
  gradient entry for the gradient);
* on **each backend's own logits** (same weights): the loss, which adds the model's own
  difference (held to the ``train`` check's step-0 loss tolerance).
"""

from __future__ import annotations

from typing import Any

import numpy as np

LOSS_REL = 1e-5
GRAD_REL = 1e-5


def _torch_loss_and_grad(logits: np.ndarray, labels: np.ndarray, ids: np.ndarray, lps: np.ndarray, alpha: float,
                         temperature: float) -> tuple[float, np.ndarray]:
    import torch

    from distilled.kd.loss_torch import kd_loss_terms

    x = torch.tensor(logits, dtype=torch.float32, requires_grad=True)
    t = kd_loss_terms(x, torch.tensor(labels).long(), torch.tensor(ids), torch.tensor(lps.astype(np.float32)),
                      alpha, temperature)
    loss = t["numerator"] / (t["tokens"] + 1e-8)
    (g,) = torch.autograd.grad(loss, x)
    return float(loss.detach()), g.numpy()


def _ms_loss_and_grad(logits: np.ndarray, labels: np.ndarray, ids: np.ndarray, lps: np.ndarray, alpha: float,
                      temperature: float) -> tuple[float, np.ndarray]:
    import mindspore as ms

    from distilled.kd.loss_ms import KDLoss

    ms.set_context(mode=ms.GRAPH_MODE)
    cell = KDLoss(alpha, temperature)
    v = logits.shape[-1]
    mask = (labels.reshape(-1) != -100).astype(np.float32)
    def loss_fn(x, y, m, i, lp):  # a named function: MindSpore cannot parse a lambda written inline
        return cell(x, y, m, i, lp)

    fn = ms.jit(ms.value_and_grad(loss_fn, grad_position=0))
    loss, g = fn(ms.Tensor(logits.reshape(-1, v).astype(np.float32)), ms.Tensor(labels.reshape(-1).astype(np.int32)),
                 ms.Tensor(mask), ms.Tensor(ids.reshape(-1, ids.shape[-1]).astype(np.int32)),
                 ms.Tensor(lps.reshape(-1, lps.shape[-1]).astype(np.float16)))
    return float(loss.asnumpy()), g.asnumpy().reshape(logits.shape)


def kd_parity(logits_torch: np.ndarray, logits_ms: np.ndarray, labels: np.ndarray, topk_ids: np.ndarray,
              topk_logprobs: np.ndarray, alpha: float, temperature: float, model_loss_rel: float) -> dict[str, Any]:
    """Compare the two KD losses (see module doc); returns the report section with ``ok`` and
    ``failures``. Shapes: logits ``[B, S, V]``, labels ``[B, S]``, top-K ``[B, S, K]``."""
    lt, gt = _torch_loss_and_grad(logits_torch, labels, topk_ids, topk_logprobs, alpha, temperature)
    lm, gm = _ms_loss_and_grad(logits_torch, labels, topk_ids, topk_logprobs, alpha, temperature)
    lm_own, _ = _ms_loss_and_grad(logits_ms, labels, topk_ids, topk_logprobs, alpha, temperature)
    scale = float(max(np.max(np.abs(gt)), 1e-30))
    res = {"alpha": alpha, "temperature": temperature, "k": int(topk_ids.shape[-1]),
           "kd_positions": int((topk_ids[..., 0] >= 0).sum()), "trained_positions": int((labels != -100).sum()),
           "loss_torch": lt, "loss_mindspore_same_logits": lm, "loss_mindspore_own_logits": lm_own,
           "loss_rel_diff_same_logits": abs(lm - lt) / max(abs(lt), 1e-12),
           "grad_max_abs_diff_same_logits": float(np.max(np.abs(gm - gt))), "grad_scale": scale,
           "loss_rel_diff_own_logits": abs(lm_own - lt) / max(abs(lt), 1e-12),
           "tolerances": {"loss_rel": LOSS_REL, "grad_rel": GRAD_REL, "own_logits_loss_rel": model_loss_rel}}
    fails = []
    if not res["loss_rel_diff_same_logits"] <= LOSS_REL:
        fails.append(f"kd: loss on the same logits differs by {res['loss_rel_diff_same_logits']:.3g} (> {LOSS_REL:g})")
    if not res["grad_max_abs_diff_same_logits"] <= GRAD_REL * scale:
        fails.append(f"kd: gradient w.r.t. the logits differs by {res['grad_max_abs_diff_same_logits']:.3g} "
                     f"(> {GRAD_REL:g} x {scale:.3g})")
    if not res["loss_rel_diff_own_logits"] <= model_loss_rel:
        fails.append(f"kd: loss on each backend's own logits differs by {res['loss_rel_diff_own_logits']:.3g} "
                     f"(> {model_loss_rel:g})")
    if res["kd_positions"] == 0:
        fails.append("kd: the batch has no position with teacher top-K (is this KD data?)")
    res["failures"] = fails
    res["ok"] = not fails
    return res
