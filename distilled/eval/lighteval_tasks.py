"""lighteval custom tasks with the same prompts and scoring as ``distill eval`` (lighteval >= 0.10).

Why: users who run ``lighteval vllm|accelerate|endpoint litellm`` should get the numbers
``distill eval`` gives, not those of whatever prompt their lighteval release ships (lighteval
0.11+ changed math_500's prompt to an ``ANSWER: $ANSWER`` line, and its GPQA shuffle is unseeded).
This file is loaded by lighteval with ``--custom-tasks``; it runs in lighteval's own environment
(``make eval-env`` builds ``.venv-eval``: lighteval needs numpy>=2 and another
latex2sympy2_extended than the main env). The main package never imports it.

Tasks (append ``@n=K`` for K samples per problem; the metric is pass@1 averaged over them)::

    distilled_math_500  distilled_aime24  distilled_aime25  distilled_gpqa_diamond

Usage::

    .venv-eval/bin/lighteval accelerate \\
        "model_name=runs/student-hf,dtype=bfloat16,generation_parameters={temperature:0.6,top_p:0.95,max_new_tokens:32768}" \\
        "distilled_math_500@n=4|0,distilled_aime24@n=64|0,distilled_gpqa_diamond@n=8|0" \\
        --custom-tasks distilled/eval/lighteval_tasks.py --output-dir runs/lighteval

Environment: ``DISTILLED_EVAL_DATA_DIR`` reads the benchmarks from local files (``math500.jsonl``,
``aime24.jsonl``, ``aime25.jsonl``, ``gpqa_diamond.jsonl``, as for ``distill eval --data-dir``)
instead of the hub; ``DISTILLED_EVAL_SEED`` is the GPQA shuffle seed (default 0, as ``--seed``);
``DISTILLED_EVAL_MAX_NEW_TOKENS`` the generation budget (default 32768, as ``--max-tokens``).

lighteval 0.13 imports all its built-in tasks first, and two of them need the network at import
time; run this file as the launcher (``.venv-eval/bin/python distilled/eval/lighteval_tasks.py
accelerate ...`` with the same arguments as ``lighteval``) to skip those offline.

Scoring, the rule ``distill eval`` uses (``eval_tasks.SCORING_RULE`` / ``answer_to_score``): only
the text after the last ``</think>`` is judged (also when generation stopped at the token limit
after it), an unclosed ``<think>`` scores 0, math answers prefer the last
``\\boxed{}`` then other LaTeX/expressions (lighteval's own math-verify port does the parsing and
comparison: math-verify itself cannot be installed beside lighteval's latex2sympy2_extended pin),
and GPQA letters are read by ``distilled.verify.extract_choice``.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

# Not distilled.paths.REPO_ROOT: this file runs inside .venv-eval, where `distilled` is not installed,
# so the root must be found from this file before `distilled` (paths included) can be imported.
_REPO = Path(__file__).resolve().parents[2]
if str(_REPO) not in sys.path:  # lighteval loads this file by path; make ``distilled`` importable
    sys.path.insert(0, str(_REPO))

from distilled.eval.tasks import (GPQA_COLUMNS, PROMPT_VERSION, TASKS, answer_to_score, gpqa_prompt,  # noqa: E402
                                  gpqa_shuffle, math_prompt, row_id)
from distilled.verify import _gold_text, extract_choice  # noqa: E402

from lighteval.metrics.metrics_sample import SampleLevelComputation, SamplingMetric  # noqa: E402
from lighteval.metrics.utils.metric_utils import SampleLevelMetric  # noqa: E402
from lighteval.tasks.lighteval_task import LightevalTaskConfig  # noqa: E402
from lighteval.tasks.requests import Doc, SamplingMethod  # noqa: E402

__all__ = ["TASKS_TABLE", "score_output", "PROMPT_VERSION"]

SEED = int(os.environ.get("DISTILLED_EVAL_SEED", "0"))
MAX_NEW_TOKENS = int(os.environ.get("DISTILLED_EVAL_MAX_NEW_TOKENS", "32768"))
"""The task's ``generation_size``. lighteval 0.13's accelerate backend generates
``generation_size`` tokens whatever ``generation_parameters.max_new_tokens`` says, so the budget
is set here (open-r1: 32768)."""


# --- scoring -----------------------------------------------------------------------------------

def _math_metric():
    from lighteval.metrics.dynamic_metrics import MultilingualExtractiveMatchMetric
    from lighteval.metrics.utils.extractive_match_utils import ExprExtractionConfig, LatexExtractionConfig
    from lighteval.utils.language import Language

    return MultilingualExtractiveMatchMetric(
        language=Language.ENGLISH,
        gold_extraction_target=(LatexExtractionConfig(), ExprExtractionConfig()),
        pred_extraction_target=(LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()),
        fallback_mode="first_match", extraction_mode="any_match", precision=6,
    )


_MATH = None


def score_output(text: str, gold: str, kind: str) -> float:
    """1.0 when ``text`` answers ``gold`` (LaTeX for ``math``, a letter for ``choice``), else 0.0."""
    global _MATH
    from lighteval.models.model_output import ModelResponse

    answer = answer_to_score(text)  # the rule distill eval uses too (eval_tasks.SCORING_RULE)
    if answer is None:
        return 0.0
    if kind == "choice":
        try:
            letter = extract_choice(answer)
        except ImportError:  # extract_choice's last fallback uses math-verify, absent here
            letter = None
        return 1.0 if letter is not None and letter == gold.strip().upper() else 0.0
    if _MATH is None:
        _MATH = _math_metric()
    doc = Doc(query="", choices=[_gold_text(gold)], gold_index=0)
    return float(_MATH.compute(doc, ModelResponse(text=[answer])))


class DistilledPassAt1(SamplingMetric, SampleLevelComputation):
    """pass@1 averaged over ``n`` samples, scored with :func:`score_output` on the raw text (before
    lighteval strips reasoning tags, so an unfinished ``<think>`` can be seen)."""

    def __init__(self, kind: str, n: int = 1):
        super().__init__(normalize=None, strip_strings=False, sample_scoring_function=lambda doc, mr: 0.0)
        self.kind = kind
        self.n = n

    def num_samples(self) -> int:
        return int(self.n)

    def compute(self, doc: Doc, model_response, **kwargs) -> float:
        gold = doc.get_golds()[0]
        texts = list(model_response.text)[: int(self.n)]
        if not texts:
            return 0.0
        return sum(score_output(t, gold, self.kind) for t in texts) / len(texts)


def _metric(kind: str, n: int) -> SampleLevelMetric:
    import numpy as np

    return SampleLevelMetric(metric_name="distilled_pass@1", higher_is_better=True,
                             category=SamplingMethod.GENERATIVE, sample_level_fn=DistilledPassAt1(kind, n),
                             corpus_level_fn=np.mean)


# --- prompts -----------------------------------------------------------------------------------

def math_doc(line: dict, task_name: str | None = None) -> Doc:
    """The pinned math prompt of ``distill eval`` (eval_tasks.MATH_PROMPT_TEMPLATE)."""
    return Doc(task_name=task_name, query=math_prompt(line["problem"]), choices=[str(line["answer"]).strip()],
               gold_index=0)


def gpqa_doc(line: dict, task_name: str | None = None) -> Doc:
    """The GPQA prompt with ``distill eval``'s seeded per-problem answer shuffle."""
    missing = [c for c in GPQA_COLUMNS if c not in line]
    if missing:
        raise KeyError(f"GPQA row without {missing}")
    choices, gold_index = gpqa_shuffle(line, SEED, row_id(line, None, "gpqa_diamond"))
    return Doc(task_name=task_name, query=gpqa_prompt(str(line["Question"]), choices), choices=list("ABCD"),
               gold_index=gold_index)


