"""Packed output through MindFormers 1.9's own code (CPU): the label shift matches its
PackingHandler, its ``_get_packed_data`` gives loss_mask 0 at document ends, and
``CommonDataLoader``/``HFDataLoader`` with ``create_attention_mask: True`` yield exactly the
loss_mask, position_ids and attention_mask (1 = masked) that the documents imply, whether the
packed Arrow comes from disk or from ``type: BFDPackingHandler`` in a YAML-like config (whose
``pad_token`` must survive MindFormers' argument processing, unlike PackingHandler's)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import yaml

from distilled.data.packing import IGNORE_INDEX, QWEN_PAD_ID, pack_table

mf_packing = pytest.importorskip("mindformers.dataset.handler.packing_handler")
from mindformers.dataset.dataloader.build_dataloader import build_dataset_loader  # noqa: E402
from mindformers.dataset.dataloader.hf_dataloader import _get_packed_data  # noqa: E402

from handlers import register_with_mindformers  # noqa: E402
from handlers.bfd_packing import BFDPackingHandler  # noqa: E402

S = 32


def synthetic_docs(n: int, seed: int):
    """Documents whose token ids encode (document, offset): 1000 * (doc + 1) + offset; the first
    tokens (a 'prompt') are untrained, like a chat sample."""
    rng = np.random.default_rng(seed)
    docs, labels, trained = [], [], []
    for i in range(n):
        L = int(rng.integers(2, S + 1))
        ids = [1000 * (i + 1) + j for j in range(L)]
        prompt = int(rng.integers(0, L))
        mask = [j >= prompt for j in range(L)]
        docs.append(ids)
        labels.append([t if m else IGNORE_INDEX for t, m in zip(ids, mask)])
        trained.append(mask)
    return docs, labels, trained


def handled_table(docs, labels):
    t = pa.list_(pa.int32())
    return pa.table({"input_ids": docs, "labels": labels}, schema=pa.schema([("input_ids", t), ("labels", t)]))


def expected_from_documents(input_ids, docs, trained, pad):
    """loss_mask, position_ids, attention_mask (1 = masked), labels implied by the documents
    found in a packed row (each must appear whole, from its first token)."""
    n = len(input_ids)
    seg = np.empty(n, dtype=np.int64)
    pos = np.empty(n, dtype=np.int64)
    loss = np.zeros(n, dtype=np.int64)
    labels = np.full(n, IGNORE_INDEX, dtype=np.int64)
    p = 0
    while p < n and input_ids[p] != pad:
        d = input_ids[p] // 1000 - 1
        doc = docs[d]
        assert list(input_ids[p:p + len(doc)]) == doc, "document not packed whole"
        for j in range(len(doc)):
            seg[p + j], pos[p + j] = d, j
            if j + 1 < len(doc) and trained[d][j + 1]:
                loss[p + j] = 1
                labels[p + j] = doc[j + 1]
        p += len(doc)
    seg[p:] = -1  # padding tail: its own segment
    pos[p:] = np.arange(n - p)
    assert all(t == pad for t in input_ids[p:])
    i, j = np.indices((n, n))
    attend = (j <= i) & (seg[i] == seg[j])
    return loss, pos, (~attend).astype(np.int64)[None], labels


def iterate(loader):
    return list(loader.create_tuple_iterator(num_epochs=1, output_numpy=True))


def loader_config(path, handler=None):
    text = f"""
type: CommonDataLoader
load_func: load_from_disk
dataset_path: {path}
shuffle: False
create_attention_mask: True
use_broadcast_data: False
"""
    cfg = yaml.safe_load(text)
    if handler is not None:
        cfg["handler"] = handler
    return cfg


def test_shift_matches_mindformers_packing_handler():
    """Where next-fit and BFD make the same rows, our output equals MF's PackingHandler's
    (boundary_label='pad'), and with the default only the document-end labels differ (-100)."""
    docs = [[11, 12, 13, 14], [21, 22], [31, 32, 33], [41, 42, 43]]
    labels = [[-100, 12, 13, 14], [21, 22], [-100, -100, 33], [41, 42, 43]]
    cfg = mf_packing.PackingConfig(seq_length=6, pad_token=7,
                                   output_columns=["input_ids", "labels", "actual_seq_len"])
    mf = mf_packing.pack_examples([{"input_ids": d, "labels": l} for d, l in zip(docs, labels)], cfg)
    ours, _ = pack_table(handled_table(docs, labels), 6, pad_id=7, boundary_label="pad")
    for col in ("input_ids", "labels", "actual_seq_len"):
        assert ours.column(col).to_pylist() == mf[col], col

    ours_default, _ = pack_table(handled_table(docs, labels), 6, pad_id=7)
    for mf_row, row in zip(mf["labels"], ours_default.column("labels").to_pylist()):
        diff = [k for k, (a, b) in enumerate(zip(mf_row, row)) if a != b]
        assert all(row[k] == IGNORE_INDEX and mf_row[k] == 7 for k in diff)
    assert ours_default.column("labels").to_pylist()[0] == [12, 13, 14, -100, 22, -100]


def test_get_packed_data_gives_loss_mask_zero_at_document_ends():
    docs, labels, trained = synthetic_docs(12, seed=0)
    packed, _ = pack_table(handled_table(docs, labels), S, pad_id=QWEN_PAD_ID)
    for row in packed.to_pylist():
        tokens, labs, loss_mask, pos, mask = _get_packed_data(row["input_ids"], row["labels"],
                                                              row["actual_seq_len"])
        ends = np.array(row["actual_seq_len"]) - 1
        assert (loss_mask[ends] == 0).all()
        assert (labs[ends] == IGNORE_INDEX).all()
        assert pos.tolist() == row["position_ids"]  # our position_ids == MF's


def test_common_dataloader_on_saved_packed_output(tmp_path):
    import datasets

    docs, labels, trained = synthetic_docs(40, seed=1)
    packed, stats = pack_table(handled_table(docs, labels), S, pad_id=QWEN_PAD_ID)
    path = tmp_path / "packed"
    datasets.Dataset(packed).save_to_disk(str(path))

    loader = build_dataset_loader(loader_config(path))
    got = iterate(loader)
    assert len(got) == stats.rows == packed.num_rows
    seen = set()
    for (ids, labs, loss_mask, pos, mask), row in zip(got, packed.to_pylist()):
        assert ids.tolist() == row["input_ids"]
        exp_loss, exp_pos, exp_mask, exp_labels = expected_from_documents(ids.tolist(), docs, trained,
                                                                         QWEN_PAD_ID)
        assert mask.shape == (1, S, S)
        assert np.array_equal(loss_mask, exp_loss)
        assert np.array_equal(pos, exp_pos)
        assert np.array_equal(mask, exp_mask)
        assert np.array_equal(labs, exp_labels)
        seen.update(t // 1000 - 1 for t in ids.tolist() if t != QWEN_PAD_ID)
    assert seen == set(range(len(docs)))  # every document reached the trainer


def test_yaml_bfd_handler_keeps_pad_token_through_hfdataloader(tmp_path):
    import datasets

    register_with_mindformers()
    import mindformers.dataset.handler as mf_handler

    assert mf_handler.BFDPackingHandler is BFDPackingHandler
    docs, labels, trained = synthetic_docs(30, seed=2)
    docs.append([999_000 + j for j in range(S + 5)])  # overlong: dropped
    labels.append(list(docs[-1]))
    trained.append([True] * (S + 5))
    path = tmp_path / "handled"
    datasets.Dataset(handled_table(docs, labels)).save_to_disk(str(path))
    pad = 151643
    handler = yaml.safe_load(f"""
