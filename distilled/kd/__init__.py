"""Logits distillation (issue 16): learn from the teacher's top-K token log-probabilities.

Why a package of its own: the plain SFT pipeline trains on the teacher's sampled *text*; this adds,
beside it and without changing it, everything needed to also train on the teacher's per-token
distribution, captured over the standard OpenAI-compatible API:

* :mod:`distilled.kd.sidecar` -- the compact columnar store of per-token top-K ids/logprobs,
  keyed by (uuid, generation index), with the same append-only / torn-tail / never-duplicate
  rules as ``generations.jsonl``;
* :mod:`distilled.kd.logprobs` -- parse ``logprobs`` from chat and completions responses, map
  teacher tokens to student ids by their bytes, and prove the vocabularies agree;
* :mod:`distilled.kd.standin` -- realistic top-K logprobs for the stand-in teacher server;
* :mod:`distilled.kd.align` -- top-K columns aligned to the trained (label) positions of packed rows;
* :mod:`distilled.kd.loss_torch` / :mod:`distilled.kd.loss_ms` -- ``alpha * CE + (1 - alpha) * KL``
  (forward KL over the teacher's top-K plus a tail bucket), per token over the global batch;
* :mod:`distilled.kd.mindformers_kd` -- the MindFormers model wrapper and data loader selected by YAML.

Nothing here imports torch, MindSpore or MindFormers at package import time.
"""

IGNORE_INDEX = -100
NO_TOKEN = -1  # top-K id where nothing is trained (or the teacher returned fewer than K entries)
MAX_TOP_LOGPROBS = 20  # the OpenAI-compatible API limit (vLLM and SGLang honour it too)
KD_COLUMNS = ("topk_ids", "topk_logprobs")  # extra packed columns (distilled.kd.align)
KD_ARCH = "KDLlamaForCausalLM"  # MindFormers model.arch.type (distilled.kd.mindformers_kd)
KD_LOADER = "KDPackedDataLoader"  # MindFormers train_dataset.data_loader.type


def uses_kd(config: dict) -> bool:
    """True when a (plain dict) MindFormers YAML names the KD model or data loader, so the caller
    must ``import distilled.kd.mindformers_kd`` (which registers them) before building anything."""
    arch = ((config.get("model") or {}).get("arch") or {}).get("type")
    loader = (((config.get("train_dataset") or {}).get("data_loader")) or {}).get("type")
    return arch == KD_ARCH or loader == KD_LOADER
