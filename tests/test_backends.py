"""The backend interface: packed batches built exactly like MindFormers, its LR schedule, and the
torch backend's packed attention (block mask from restarting positions)."""

from __future__ import annotations

import numpy as np
import pytest

from backend_helpers import make_small_qwen2, packed_rows, rows_with_trained_tokens
from distilled.train.backends import get_backend
from distilled.train.backends.base import (PackedDataError, TrainSettings, linear_warmup_lr, packed_batch,
                                     split_documents, warmup_steps_from)


@pytest.fixture(scope="module")
def small_weights(tmp_path_factory):
    return make_small_qwen2(tmp_path_factory.mktemp("w") / "small")


def test_packed_batch_matches_mindformers_get_packed_data():
    from mindformers.dataset.dataloader.hf_dataloader import _get_packed_data

    rows = packed_rows(4, 40, seed=3)
    rows[0]["actual_seq_len"] = [7, 40]  # a full row: no padding tail
    rows[0]["position_ids"] = None
    b = packed_batch(rows)
    for i, r in enumerate(rows):
        tokens, labels, loss_mask, pos, mask = _get_packed_data(r["input_ids"], r["labels"], r["actual_seq_len"])
        assert np.array_equal(b.input_ids[i], tokens)
        assert np.array_equal(b.labels[i], labels)
        assert np.array_equal(b.loss_mask[i], loss_mask)
        assert np.array_equal(b.position_ids[i], pos)
        assert np.array_equal(b.mindformers_attention_mask()[i], mask.astype(np.uint8))


def test_packed_batch_names_row_and_field():
    rows = packed_rows(2, 32, seed=1)
    bad = dict(rows[1], actual_seq_len=[10, 5])
    with pytest.raises(PackedDataError, match=r"row 1: field 'actual_seq_len'"):
        packed_batch([rows[0], bad], where="data.arrow")
    bad = dict(rows[1], position_ids=list(range(32)))
    with pytest.raises(PackedDataError, match=r"row 1: field 'position_ids' does not restart"):
        packed_batch([rows[0], bad])
    with pytest.raises(PackedDataError, match=r"missing field 'labels'"):
        packed_batch([{"input_ids": [1, 2], "actual_seq_len": [2]}])


def test_split_documents_keeps_every_trained_token():
    b = packed_batch(packed_rows(1, 48, seed=2))
    docs = split_documents(b)
    assert len(docs) >= 2
    assert sum(d.num_loss_tokens for d in docs) == b.num_loss_tokens
    for d in docs:
        assert d.position_ids[0, 0] == 0 and d.doc_ids[0, 0] == 0


@pytest.mark.parametrize("lr,warm,total,init", [(5e-3, 3, 10, 0.0), (1e-4, 0, 7, 0.0), (2e-3, 4, 4, 1e-4),
                                                (1e-3, 2, 12, 5e-4)])
def test_linear_warmup_lr_is_mindformers_formula(lr, warm, total, init):
    import mindspore as ms
    from mindformers.core.lr import LinearWithWarmUpLR

    sched = LinearWithWarmUpLR(learning_rate=lr, total_steps=total, warmup_steps=warm, warmup_lr_init=init)
    for step in range(total + 2):
        want = float(sched(ms.Tensor(step, ms.int32)).asnumpy())
        assert linear_warmup_lr(step, lr, warm, total, init) == pytest.approx(want, rel=1e-6, abs=1e-12)
    assert warmup_steps_from(0.1, None, 25) == 2  # int(total * ratio), as _get_lr_steps


def test_get_backend_rejects_unknown_name():
    with pytest.raises(ValueError, match="unknown backend 'jax'"):
        get_backend("jax")


def test_torch_packed_row_equals_documents_and_leaks_are_visible(small_weights):
    b = packed_batch(packed_rows(1, 48, seed=5))
    docs = split_documents(b)

    def gap(be, batch):
        packed = be.forward(batch).loss
        per_doc = sum(x.loss_sum for x in (be.forward(d) for d in docs)) / b.num_loss_tokens
        return abs(packed - per_doc) / per_doc

    good = get_backend("torch", device="cpu")
    good.load_hf(small_weights)
    assert gap(good, b) < 1e-6
    # same weights, no block mask: the documents see each other
    leaky = get_backend("torch", device="cpu", block_mask=False)
    leaky.load_hf(small_weights)
    assert gap(leaky, b) > 1e-3
    # non-restarting positions: boundaries come from position_ids, so the row becomes one document
    b_pos = packed_batch(packed_rows(1, 48, seed=5), restart_positions=False)
    assert gap(good, b_pos) > 1e-3


