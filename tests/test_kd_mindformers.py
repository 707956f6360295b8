"""The MindFormers KD model (KDLlamaForCausalLM) and data loader, on a tiny legacy Llama in GRAPH_MODE:
alpha=1 is MindFormers' own CE loss, the KD loss equals the torch function on the same logits,
value_and_grad compiles, per-token mode returns (numerator, denominator), and the loader feeds
the top-K columns of a packed save_to_disk dataset."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow

S, VOCAB, K = 32, 512, 4


@pytest.fixture(scope="module")
def ms_graph():
    import mindspore as ms

    from distilled.train import mindformers_compat

    mindformers_compat.apply_cpu_shims()
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    yield ms
    ms.set_context(mode=ms.PYNATIVE_MODE)


def _cfg(**kw):
    from mindformers import LlamaConfig

    return LlamaConfig(batch_size=1, seq_length=S, hidden_size=64, num_layers=2, num_heads=4, n_kv_heads=2,
                       vocab_size=VOCAB, intermediate_size=128, qkv_has_bias=True, use_flash_attention=False,
                       compute_dtype="float32", layernorm_compute_type="float32", softmax_compute_type="float32",
                       rotary_dtype="float32", param_init_type="float32", use_past=False, pad_token_id=0,
                       use_rope_slice=True, input_sliced_sig=True, theta=10000.0, **kw)


def _model(ms, cls, **kw):
    ms.set_seed(0)
    m = cls(_cfg(**kw))
    m.set_train(True)
    return m


def _batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(1, VOCAB, size=(1, S)).astype(np.int32)
    labels = np.concatenate([ids[:, 1:], np.full((1, 1), -100)], 1).astype(np.int32)
    labels[0, :6] = -100  # a prompt
    loss_mask = (labels != -100).astype(np.int32)
    t_ids = np.full((1, S, K), -1, np.int32)
    t_lp = np.zeros((1, S, K), np.float16)
    for p in range(S):
        if labels[0, p] != -100 and p % 5 != 0:  # some trained positions without teacher data
            alt = rng.choice(VOCAB, size=K - 1, replace=False)
            t_ids[0, p] = np.concatenate([[labels[0, p]], alt[alt != labels[0, p]][:K - 1]])[:K]
            pr = np.sort(rng.dirichlet(np.ones(K + 1)))[::-1]
            t_lp[0, p] = np.log(pr[:K]).astype(np.float16)
    return ids, labels, loss_mask, t_ids.reshape(1, S * K), t_lp.reshape(1, S * K)


def test_alpha_one_equals_mindformers_cross_entropy(ms_graph):
    ms = ms_graph
    from mindformers import LlamaForCausalLM

    from distilled.kd.mindformers_kd import KDLlamaForCausalLM

    ids, labels, mask, t_ids, t_lp = _batch()
    base = _model(ms, LlamaForCausalLM)
    kd = _model(ms, KDLlamaForCausalLM, kd_alpha=1.0, kd_top_k=K)
    want = float(base(ms.Tensor(ids), labels=ms.Tensor(labels), loss_mask=ms.Tensor(mask)))
    got = float(kd(ms.Tensor(ids), labels=ms.Tensor(labels), loss_mask=ms.Tensor(mask), topk_ids=ms.Tensor(t_ids),
                   topk_logprobs=ms.Tensor(t_lp)))
    assert abs(got - want) < 1e-5, (got, want)


def test_kd_loss_matches_torch_on_the_same_logits_and_grads_compile(ms_graph):
    ms = ms_graph
    import torch

    from distilled.kd.loss_torch import kd_loss
    from distilled.kd.mindformers_kd import KDLlamaForCausalLM

    ids, labels, mask, t_ids, t_lp = _batch()
    from mindformers import LlamaForCausalLM

    kd = _model(ms, KDLlamaForCausalLM, kd_alpha=0.3, kd_temperature=2.0, kd_top_k=K)
    inputs = [ms.Tensor(x) for x in (ids, labels, mask, t_ids, t_lp)]
    loss = float(kd(inputs[0], labels=inputs[1], loss_mask=inputs[2], topk_ids=inputs[3], topk_logprobs=inputs[4]))
    base = _model(ms, LlamaForCausalLM)  # same seed: the same weights (test above: alpha 1 == its CE)
    base.set_train(False)
    logits = base(inputs[0])[0].asnumpy().reshape(S, VOCAB)
    want = kd_loss(torch.tensor(logits), torch.tensor(labels[0]).long(), torch.tensor(t_ids.reshape(S, K)),
                   torch.tensor(t_lp.reshape(S, K)), 0.3, 2.0)
    assert abs(loss - float(want)) < 1e-5, (loss, float(want))

    params = kd.trainable_params()

    def f(a, b, c, d, e):
        return kd(a, labels=b, loss_mask=c, topk_ids=d, topk_logprobs=e)

    value, grads = ms.jit(ms.value_and_grad(f, None, params))(*inputs)
    assert abs(float(value) - loss) < 1e-5
    norms = [float(np.linalg.norm(g.asnumpy())) for g in grads]
    assert all(np.isfinite(norms)) and sum(norms) > 0


def test_per_token_mode_returns_numerator_and_denominator(ms_graph):
    ms = ms_graph
    from distilled.kd.mindformers_kd import KDLlamaForCausalLM

    ids, labels, mask, t_ids, t_lp = _batch()
    kd = _model(ms, KDLlamaForCausalLM, kd_alpha=0.5, kd_top_k=K, calculate_per_token_loss=True)
    kd_mean = _model(ms, KDLlamaForCausalLM, kd_alpha=0.5, kd_top_k=K)
    args = dict(labels=ms.Tensor(labels), loss_mask=ms.Tensor(mask), topk_ids=ms.Tensor(t_ids),
                topk_logprobs=ms.Tensor(t_lp))
    num, den = kd(ms.Tensor(ids), **args)
    assert abs(float(den) - mask.sum()) < 1e-3
    assert abs(float(num) / float(den) - float(kd_mean(ms.Tensor(ids), **args))) < 1e-5


def test_config_errors_are_named(ms_graph):
    from distilled.kd.mindformers_kd import KDLlamaForCausalLM

    with pytest.raises(ValueError, match="kd_top_k"):
        KDLlamaForCausalLM(_cfg())
    with pytest.raises(ValueError, match="kd_alpha"):
        KDLlamaForCausalLM(_cfg(kd_top_k=K, kd_alpha=1.5))


def test_registered_and_loader_feeds_topk_columns(ms_graph, tmp_path, qwen_tokenizer):
    import datasets
    from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

    from distilled.kd.align import build_topk_arrays, pack_with_topk
    from distilled.kd.mindformers_kd import KDPackedDataLoader
    from distilled.kd.standin import synth_top_logprobs
    from distilled.data.chat import ChatEncoder

    assert MindFormerRegister.get_cls(MindFormerModuleType.MODELS, "KDLlamaForCausalLM") is not None
    assert MindFormerRegister.get_cls(MindFormerModuleType.DATASET_LOADER, "KDPackedDataLoader") is KDPackedDataLoader
    enc = ChatEncoder(qwen_tokenizer)
    answers = [f"The answer is {i * 7}." for i in range(6)]
    batch = enc.encode([[{"role": "user", "content": f"{i} times 7?"}, {"role": "assistant", "content": a}]
                        for i, a in enumerate(answers)])
    recs = [synth_top_logprobs(qwen_tokenizer.encode(a, add_special_tokens=False), K, i) for i, a in enumerate(answers)]
    rows = [batch.row(i) for i in range(len(batch))]
    t_ids, t_lp, _ = build_topk_arrays([r[0] for r in rows], [r[1] for r in rows], recs, K)
    packed, stats, n_kd = pack_with_topk(batch.to_arrow(), t_ids, t_lp, 64, 151643)
    datasets.Dataset(packed).save_to_disk(str(tmp_path / "packed"))
    ds = KDPackedDataLoader(load_func="load_from_disk", dataset_path=str(tmp_path / "packed"),
                            create_attention_mask=True, use_broadcast_data=False, shuffle=False)
    assert ds.get_col_names() == ["input_ids", "labels", "loss_mask", "position_ids", "attention_mask",
                                  "topk_ids", "topk_logprobs"]
    seen = 0
    for row, item in enumerate(ds.create_tuple_iterator(output_numpy=True)):
        lab, tid, tlp = item[1], item[5], item[6]
        assert tid.shape == (64 * K,) and tid.dtype == np.int32 and tlp.dtype == np.float16
        np.testing.assert_array_equal(tid, packed.column("topk_ids")[row].as_py())
        has = tid.reshape(64, K)[:, 0] >= 0
        assert (lab[has] != -100).all()
        seen += int(has.sum())
    assert seen == n_kd > 0
