"""``OpenR1Math220kDataHandler``: OpenR1-Math-220k rows (parquet or jsonl, ``default`` or
``extended`` config) -> ``input_ids``/``labels`` for MindFormers 1.9.

By default the conversation is the row's ``messages``. With ``generation_policy:
first_correct|shortest_correct|all_correct`` the assistant turn is built from ``generations``
where ``correctness_math_verify`` and ``is_reasoning_complete`` are both true (``all_correct``
yields one sample per such generation). A system prompt is prepended (default: the MindSpore
docs' "Please reason step by step, and put your final answer within \\boxed{}.").

YAML::

    - type: OpenR1Math220kDataHandler
      tokenizer: {pretrained_model_dir: /path/to/Qwen2.5-Math-7B}
      generation_policy: null        # or first_correct | shortest_correct | all_correct
"""

from __future__ import annotations

from handlers.formats_base import FormatDataHandler


class OpenR1Math220kDataHandler(FormatDataHandler):
    """OpenR1-Math-220k handler (see module docstring; arguments in ``FormatDataHandler``)."""

    format_name = "openr1"