def test_torch_train_step_is_mindformers_adamw(small_weights):
    """One step by hand with MindFormers' AdamW/clip formulas equals the backend's step."""
    import torch

    b = packed_batch(packed_rows(2, 32, seed=7))
    st = TrainSettings(learning_rate=1e-2, warmup_steps=0, total_steps=4, betas=(0.9, 0.95), eps=1e-8,
                       weight_decay=0.1, max_grad_norm=0.5)
    be = get_backend("torch", device="cpu")
    be.load_hf(small_weights)
    before = be.named_parameters()
    # reference gradients
    be.module.zero_grad()
    loss, *_ = be._loss(b)
    loss.backward()
    grads = {n: p.grad.detach().numpy().astype(np.float64).copy() for n, p in be.module.named_parameters()}
    be.module.zero_grad()
    be.setup_training(st)
    r = be.train_step(b)
    norm = np.sqrt(sum((g ** 2).sum() for g in grads.values()))
    assert r.grad_norm == pytest.approx(norm, rel=1e-5)
    coef = 0.5 / (max(norm, 0.5) + 1e-6)
    lr = linear_warmup_lr(0, 1e-2, 0, 4)
    after = be.named_parameters()
    for n, p0 in before.items():
        g = grads[n] * coef
        wd = 0.1 if (p0.ndim > 1 and not n.endswith(".bias")) else 0.0
        m = 0.1 * g
        v = 0.05 * g * g
        want = p0 * (1 - lr * wd) - (lr / 0.1) * m / (np.sqrt(v / 0.05) + 1e-8)
        np.testing.assert_allclose(after[n], want, rtol=1e-4, atol=1e-6, err_msg=n)
    assert torch.isfinite(torch.tensor(r.loss))


def test_torch_save_hf_roundtrip(small_weights, tmp_path):
    be = get_backend("torch", device="cpu")
    be.load_hf(small_weights)
    out = be.save_hf(tmp_path / "saved")
    again = get_backend("torch", device="cpu")
    again.load_hf(out)
    a, c = be.named_parameters(), again.named_parameters()
    assert a.keys() == c.keys()
    assert all(np.array_equal(a[k], c[k]) for k in a)


def test_model_config_mismatch_is_refused(small_weights):
    be = get_backend("torch", device="cpu")
    with pytest.raises(ValueError, match=r"model_config.hidden_size=128 but config.json hidden_size=64"):
        be.load_hf(small_weights, model_config={"hidden_size": 128})


def test_torch_flattened_batch_equals_batched(small_weights):
    """The flash-attn layout (B rows as one row, boundaries from positions) computes the same loss."""
    b = packed_batch(packed_rows(3, 40, seed=11))
    plain = get_backend("torch", device="cpu")
    plain.load_hf(small_weights)
    flat = get_backend("torch", device="cpu", flatten_batch=True)
    flat.load_hf(small_weights)
    r1, r2 = plain.forward(b, return_logits=True), flat.forward(b, return_logits=True)
    assert r1.num_tokens == r2.num_tokens
    assert abs(r1.loss - r2.loss) / r1.loss < 1e-6
    np.testing.assert_allclose(r1.logits, r2.logits, atol=1e-5)


def _drift_ok(a: dict, b: dict, bound: float = 1e-5) -> list[str]:
    """Tensors whose ||a-b||/||b|| exceeds ``bound``; k_proj.bias is left out because its gradient
    is mathematically zero (softmax ignores a per-query constant), so Adam's first step turns
    rounding noise into +-lr steps there."""
    assert a.keys() == b.keys()
    bad = []
    for k in a:
        if k.endswith("k_proj.bias"):
            continue
        rel = np.linalg.norm(a[k].astype(np.float64) - b[k]) / max(np.linalg.norm(b[k].astype(np.float64)), 1e-30)
        if rel > bound:
            bad.append(f"{k}: {rel:.3g}")
    return bad


