"""``distill eval --prompt-template``: evaluate on the prompt format the model was trained with."""

from __future__ import annotations

import json

import pytest

from distilled.eval.tasks import MATH_PROMPT_TEMPLATE, load_task
from distilled.eval.runner import EvalConfig, EvalError


def _write(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps({"id": "a", "problem": "What is 2+3?", "answer": "5"}) + "\n")
    return f


def test_default_is_pinned_lighteval_prompt(tmp_path) -> None:
    task = load_task("synth", task_file=_write(tmp_path))
    assert task.problems[0].user_prompt == MATH_PROMPT_TEMPLATE.format(prompt="What is 2+3?")


def test_custom_template_used_and_recorded(tmp_path) -> None:
    task = load_task("synth", task_file=_write(tmp_path), math_template="Q: {prompt}")
    assert task.problems[0].user_prompt == "Q: What is 2+3?"
    cfg = EvalConfig(tasks="synth", engine="openai", prompt_template="{prompt}")
    assert "custom math template" in cfg.prompt_version


def test_template_without_placeholder_refused() -> None:
    with pytest.raises(EvalError, match="prompt"):
        EvalConfig(tasks="synth", engine="openai", prompt_template="no placeholder")


def test_eval_renders_a_template_exactly_as_generate_does(tmp_path) -> None:
    """A template with a lone ``{}`` (``\\boxed{}``) is kept as written by both stages: eval and
    generate call the one renderer, so the student is scored on the prompt the teacher answered."""
    from distilled.prompts import render_prompt

    template = "Put the answer in \\boxed{}: {prompt}"
    task = load_task("synth", task_file=_write(tmp_path), math_template=template)
    assert task.problems[0].user_prompt == render_prompt(template, "What is 2+3?") == \
        "Put the answer in \\boxed{}: What is 2+3?"
