"""``CoTJsonlDataHandler``: the output of ``distill reject`` (verified JSONL with a ``messages``
column) or any ``messages``-style rows -> ``input_ids``/``labels`` for MindFormers 1.9.

``MessagesDataHandler`` is the same for general multi-turn OpenAI-style ``messages``: every
assistant turn is trained, nothing else is.

YAML::

    - type: CoTJsonlDataHandler
      tokenizer: {pretrained_model_dir: /path/to/Qwen2.5-Math-7B}
"""

from __future__ import annotations

from handlers.formats_base import FormatDataHandler


class CoTJsonlDataHandler(FormatDataHandler):
    """``distill reject`` output / messages JSONL handler (arguments in ``FormatDataHandler``)."""

    format_name = "cot"


class MessagesDataHandler(FormatDataHandler):
    """Any OpenAI-style multi-turn ``messages`` rows; every assistant turn trained."""

    format_name = "messages"
