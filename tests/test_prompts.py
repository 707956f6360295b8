"""distilled.prompts: the one [system?, user] build that generate, reject, formats and eval share."""

from __future__ import annotations

import doctest

from distilled import prompts
from distilled.prompts import DEFAULT_PROMPT_TEMPLATE, build_messages, render_prompt, with_system


def test_module_doctest():
    res = doctest.testmod(prompts)
    assert res.attempted >= 5 and res.failed == 0


def test_build_messages_system_only_when_given():
    assert build_messages("q", None) == [{"role": "user", "content": "q"}]
    assert build_messages("q", "") == [{"role": "user", "content": "q"}]
    assert build_messages("q", "s") == [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]


def test_with_system_keeps_an_existing_system_turn_and_does_not_mutate():
    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    out = with_system(conv, "s")
    assert [m["role"] for m in out] == ["system", "user", "assistant"] and len(conv) == 2
    own = [{"role": "system", "content": "own"}] + conv
    assert with_system(own, "s") == own


def test_render_prompt_open_r1_template_and_stray_braces():
    assert render_prompt(DEFAULT_PROMPT_TEMPLATE, "x").endswith("\\boxed{}:\nx")
    assert render_prompt("{prompt} {other}", "x") == "x {other}"
