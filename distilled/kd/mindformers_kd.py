"""MindFormers 1.9 pieces for logits distillation, selected by YAML and compiled in graph mode.

* :class:`KDLlamaForCausalLM` -- registered under ``MindFormerModuleType.MODELS``; select it with
  ``model.arch.type: KDLlamaForCausalLM``. It is MindFormers' legacy ``LlamaForCausalLM`` (the
  Qwen2.5 path) with the training loss replaced by the KD loss of :mod:`distilled.kd.loss_ms`
  (``alpha * CE + (1 - alpha) * KL`` over the teacher's top-K plus a tail bucket). Its
  ``construct`` takes two extra keyword inputs, ``topk_ids`` and ``topk_logprobs`` (``[B, S * K]``
  as stored, reshaped to ``[B * S, K]`` inside), fed by ``construct_args_key``. Settings come from
  ``model.model_config``: ``kd_alpha`` (0.5), ``kd_temperature`` (1.0), ``kd_top_k`` (required:
  the K of the data) and MindFormers' own ``calculate_per_token_loss``: when true it returns
  ``(numerator, denominator)`` like MF's ``CrossEntropyLoss``, so ``MFTrainOneStepCell`` and
  ``GradAccumulationCellWithTwoOutput`` normalise per token over the global batch (issue 12). It is
  a training model only: evaluate or predict with ``LlamaForCausalLM`` (same weights and names).
* :class:`KDPackedDataLoader` -- registered under ``DATASET_LOADER``; MindFormers' ``HFDataLoader``
  (same YAML keys) whose packed samples also carry the two top-K columns. Why: in packed mode
  (``create_attention_mask: True``) ``HFDataset`` returns a fixed list of five columns and drops
  every other one, and in unpacked mode it refuses unknown columns.

Graph-mode rules kept: module-level imports only; ``construct`` branches only on Python constants
(``None`` inputs and config values), never on tensor values.

Importing this module imports MindSpore and MindFormers and registers both classes;
``run_mindformer.py`` imports it when a YAML names either class.
"""

from __future__ import annotations

import numpy as np
import mindspore.common.dtype as mstype
from mindspore.dataset import GeneratorDataset
from mindformers.dataset.dataloader.hf_dataloader import HFDataLoader, HFDataset
from mindformers.models.llama.llama import LlamaForCausalLM
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from distilled.kd.loss_ms import kd_loss_terms_ms

from distilled.kd import KD_ARCH, KD_COLUMNS, KD_LOADER


@MindFormerRegister.register(MindFormerModuleType.MODELS)
class KDLlamaForCausalLM(LlamaForCausalLM):
    """``LlamaForCausalLM`` trained with the KD loss on packed rows with aligned top-K columns."""

    def __init__(self, config=None):
        # `config=` by keyword: MindFormers' @lazy_inline wrapper of LlamaForCausalLM.__init__ reads
        # `disable_lazy_inline` (set by the Trainer) from kwargs["config"] only. Passed positionally,
        # lazy inline stayed on under msrun data parallel and the CPU graph failed to compile
        # ("Input[0] must be a Primitive ValueNode, but get ValueNode<FuncGraph> ...CR_..._construct").
        super().__init__(config=config)
        self.kd_alpha = float(getattr(config, "kd_alpha", 0.5))
        self.kd_temperature = float(getattr(config, "kd_temperature", 1.0))
        self.kd_top_k = int(getattr(config, "kd_top_k", 0) or 0)
        self.kd_per_token = bool(getattr(config, "calculate_per_token_loss", False))
        if not 0.0 <= self.kd_alpha <= 1.0:
            raise ValueError(f"model_config.kd_alpha must be in [0, 1], got {self.kd_alpha}")
        if self.kd_temperature <= 0:
            raise ValueError(f"model_config.kd_temperature must be > 0, got {self.kd_temperature}")
        if self.kd_top_k < 1:
            raise ValueError("model_config.kd_top_k must be the K of the top-K columns (1..20)")
        if not config.input_sliced_sig:
            raise ValueError("KDLlamaForCausalLM needs model_config.input_sliced_sig: True (the top-K columns are "
                             "aligned to the packed, already shifted labels)")

    def construct(self, input_ids, labels=None, input_position=None, position_ids=None, attention_mask=None,
                  input_embeds=None, init_reset=None, batch_valid_length=None, batch_index=None, zactivate_len=None,
                  block_tables=None, slot_mapping=None, prefix_keys_values=None, llm_boost_inputs=None,
                  q_seq_lens=None, loss_mask=None, gather_index=None, seq_range=None, actual_seq_len=None,
                  topk_ids=None, topk_logprobs=None):
        r"""The KD training loss (training only: evaluate or predict with ``LlamaForCausalLM``,
        same weights and checkpoint names)."""
        output = self.model(input_ids, None, None, None, None, None, None, None, attention_mask, position_ids,
                            None, seq_range, actual_seq_len)
        logits = self.lm_head(output)
        logits = self.cast(self.reshape(logits, (-1, logits.shape[-1])), mstype.float32)
        flat_labels = self.reshape(labels, (-1,))
        if loss_mask is None:
            mask = self.cast(self.not_equal(flat_labels, self.ignore_token_id), mstype.float32)
        else:
            mask = self.cast(self.reshape(loss_mask, (-1,)), mstype.float32)
        ids = self.reshape(topk_ids, (-1, self.kd_top_k))
        lps = self.reshape(topk_logprobs, (-1, self.kd_top_k))
        numerator, tokens, _, _ = kd_loss_terms_ms(logits, flat_labels, mask, ids, lps, self.kd_alpha,
                                                   self.kd_temperature, self.ignore_token_id)
        denominator = tokens + 1e-8
        if self.kd_per_token:
            return numerator, denominator
        return numerator / denominator


class KDHFDataset(HFDataset):
    """MindFormers' ``HFDataset`` plus the two top-K columns after its packed columns."""

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        missing = [c for c in KD_COLUMNS if c not in dataset.column_names]
        if missing:
            raise ValueError(f"{KD_LOADER}: the dataset has no column(s) {missing} (columns: {dataset.column_names}); "
                             f"build it with `distill preprocess --kd-sidecar ...`")
        self.column_names = list(self.column_names) + list(KD_COLUMNS)

    def __getitem__(self, idx):
        base = super().__getitem__(idx)
        sample = self.dataset[int(idx)]
        return tuple(base) + (np.asarray(sample["topk_ids"], dtype=np.int32),
                              np.asarray(sample["topk_logprobs"], dtype=np.float16))


@MindFormerRegister.register(MindFormerModuleType.DATASET_LOADER)
class KDPackedDataLoader(HFDataLoader):
    """``HFDataLoader`` whose samples carry ``topk_ids``/``topk_logprobs`` (same YAML keys)."""

    @classmethod
    def wrap_dataset(cls, config, dataset, shard_id=None, num_shards=None, python_multiprocessing=False,
                     num_parallel_workers=1):
        if getattr(config, "streaming", False):
            raise ValueError(f"{KD_LOADER}: streaming datasets are not supported (use a save_to_disk directory)")
        hf_dataset = KDHFDataset(config, dataset)
        return GeneratorDataset(hf_dataset, column_names=hf_dataset.column_names,
                                num_parallel_workers=num_parallel_workers,
                                python_multiprocessing=python_multiprocessing, shard_id=shard_id,
                                num_shards=num_shards, shuffle=config.shuffle)


__all__ = ["KDLlamaForCausalLM", "KDPackedDataLoader", "KDHFDataset", "KD_COLUMNS", "KD_ARCH", "KD_LOADER"]