# --- data --------------------------------------------------------------------------------------

def _local_repo(task: str) -> str | None:
    """With DISTILLED_EVAL_DATA_DIR, a one-file folder per task that ``datasets.load_dataset``
    reads as split ``train`` (lighteval loads ``load_dataset(path, name)`` with no data_files)."""
    data_dir = os.environ.get("DISTILLED_EVAL_DATA_DIR")
    if not data_dir:
        return None
    spec = TASKS[task]
    for stem in spec.local_names:
        for ext in (".jsonl", ".parquet"):
            src = Path(data_dir) / f"{stem}{ext}"
            if src.exists():
                dst_dir = Path(tempfile.gettempdir()) / f"distilled-lighteval-{os.getuid()}" / task
                dst_dir.mkdir(parents=True, exist_ok=True)
                for old in dst_dir.iterdir():
                    old.unlink()
                (dst_dir / f"train{ext}").symlink_to(src.resolve())
                return str(dst_dir)
    return None


def _config(task: str, n: int) -> LightevalTaskConfig:
    spec = TASKS[task]
    local = _local_repo(task)
    assert spec.hub is not None
    repo, config, split = spec.hub
    if local is not None:
        repo, config, split = local, "default", "train"
    return LightevalTaskConfig(
        name=f"distilled_{task}",
        prompt_function=gpqa_doc if spec.kind == "choice" else math_doc,
        hf_repo=repo,
        hf_subset=config or "default",
        hf_avail_splits=[split],
        evaluation_splits=[split],
        few_shots_split=None,
        few_shots_select=None,
        generation_size=MAX_NEW_TOKENS,
        metrics=[_metric(spec.kind, n)],
        stop_sequence=[],
        version=1,
    )