def _one_step(backend: str, weights, micro: list, batch_size: int, seq: int):
    kw = {"device": "cpu"} if backend == "torch" else {}
    be = get_backend(backend, **kw)
    be.load_hf(weights, seq_length=seq, batch_size=batch_size)
    be.setup_training(TrainSettings(learning_rate=1e-2, total_steps=4, lr_schedule="constant", max_grad_norm=1.0))
    res = be.train_step(micro if len(micro) > 1 else micro[0])
    return res, be.named_parameters(), be


@pytest.mark.parametrize("backend", ["torch", pytest.param("mindspore", marks=pytest.mark.slow)])
def test_grad_accum_is_per_token_batch1_ga2_equals_batch2(small_weights, backend):
    """batch 1 x GA 2 == batch 2 x GA 1 after one AdamW step, fp32, on rows with 10 and 400
    trained tokens: the step's loss is sum(token CE) / 410, not the mean of the two row means."""
    rows = rows_with_trained_tokens([10, 400], 420, seed=5)
    ga, p_ga, _ = _one_step(backend, small_weights, [packed_batch(rows[:1]), packed_batch(rows[1:])], 1, 420)
    big, p_big, _ = _one_step(backend, small_weights, [packed_batch(rows)], 2, 420)
    assert ga.tokens == big.tokens == 410
    assert ga.loss == pytest.approx(big.loss, rel=1e-6)
    assert abs(ga.grad_norm - big.grad_norm) <= 1e-5 * big.grad_norm
    assert not _drift_ok(p_ga, p_big), _drift_ok(p_ga, p_big)
    if backend == "torch":
        # the two rows' own means differ a lot, so per-micro-batch averaging would be visible
        fresh = get_backend("torch", device="cpu")
        fresh.load_hf(small_weights, seq_length=420)
        l10, l400 = (fresh.forward(packed_batch(rows[i:i + 1])) for i in range(2))
        assert l10.num_tokens == 10 and l400.num_tokens == 400
        per_token = (l10.loss_sum + l400.loss_sum) / 410
        assert ga.loss == pytest.approx(per_token, rel=1e-6)
        assert abs(ga.loss - (l10.loss + l400.loss) / 2) > 1e-3


@pytest.mark.slow
def test_tied_student_trains_on_both_backends(tmp_path):
    """tie_word_embeddings: True (Qwen2.5-0.5B/1.5B/3B students): MindFormers shares one Parameter
    between tok_embeddings and lm_head; both backends load it, agree, train, and save a tied HF model."""
    from transformers import Qwen2ForCausalLM

    w = make_small_qwen2(tmp_path / "tied", tied=True, seed=3)
    rows = packed_rows(4, 48, seed=4)
    out = {}
    for name in ("torch", "mindspore"):
        be = get_backend(name, **({"device": "cpu"} if name == "torch" else {}))
        be.load_hf(w, model_config={"tie_word_embeddings": True, "vocab_size": 512}, seq_length=48, batch_size=2)
        f = be.forward(packed_batch(rows[:2]))
        be.setup_training(TrainSettings(learning_rate=5e-3, total_steps=2, max_grad_norm=1.0))
        steps = [be.train_step(packed_batch(rows[2 * i:2 * i + 2])) for i in range(2)]
        params = be.named_parameters()
        assert "lm_head.weight" not in params and "model.embed_tokens.weight" in params
        saved = be.save_hf(tmp_path / f"out-{name}")
        m = Qwen2ForCausalLM.from_pretrained(saved)
        assert m.config.tie_word_embeddings
        assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
        np.testing.assert_array_equal(m.model.embed_tokens.weight.detach().numpy(), params["model.embed_tokens.weight"])
        out[name] = (f, steps, params)
    (ft, st, pt), (fm, sm, pm) = out["torch"], out["mindspore"]
    assert fm.loss == pytest.approx(ft.loss, rel=1e-5)
    for a, b in zip(st, sm):
        assert b.loss == pytest.approx(a.loss, rel=1e-5) and b.grad_norm == pytest.approx(a.grad_norm, rel=1e-4)
    assert not _drift_ok(pm, pt, 1e-4), _drift_ok(pm, pt, 1e-4)
    # the embedding moved (it gets the lm_head gradient too)
    base = get_backend("torch", device="cpu")
    base.load_hf(w)
    assert not np.allclose(base.named_parameters()["model.embed_tokens.weight"], pt["model.embed_tokens.weight"])
