"""The KD loss: definition checks in torch (against a brute-force bucketed KL), per-token global
normalisation, and the MindSpore version compiled in GRAPH_MODE matching torch (loss and grads)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distilled.kd.loss_torch import kd_loss, kd_loss_terms

V, K = 50, 6


def _data(n: int = 24, seed: int = 0, teacher_T1=None):
    g = np.random.default_rng(seed)
    logits = g.normal(0, 2, size=(n, V)).astype(np.float32)
    tlog = g.normal(0, 3, size=(n, V))
    tlogp = tlog - np.log(np.exp(tlog).sum(-1, keepdims=True))
    ids = np.argsort(-tlogp, axis=-1)[:, :K].astype(np.int32)
    lps = np.take_along_axis(tlogp, ids, -1).astype(np.float32)
    labels = ids[:, 0].astype(np.int64).copy()
    labels[[0, 5]] = -100  # untrained positions
    ids[3] = -1  # a trained position without teacher data
    lps[3] = 0
    ids[7, 4:] = -1  # fewer than K entries returned
    lps[7, 4:] = 0
    return logits, labels, ids, lps, tlogp


def _brute(logits, labels, ids, lps, alpha, T):
    """Per-position loops with plain numpy, straight from the definition."""
    tot = 0.0
    n = 0
    for i in range(len(labels)):
        if labels[i] == -100:
            continue
        n += 1
        z = logits[i].astype(np.float64)
        logp = z - np.log(np.exp(z).sum())
        ce = -logp[labels[i]]
        kl = 0.0
        sel = [j for j in ids[i] if j >= 0]
        if sel:
            zt = z / T
            s = np.exp(zt - np.log(np.exp(zt).sum()))
            sb = np.array([s[j] for j in sel] + [1 - sum(s[j] for j in sel)])
            tp = np.exp(lps[i][: len(sel)].astype(np.float64))
            tb = np.append(tp, 1 - tp.sum())
            tb = tb ** (1 / T)
            tb = tb / tb.sum()
            kl = float((tb * (np.log(tb) - np.log(sb))).sum())
        tot += alpha * ce + (1 - alpha) * kl
    return tot, n


@pytest.mark.parametrize("alpha,T", [(0.5, 1.0), (0.0, 1.0), (0.3, 2.0), (1.0, 0.7)])
def test_torch_loss_matches_definition(alpha, T):
    logits, labels, ids, lps, _ = _data()
    want, n = _brute(logits, labels, ids, lps, alpha, T)
    got = kd_loss(torch.tensor(logits), torch.tensor(labels), torch.tensor(ids), torch.tensor(lps), alpha, T)
    assert abs(float(got) - want / n) < 1e-5


def test_alpha_one_is_cross_entropy_and_kl_vanishes_at_the_teacher():
    logits, labels, ids, lps, tlogp = _data()
    ce = F.cross_entropy(torch.tensor(logits), torch.tensor(labels), ignore_index=-100)
    got = kd_loss(torch.tensor(logits), torch.tensor(labels), torch.tensor(ids), torch.tensor(lps), alpha=1.0)
    assert abs(float(got) - float(ce)) < 1e-6
    # the student that *is* the teacher: KL over the buckets is 0 (to fp32 rounding)
    t = kd_loss_terms(torch.tensor(tlogp, dtype=torch.float32), torch.tensor(labels), torch.tensor(ids),
                      torch.tensor(lps), alpha=0.0)
    assert float(t["kl_sum"]) < 1e-4 and float(t["kd_tokens"]) == 21  # 24 - 2 untrained - 1 without data


def test_global_per_token_normalisation():
    """Two micro-batches normalised by the global token count == one batch: gradients too."""
    logits, labels, ids, lps, _ = _data(seed=1)
    labels[12:20] = -100  # the second half has far fewer trained tokens
    x = torch.tensor(logits, requires_grad=True)
    full = kd_loss(x, torch.tensor(labels), torch.tensor(ids), torch.tensor(lps), 0.4, 1.5)
    (g_full,) = torch.autograd.grad(full, x)
    n = int((labels != -100).sum())
    x2 = torch.tensor(logits, requires_grad=True)
    parts = [kd_loss(x2[a:b], torch.tensor(labels[a:b]), torch.tensor(ids[a:b]), torch.tensor(lps[a:b]), 0.4, 1.5,
                     num_items=n) for a, b in ((0, 12), (12, 24))]
    total = parts[0] + parts[1]
    (g_parts,) = torch.autograd.grad(total, x2)
    assert abs(float(total.detach()) - float(full.detach())) < 1e-6
    torch.testing.assert_close(g_parts, g_full, rtol=0, atol=1e-7)
    # the per-micro-batch mean (the accumulation bug) differs
    wrong = sum(kd_loss(torch.tensor(logits[a:b]), torch.tensor(labels[a:b]), torch.tensor(ids[a:b]),
                        torch.tensor(lps[a:b]), 0.4, 1.5) for a, b in ((0, 12), (12, 24))) / 2
    assert abs(float(wrong) - float(full)) > 1e-3


def test_float16_teacher_logprobs_and_bf16_logits_are_finite():
    logits, labels, ids, lps, _ = _data(seed=2)
    x = torch.tensor(logits, dtype=torch.bfloat16, requires_grad=True)
    loss = kd_loss(x, torch.tensor(labels), torch.tensor(ids), torch.tensor(lps, dtype=torch.float16), 0.5, 1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad.float()).all()


@pytest.mark.slow
@pytest.mark.parametrize("alpha,T", [(0.5, 1.0), (0.2, 2.0)])
def test_mindspore_graph_mode_matches_torch(alpha, T):
    import mindspore as ms
    from mindspore import ops

    from distilled.kd.loss_ms import KDLoss

    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    logits, labels, ids, lps, _ = _data(seed=3)
    mask = np.ones(len(labels), np.float32)
    mask[9] = 0.0  # MindFormers' loss_mask also removes a position
    cell = KDLoss(alpha, T, per_token_outputs=True)

    def f(x, y, m, i, lp):
        num, den = cell(x, y, m, i, lp)
        return num / den

    grad_fn = ms.jit(ms.value_and_grad(f, grad_position=0))
    ms_loss, ms_grad = grad_fn(ms.Tensor(logits), ms.Tensor(labels.astype(np.int32)), ms.Tensor(mask),
                               ms.Tensor(ids), ms.Tensor(lps.astype(np.float16)))
    x = torch.tensor(logits, requires_grad=True)
    t_loss = kd_loss(x, torch.tensor(labels), torch.tensor(ids), torch.tensor(lps, dtype=torch.float16), alpha, T,
                     mask=torch.tensor(mask))
    (t_grad,) = torch.autograd.grad(t_loss, x)
    assert abs(float(ms_loss.asnumpy()) - float(t_loss)) < 1e-5
    np.testing.assert_allclose(ms_grad.asnumpy(), t_grad.numpy(), rtol=1e-4, atol=1e-6)
    assert ms.get_context("mode") == ms.GRAPH_MODE