- type: BFDPackingHandler
  seq_length: {S}
  pad_token: {pad}
  overlong: drop
""")
    got = iterate(build_dataset_loader(loader_config(path, handler)))
    expected, stats = pack_table(handled_table(docs, labels), S, pad_id=pad)
    assert stats.dropped_overlong == 1
    assert len(got) == expected.num_rows
    n_padded = 0
    for (ids, labs, loss_mask, pos, mask), row in zip(got, expected.to_pylist()):
        assert ids.tolist() == row["input_ids"]  # same packing as pack_table, pad id kept
        assert 0 not in ids.tolist()
        n_padded += int(ids[-1] == pad)
        exp_loss, exp_pos, exp_mask, exp_labels = expected_from_documents(ids.tolist(), docs[:-1], trained,
                                                                         pad)
        assert np.array_equal(loss_mask, exp_loss)
        assert np.array_equal(pos, exp_pos)
        assert np.array_equal(mask, exp_mask)
        assert np.array_equal(labs, exp_labels)
    assert n_padded > 0


def test_mindformers_packing_handler_drops_pad_token(tmp_path):
    """Evidence for why BFDPackingHandler exists: the same YAML with MindFormers'
    PackingHandler loses pad_token, pads with 0 and trains every document's last position on
    token 0 (loss_mask 1)."""
    import datasets

    docs, labels, _ = synthetic_docs(10, seed=3)
    path = tmp_path / "handled"
    datasets.Dataset(handled_table(docs, labels)).save_to_disk(str(path))
    handler = [{"type": "PackingHandler", "seq_length": S, "pack_strategy": "pack", "pad_token": 151643}]
    got = iterate(build_dataset_loader(loader_config(path, handler)))
    trained_on_zero = 0
    for ids, labs, loss_mask, pos, mask in got:
        trained_on_zero += int(((labs == 0) & (loss_mask == 1)).sum())
    assert trained_on_zero > 0


def test_handler_arguments_and_dataset_kinds():
    import datasets

    assert BFDPackingHandler(seq_length=8).pad_token == QWEN_PAD_ID
    assert BFDPackingHandler(seq_length=8, pad_token_id=5).pad_token == 5
    assert BFDPackingHandler(seq_length=8, pad_token=6, pad_token_id=5).pad_token == 6
    with pytest.raises(ValueError, match="overlong"):
        BFDPackingHandler(seq_length=8, overlong="cut")
    with pytest.raises(ValueError, match="ignore_token_id must be -100"):
        BFDPackingHandler(seq_length=8, ignore_token_id=0)

    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10] * 12]
    ds = datasets.Dataset(handled_table(docs, docs))
    h = BFDPackingHandler(seq_length=8, pad_token=0, overlong="drop")
    # a view with an indices mapping (select/shuffle/filter) packs the selected rows only
    out = h(ds.select([2, 0, 3]))
    assert h.stats.samples_in == 3 and h.stats.dropped_overlong == 1
    assert sorted(t for row in out["input_ids"] for t in row if t) == [1, 2, 3, 6, 7, 8, 9]
    dd = h(datasets.DatasetDict({"train": ds}))
    assert dd["train"].column_names == ["input_ids", "labels", "actual_seq_len", "position_ids"]
    with pytest.raises(ValueError, match="map-style dataset"):
        h(ds.to_iterable_dataset())
    with pytest.raises(ValueError, match="no sample left to pack"):
        BFDPackingHandler(seq_length=2)(ds.select([0, 2, 3]))
