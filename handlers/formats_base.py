"""Shared base of the format handlers: MindFormers 1.9 dataset-level API over ``distilled.data.formats``.

Why not the MindSpore docs' handler: it is written for the r1.5 per-example API
(``format_func``/``tokenize_func``), which MindFormers 1.9 cannot instantiate, and it
renders the chat template twice per row. These handlers take a ``datasets.Dataset`` (or
``IterableDataset``) and return one with ``input_ids`` and ``labels`` (unshifted, -100 where not
trained), tokenised in batches with the fast tokenizer; bad rows are skipped and counted by reason
(``self.skips``), or stop the run naming the row and field with ``strict: True``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mindformers.dataset.handler.base_handler import BaseInstructDataHandler
from mindformers.tools.logger import logger

from distilled import SYSTEM_PROMPT
from distilled.data.chat import ChatEncoder, encode_rows
from distilled.data.formats import FormatConfig, SkipCounter, iter_batch_rows

_UNSET = object()


class FormatDataHandler(BaseInstructDataHandler):
    """Base for the format handlers; subclasses set ``format_name``.

    Args (YAML keys):
        tokenizer: ``{pretrained_model_dir: DIR}`` (any HF model/tokenizer folder, e.g. a real
            Qwen2.5-Math-7B or ``distill tokenizer qwen2.5`` output), or MindFormers' legacy
            ``{type: Qwen2Tokenizer, vocab_file: DIR/vocab.json, merges_file: ...}``: the fast
            tokenizer is then loaded from the folder holding ``vocab_file``.
        system_prompt: system turn added when a row has none; ``null``/``""`` disables it.
            Default: "Please reason step by step, and put your final answer within \\boxed{}."
        generation_policy / think_style / messages_column: see ``distilled.data.formats.FormatConfig``.
        domains / domain_column: keep only rows whose ``domain_column`` (default ``source``) value is
            listed (``"math,code=0.5"``, a list, or ``{value: fraction}``); see ``FormatConfig``.
        seq_length: accepted for YAML compatibility; over-length samples are left to the packing
            handler, which drops or truncates them and counts them.
        strict: stop at the first bad row (error names row and field) instead of counting it.
        batch_size: rows per tokenizer batch. num_proc: ``datasets.map`` worker processes.
        chat_template: a template string or a path to a ``.jinja`` file to use instead of the
            tokenizer's own.
        engine: ``auto`` (tiktoken when it provably reproduces the tokenizer's ids, e.g. Qwen2.5;
            several times faster), ``hf`` or ``tiktoken``.
    """

    format_name = "cot"
    output_columns = ["input_ids", "labels"]

    def __init__(self, seq_length: int | None = None, system_prompt: Any = _UNSET,
                 generation_policy: str | None = None, think_style: str = "keep",
                 messages_column: str = "messages", strict: bool = False, batch_size: int = 1000,
                 num_proc: int | None = None, chat_template: str | None = None, engine: str = "auto",
                 domains: Any = None, domain_column: str = "source", **kwargs: Any) -> None:
        kwargs.pop("output_columns", None)
        tok_cfg = kwargs.get("tokenizer")
        if tok_cfg is None:
            raise ValueError(f"{type(self).__name__}: `tokenizer` is required, e.g. "
                             "tokenizer: {pretrained_model_dir: /path/to/Qwen2.5-Math-7B}")
        super().__init__(**kwargs)
        if not getattr(self.tokenizer, "is_fast", False):
            raise TypeError(f"{type(self).__name__}: needs a Hugging Face fast tokenizer (a folder with "
                            f"tokenizer.json), got {type(self.tokenizer).__name__}")
        self.seq_length = seq_length
        self.config = FormatConfig(self.format_name,
                                   SYSTEM_PROMPT if system_prompt is _UNSET else (system_prompt or None),
                                   generation_policy, think_style, messages_column,
                                   domain_column=domain_column, domains=domains)
        if chat_template and os.path.isfile(chat_template):
            chat_template = Path(chat_template).read_text(encoding="utf-8")
        self.encoder = ChatEncoder(self.tokenizer, chat_template, engine)
        self.strict = bool(strict)
        self.batch_size = int(batch_size)
        self.num_proc = num_proc
        self.skips = SkipCounter()
        self.rows_in = 0
        self._stats_dir: str | None = None  # set during __call__ (see process_batch)

    def build_tokenizer(self, config):
        """Load a fast tokenizer from a folder. MindFormers' legacy path would build its slow
        Python ``Qwen2Tokenizer``; the folder holding ``vocab_file`` has ``tokenizer.json`` too."""
        if config is None:
            return None
        from distilled.data.tokenizer import load_tokenizer

        config = dict(config)
        folder = config.get("pretrained_model_dir") or config.get("path")
        if not folder and config.get("vocab_file"):
            folder = os.path.dirname(os.path.abspath(config["vocab_file"]))
        if folder:
            tok = load_tokenizer(folder)
            tok.padding_side = config.get("padding_side", "right")
            return tok
        return super().build_tokenizer(config)

    def process_batch(self, batch: dict[str, list], indices: list[int]):
        """``datasets.map(batched=True, with_indices=True)`` function -> ``pyarrow.Table``.

        With ``num_proc > 1`` this runs in worker processes, whose ``self.skips`` is a copy that
        dies with the worker. So each batch also writes its counts to ``<stats dir>/<first
        index>.json`` (keyed by the first row, so a re-run batch overwrites rather than adds), and
        ``__call__`` sums those files after the map: the counts come back from every worker.
        """
        rows = iter_batch_rows(batch)
        locs = [f"row {i + 1}" for i in indices]
        local = SkipCounter()
        enc = encode_rows(rows, self.config, self.encoder, local, locs, self.strict)
        self.rows_in += len(rows)
        self.skips.merge(local)
        stats_dir = getattr(self, "_stats_dir", None)
        if stats_dir and indices:
            rec = {"rows_in": len(rows), "first_index": int(indices[0]), "counts": dict(local.counts),
                   "first": dict(local.first)}
            final = os.path.join(stats_dir, f"{int(indices[0]):012d}.json")
            tmp = f"{final}.{os.getpid()}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(rec, f)
            os.replace(tmp, final)
        return enc.to_arrow()

    def _collect_stats(self, stats_dir: str, base: SkipCounter, base_rows: int) -> None:
        """Sum the per-batch count files (in row order, so ``first_seen`` is the first bad row)."""
        skips, rows_in = base, base_rows
        for name in sorted(os.listdir(stats_dir)):
            if not name.endswith(".json"):
                continue
            with open(os.path.join(stats_dir, name), encoding="utf-8") as f:
                rec = json.load(f)
            rows_in += int(rec["rows_in"])
            for reason, n in rec["counts"].items():
                skips.add(reason, rec["first"].get(reason, ""), int(n))
        self.skips, self.rows_in = skips, rows_in

    def __call__(self, dataset):
        """Tokenise and mask ``dataset``; returns ``input_ids``/``labels`` only."""
        import datasets

        if isinstance(dataset, datasets.DatasetDict):
            return datasets.DatasetDict({k: self(v) for k, v in dataset.items()})
        columns = dataset.column_names or list(next(iter(dataset)).keys())
        kw = dict(batched=True, with_indices=True, batch_size=self.batch_size, remove_columns=columns)
        if not isinstance(dataset, datasets.Dataset):  # lazy: counted in-process as it is iterated
            return dataset.map(self.process_batch, **kw)
        # A cached map would run no batch and so count nothing: always recompute.
        kw.update(num_proc=self.num_proc, desc=f"{type(self).__name__}", load_from_cache_file=False)
        stats_dir = tempfile.mkdtemp(prefix="distilled-skips-")
        self._stats_dir = stats_dir
        base = SkipCounter()
        base.merge(self.skips)  # earlier calls (e.g. other splits of a DatasetDict)
        base_rows = self.rows_in
        try:
            out = dataset.map(self.process_batch, **kw)
            self._collect_stats(stats_dir, base, base_rows)
        finally:
            self._stats_dir = None
            shutil.rmtree(stats_dir, ignore_errors=True)
        logger.info(f"{type(self).__name__}: {len(out)} samples from {len(dataset)} rows; "
                    f"skipped {self.skips.total}: {dict(self.skips.counts)}")
        return out
