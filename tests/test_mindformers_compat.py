"""MindFormers 1.9 shims: each one changes what its docstring claims, on the real legacy Llama.

The packed-row test is the contract of the packed-mask shim: a packed row's loss equals the
token-weighted loss of its documents run one by one (with the shim; RoPE positions do not restart
and need not), and differs without it. The graph-mode tests compile every construct we replace.
"""

from __future__ import annotations

import numpy as np
import pytest

S = 32
VOCAB = 512


@pytest.fixture(scope="module")
def ms_cpu():
    import mindspore as ms

    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
    from distilled.train import mindformers_compat

    applied = mindformers_compat.apply_cpu_shims()
    yield ms
    mindformers_compat.apply_packed_mask_shim(False)
    assert applied


@pytest.fixture(scope="module")
def tiny_llama(ms_cpu):
    return _fresh_llama(ms_cpu)


def _labels(doc: np.ndarray) -> np.ndarray:
    return np.concatenate([doc[1:], [-100]])


def _docs():
    rng = np.random.RandomState(0)
    return [rng.randint(1, VOCAB, 10), rng.randint(1, VOCAB, 13), rng.randint(1, VOCAB, 5)]


def _packed_row(docs):
    from mindformers.dataset.dataloader.hf_dataloader import _get_packed_data

    n = sum(len(d) for d in docs)
    ids = np.concatenate(docs + [np.zeros(S - n, np.int64)])
    labels = np.concatenate([_labels(d) for d in docs] + [np.full(S - n, -100)])
    ends = list(np.cumsum([len(d) for d in docs]))
    return _get_packed_data(ids, labels, ends)  # MindFormers' own packed columns


def _packed_loss(model, cols):
    import mindspore as ms

    t = [ms.Tensor(c[None]) for c in cols]
    return float(model(t[0], labels=t[1], loss_mask=t[2], position_ids=t[3], attention_mask=t[4]))


def _one_by_one_loss(model, docs):
    """Token-weighted mean of each document's loss, each run alone (pad after it, positions 0..L-1)."""
    import mindspore as ms

    total = count = 0.0
    for d in docs:
        pad = S - len(d)
        ids = np.concatenate([d, np.zeros(pad, np.int64)]).astype(np.int32)
        lab = np.concatenate([_labels(d), np.full(pad, -100)]).astype(np.int32)
        mask = (lab != -100).astype(np.int32)
        loss = float(model(ms.Tensor(ids[None]), labels=ms.Tensor(lab[None]), loss_mask=ms.Tensor(mask[None])))
        total += loss * mask.sum()
        count += mask.sum()
    return total / count


def test_apply_cpu_shims_is_idempotent_and_named(ms_cpu):
    from distilled.train import mindformers_compat as mc

    first = mc.apply_cpu_shims()
    assert first == mc.apply_cpu_shims() == ["disable_fused_rmsnorm", "finite_overflow_check",
                                                      "barrier_via_allreduce", "full_checkpoint_per_rank"]
    import mindformers.models.llama.llama_layer as ll
    import mindformers.utils.load_checkpoint_utils as lcu
    import mindformers.version_control as vc
    from mindspore.communication import comm_func

    assert ll.check_rmsnorm_big_kernel_valid() is False
    assert comm_func.barrier is vc.barrier is lcu.barrier is mc._allreduce_barrier  # real 2-rank run: test_finetune_cpu
    for fn in mc.CPU_SHIMS.values():
        assert fn.__doc__ and "Why" in fn.__doc__


def test_overflow_check_is_a_real_finite_test(ms_cpu):
    """The replacement reports overflow exactly when a gradient holds inf or NaN."""
    ms = ms_cpu
    from mindspore import nn

    net, cell = _loss_scale_cell(ms, nn)
    ok = (ms.Tensor(np.ones((1, 3), np.float32)), ms.Tensor(np.zeros(1, np.float32)))
    assert not bool(cell.get_overflow_status(None, ok))
    for bad in (np.inf, -np.inf, np.nan):
        grads = (ok[0], ms.Tensor(np.array([1.0, bad], np.float32)))
        assert bool(cell.get_overflow_status(None, grads))
    _check_step_skips_only_non_finite(ms, net, cell)


def _loss_scale_cell(ms, nn):
    net = nn.Dense(3, 1)
    return net, nn.TrainOneStepWithLossScaleCell(nn.WithLossCell(net, nn.MSELoss()),
                                                 nn.SGD(net.trainable_params(), 0.1),
                                                 scale_sense=ms.Tensor(1.0, ms.float32))


def _check_step_skips_only_non_finite(ms, net, cell):
    """The full train step skips the update on a non-finite loss/grad and applies it otherwise."""
    x = ms.Tensor(np.ones((2, 3), np.float32))
    w0 = net.weight.asnumpy().copy()
    _, overflow, _ = cell(x, ms.Tensor(np.full((2, 1), np.inf, np.float32)))
    assert bool(overflow) and np.array_equal(net.weight.asnumpy(), w0)
    _, overflow, _ = cell(x, ms.Tensor(np.zeros((2, 1), np.float32)))
    assert not bool(overflow) and not np.array_equal(net.weight.asnumpy(), w0)


def test_packed_row_equals_documents_one_by_one_only_with_shim(tiny_llama):
    from distilled.train import mindformers_compat as mc

    docs = _docs()
    cols = _packed_row(docs)
    assert cols[3].tolist()[:12] == list(range(10)) + [0, 1]  # restarting positions from MF (unused)
    mc.apply_packed_mask_shim(False)
    reference = _one_by_one_loss(tiny_llama, docs)
    unshimmed = _packed_loss(tiny_llama, cols)
    assert abs(unshimmed - reference) > 1e-3, "MF 1.9 should get packed rows wrong without the shim"
    assert mc.apply_packed_mask_shim(True) and mc.packed_mask_shim_enabled()
    shimmed = _packed_loss(tiny_llama, cols)
    assert abs(shimmed - reference) < 1e-5
    # the unpacked path is untouched by the shim
    assert abs(_one_by_one_loss(tiny_llama, docs) - reference) < 1e-6
    mc.apply_packed_mask_shim(False)
    assert not mc.packed_mask_shim_enabled()


