"""``BFDPackingHandler``: MindFormers 1.9 dataset-level handler over :func:`distilled.data.packing.pack_table`.

Why not MindFormers' ``PackingHandler``: it packs next-fit in a Python loop (83% fill, slow), and
``HFDataLoader``'s ``process_legacy_args`` rewrites any ``PackingHandler`` entry to only
``{seq_length, pack_strategy}``, silently replacing the pad token with 0 — every document's last
label then trains the model on token 0. This handler has its own ``type`` name, so its
keyword arguments (``pad_token`` included) reach it unchanged.

YAML (MindFormers data_loader / toolkit config)::

    handler:
      - type: OpenR1Math220kDataHandler
        ...
      - type: BFDPackingHandler
        seq_length: 32768
        pad_token: 151643        # Qwen2.5 <|endoftext|>
        overlong: drop           # or truncate
    create_attention_mask: True  # needed so MindFormers builds loss_mask/position_ids/attention_mask

MindFormers only finds handlers that are attributes of ``mindformers.dataset.handler``;
``handlers.register_with_mindformers()`` (or :func:`register`) sets it there.
"""

from __future__ import annotations

from typing import Any

from mindformers.dataset.handler.base_handler import BaseInstructDataHandler
from mindformers.tools.logger import logger

from distilled.data.packing import QWEN_PAD_ID, PackStats, pack_table, to_dataset


class BFDPackingHandler(BaseInstructDataHandler):
    """Best-fit-decreasing packing to ``seq_length`` with a real pad id (see module docstring).

    Args:
        seq_length: tokens per packed row.
        pad_token: pad id for ``input_ids`` padding. Default: ``pad_token_id`` if given, else the
            tokenizer's pad id if a ``tokenizer`` is given, else 151643 (Qwen2.5 ``<|endoftext|>``).
        overlong: ``"drop"`` or ``"truncate"`` samples longer than ``seq_length`` (counted).
        boundary_label: label after each document's last token: ``"ignore"`` (-100, default: not
            trained) or ``"pad"`` (pad id, as MindFormers' PackingHandler writes it, trained).
        seed: shuffle packed rows with this seed (rows otherwise come longest-documents-first).
        **kwargs: MindFormers' base handler arguments (``tokenizer``, ``pad_token_id``,
            ``ignore_token_id``...).

    After a call, ``self.stats`` holds the :class:`~distilled.data.packing.PackStats` of the run.
    """

    def __init__(
        self,
        seq_length: int,
        pad_token: int | None = None,
        overlong: str = "drop",
        boundary_label: str = "ignore",
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        explicit_pad_id = kwargs.get("pad_token_id")
        super().__init__(**kwargs)
        if pad_token is None:
            if explicit_pad_id is not None:
                pad_token = explicit_pad_id
            elif self.tokenizer is not None and getattr(self.tokenizer, "pad_token_id", None) is not None:
                pad_token = self.tokenizer.pad_token_id
            else:
                pad_token = QWEN_PAD_ID
        if self.ignore_token_id != -100:
            raise ValueError(
                f"BFDPackingHandler: ignore_token_id must be -100 (MindFormers builds loss_mask as "
                f"labels != -100), got {self.ignore_token_id}"
            )
        if overlong not in ("drop", "truncate"):
            raise ValueError(f"BFDPackingHandler: overlong must be 'drop' or 'truncate', got {overlong!r}")
        if boundary_label not in ("ignore", "pad"):
            raise ValueError(
                f"BFDPackingHandler: boundary_label must be 'ignore' or 'pad', got {boundary_label!r}"
            )
        self.seq_length = int(seq_length)
        self.pad_token = int(pad_token)
        self.pad_token_id = self.pad_token
        self.overlong = overlong
        self.boundary_label = boundary_label
        self.seed = seed
        self.stats: PackStats | None = None

    def __call__(self, dataset):
        """Pack a map-style ``datasets.Dataset`` with ``input_ids``/``labels``; returns a new
        ``datasets.Dataset`` with ``input_ids, labels, actual_seq_len, position_ids``."""
        import datasets

        if isinstance(dataset, (datasets.IterableDataset, datasets.IterableDatasetDict)):
            raise ValueError(
                "BFDPackingHandler needs a map-style dataset (best fit looks at every sample's "
                "length); with streaming: true, pack offline with `distill preprocess` first"
            )
        if isinstance(dataset, datasets.DatasetDict):
            return datasets.DatasetDict({k: self(v) for k, v in dataset.items()})
        if getattr(dataset, "_indices", None) is not None:  # after select/shuffle/filter
            dataset = dataset.flatten_indices()
        table = dataset.data.table
        packed, stats = pack_table(
            table,
            self.seq_length,
            self.pad_token,
            self.overlong,
            boundary_label=self.boundary_label,
            seed=self.seed,
            progress=True,
        )
        self.stats = stats
        logger.info(f"BFDPackingHandler: {stats.summary()}")
        if stats.rows == 0:
            raise ValueError(
                f"BFDPackingHandler: no sample left to pack ({stats.samples_in} in, "
                f"{stats.dropped_overlong} longer than seq_length={self.seq_length} dropped, "
                f"{stats.dropped_empty} empty); raise seq_length or use overlong: truncate"
            )
        # to_dataset sets an explicit fingerprint: without one `datasets` hashes the whole packed
        # table (a full serialised copy: seconds and hundreds of MB) just to name a cache entry.
        key = repr((getattr(dataset, "_fingerprint", None), "BFDPackingHandler", self.seq_length,
                    self.pad_token, self.overlong, self.boundary_label, self.seed))
        return to_dataset(packed, key)
