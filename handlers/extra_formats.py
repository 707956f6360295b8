"""Handlers for the other R1 trace formats (issue 9): Bespoke-Stratos/OpenThoughts and Magpie.

``StratosDataHandler``: rows with ``system`` and ``conversations: [{from, value}]`` whose assistant
text uses ``<|begin_of_thought|>..<|end_of_solution|>``. ``think_style: keep`` (default) keeps the
row's system prompt and markers; ``think_style: r1`` rewrites the answer to
``<think>\\n..\\n</think>\\n\\n..`` and uses ``system_prompt`` instead.

``MagpieDataHandler``: rows with ``instruction`` and ``response`` (already ``<think>``-style).
"""

from __future__ import annotations

from handlers.formats_base import FormatDataHandler


class StratosDataHandler(FormatDataHandler):
    """Bespoke-Stratos-17k / OpenThoughts-114k handler (arguments in ``FormatDataHandler``)."""

    format_name = "stratos"


class MagpieDataHandler(FormatDataHandler):
    """Magpie-Reasoning handler (arguments in ``FormatDataHandler``)."""

    format_name = "magpie"
