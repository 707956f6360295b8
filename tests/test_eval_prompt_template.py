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