TASKS_TABLE = [_config("math_500", 4), _config("aime24", 64), _config("aime25", 64), _config("gpqa_diamond", 8)]


# --- offline-safe launcher ---------------------------------------------------------------------

def _tolerant_registry() -> None:
    """Shim: let lighteval start when some of its *built-in* task modules fail to import.

    Why: lighteval 0.13 imports every built-in task module before it reads ``--custom-tasks``,
    and two of them reach the network at import time: ``tiny_benchmarks`` downloads a pickle from
    GitHub, and ``mt_bench`` builds an LLM judge that queries the Hub
    (``HfApi.list_models(model_name=...)``, which also fails with huggingface_hub >= 1). Offline, or
    with a newer hub client, ``lighteval accelerate`` then dies before evaluating anything. The
    modules that fail are skipped with a warning; their tasks are simply unavailable.
    """
    import importlib
    import logging

    from lighteval.tasks.registry import Registry

    log = logging.getLogger("distilled.eval.lighteval_tasks")

    def load_from_files(files, module_prefix):
        configs = {}
        for task_file in files:
            try:
                module = importlib.import_module(f"{module_prefix}.{task_file.stem}")
            except Exception as exc:  # noqa: BLE001 - any import-time failure of a built-in
                log.warning("skipping lighteval built-in tasks %s (%s: %s)", task_file.stem, type(exc).__name__, exc)
                continue
            configs.update(Registry._extract_configs(module))
        return configs

    def load_from_subdirs(subdirs):
        configs = {}
        for task_dir in subdirs:
            try:
                module = importlib.import_module(f"lighteval.tasks.tasks.{task_dir.name}.main")
            except Exception as exc:  # noqa: BLE001
                log.warning("skipping lighteval built-in tasks %s (%s: %s)", task_dir.name, type(exc).__name__, exc)
                continue
            configs.update(Registry._extract_configs(module))
        return configs

    Registry._load_from_files = staticmethod(load_from_files)
    Registry._load_from_subdirs = staticmethod(load_from_subdirs)


def _xxhash_accepts_str() -> None:
    """Shim: lighteval 0.13's details logger hashes ``str`` with ``xxhash.xxh64``, which
    xxhash >= 4.1 refuses ("Strings must be encoded before hashing"); the evaluation then
    crashes after generating. Give that module an ``xxh64`` that UTF-8-encodes strings first."""
    import types

    import xxhash

    import lighteval.logging.info_loggers as info_loggers

    def xxh64(data=b"", *args, **kwargs):
        return xxhash.xxh64(data.encode("utf-8") if isinstance(data, str) else data, *args, **kwargs)

    info_loggers.xxhash = types.SimpleNamespace(xxh64=xxh64)


def main(argv: list[str] | None = None) -> None:
    """``python distilled/eval/lighteval_tasks.py accelerate MODEL_ARGS TASKS --custom-tasks THIS_FILE ...``:
    the ``lighteval`` CLI with :func:`_tolerant_registry` and :func:`_xxhash_accepts_str` applied."""
    _tolerant_registry()
    _xxhash_accepts_str()
    from lighteval.__main__ import app

    sys.argv = ["lighteval"] + list(sys.argv[1:] if argv is None else argv)
    app()


if __name__ == "__main__":
    main()