def test_without_shim_packed_mask_leaks_future_tokens(tiny_llama):
    """Which MF bug the shim fixes besides RoPE: the non-flash path adds the 0/1 mask, so the
    loss of document 1 depends on document 2's tokens (it must not)."""
    from distilled.train import mindformers_compat as mc

    docs = _docs()
    changed = [docs[0], (docs[1] + 7) % (VOCAB - 1) + 1, docs[2]]

    def first_doc_only(cols):
        cols = [c.copy() for c in cols]
        cols[2][len(docs[0]):] = 0  # loss only on document 1
        return cols

    try:
        mc.apply_packed_mask_shim(False)
        a = _packed_loss(tiny_llama, first_doc_only(_packed_row(docs)))
        b = _packed_loss(tiny_llama, first_doc_only(_packed_row(changed)))
        assert abs(a - b) > 1e-4  # leak: later tokens change an earlier document's loss
        mc.apply_packed_mask_shim(True)
        a = _packed_loss(tiny_llama, first_doc_only(_packed_row(docs)))
        b = _packed_loss(tiny_llama, first_doc_only(_packed_row(changed)))
        assert abs(a - b) < 1e-6
    finally:
        mc.apply_packed_mask_shim(False)


def test_packed_shim_rejects_unsliced_inputs(tiny_llama):
    """input_sliced_sig False would cut a token off input_ids but not off position_ids."""
    import mindspore as ms

    from distilled.train import mindformers_compat as mc

    cols = _packed_row(_docs())
    t = [ms.Tensor(c[None]) for c in cols]
    tiny_llama.input_sliced_sig = False
    try:
        mc.apply_packed_mask_shim(True)
        with pytest.raises((ValueError, RuntimeError), match="input_sliced_sig"):
            tiny_llama(t[0], labels=None, loss_mask=t[2], position_ids=t[3], attention_mask=t[4])
    finally:
        tiny_llama.input_sliced_sig = True
        mc.apply_packed_mask_shim(False)


def test_shim_leaves_flash_attention_path_to_mindformers():
    """On flash attention (and the compressed EOD mask) the replacement calls MindFormers' own
    construct: run_mindformer.py does not even install it there (see test_finetune_cpu)."""
    import inspect

    from distilled.train import mindformers_compat as mc

    src = inspect.getsource(mc._packed_llama_model_construct)
    assert "self.use_flash_attention" in src and "self.use_eod_attn_mask_compression" in src
    assert "import " not in src.split('"""')[2]  # graph mode rejects imports in compiled code


def _graph_mode():
    import mindspore as ms

    class GraphMode:
        def __enter__(self):
            ms.set_context(mode=ms.GRAPH_MODE)

        def __exit__(self, *exc):
            ms.set_context(mode=ms.PYNATIVE_MODE)

    return GraphMode()


def _fresh_llama(ms):
    from mindformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(batch_size=1, seq_length=S, hidden_size=64, num_layers=2, num_heads=4, n_kv_heads=2,
                      vocab_size=VOCAB, intermediate_size=128, qkv_has_bias=True, use_flash_attention=False,
                      compute_dtype="float32", layernorm_compute_type="float32", softmax_compute_type="float32",
                      rotary_dtype="float32", param_init_type="float32", use_past=False, pad_token_id=0,
                      use_rope_slice=True, input_sliced_sig=True, theta=10000.0)
    ms.set_seed(0)
    model = LlamaForCausalLM(cfg)
    model.set_train(True)
    return model


def test_graph_mode_compiles_shimmed_forward_and_grad(ms_cpu):
    """GRAPH_MODE (what every YAML runs): the packed-mask construct compiles, gives the
    one-by-one loss, and value_and_grad through it compiles and gives finite, non-zero grads."""
    ms = ms_cpu
    from distilled.train import mindformers_compat as mc

    docs = _docs()
    cols = _packed_row(docs)
    t = [ms.Tensor(c[None]) for c in cols]
    try:
        mc.apply_packed_mask_shim(True)
        with _graph_mode():
            model = _fresh_llama(ms)  # fresh: graph caches are per cell, built after the shim
            packed = _packed_loss(model, cols)
            reference = _one_by_one_loss(model, docs)
            assert abs(packed - reference) < 1e-5, (packed, reference)

            params = model.trainable_params()

            def loss_fn(ids, labels, loss_mask, position_ids, attention_mask):
                return model(ids, labels=labels, loss_mask=loss_mask, position_ids=position_ids,
                             attention_mask=attention_mask)

            grad_fn = ms.value_and_grad(loss_fn, None, params)
            loss, grads = ms.jit(grad_fn)(*t)
            assert abs(float(loss) - packed) < 1e-5
            norms = [float(np.linalg.norm(g.asnumpy())) for g in grads]
            assert all(np.isfinite(norms)) and sum(norms) > 0
    finally:
        mc.apply_packed_mask_shim(False)


def test_graph_mode_compiles_finite_overflow_check_in_train_step(ms_cpu):
    """The CPU overflow check runs inside a compiled TrainOneStepWithLossScaleCell: a step with an
    inf gradient is skipped, a finite one is applied."""
    ms = ms_cpu
    from mindspore import nn

    with _graph_mode():
        net, cell = _loss_scale_cell(ms, nn)
        _check_step_skips_only_non_finite(ms, net, cell)
