"""The one prompt and message build shared by generate, reject, the data handlers and eval.

Why one module: the student must be trained on, and evaluated with, the very messages the teacher
answered. When ``distill generate``, ``distill reject``, the training formats and ``distill eval``
each built ``[system?, user]`` themselves, a change in one (say, dropping an empty system prompt)
silently made train and eval prompts differ from the generation prompts. Every stage calls
:func:`build_messages` (or :func:`with_system` for a conversation it already has), and
``distill generate`` renders ``--prompt-template`` with :func:`render_prompt`.

>>> build_messages(render_prompt("Q: {prompt}", "1+1?"), "Be brief.")
[{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Q: 1+1?'}]
"""

from __future__ import annotations

__all__ = ["DEFAULT_PROMPT_TEMPLATE", "build_messages", "render_prompt", "with_system"]

# open-r1's default template (written for str.format, hence the doubled braces).
DEFAULT_PROMPT_TEMPLATE = ("You will be given a problem. Please reason step by step, and put your final answer "
                           "within \\boxed{{}}:\n{prompt}")


def render_prompt(template: str, prompt: str) -> str:
    """Apply a ``--prompt-template``: ``str.format(prompt=...)`` like open-r1 (so ``\\boxed{{}}``
    works), falling back to replacing ``{prompt}`` literally when the template has other braces.

    >>> render_prompt(DEFAULT_PROMPT_TEMPLATE, "2+2?").endswith("within \\\\boxed{}:\\n2+2?")
    True
    >>> render_prompt("Put it in \\\\boxed{}: {prompt}", "2+2?")  # a lone {} is kept as written
    'Put it in \\\\boxed{}: 2+2?'
    """
    try:
        return template.format(prompt=prompt)
    except (KeyError, IndexError, ValueError):
        return template.replace("{prompt}", prompt)


def with_system(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    """Prepend a system turn when ``system_prompt`` is non-empty and the conversation has none.

    An empty or ``None`` system prompt adds nothing (a blank system turn would change the chat
    template's output, and with it every token the student sees).

    >>> with_system([{"role": "user", "content": "hi"}], "")
    [{'role': 'user', 'content': 'hi'}]
    >>> with_system([{"role": "system", "content": "own"}], "other")[0]["content"]
    'own'
    """
    if system_prompt and (not messages or messages[0].get("role") != "system"):
        return [{"role": "system", "content": system_prompt}] + list(messages)
    return messages


def build_messages(user: str, system_prompt: str | None = None) -> list[dict[str, str]]:
    """``[system?, user]``: the request a teacher answers and the prompt a student is scored on.

    >>> build_messages("What is 1+1?", None)
    [{'role': 'user', 'content': 'What is 1+1?'}]
    >>> [m["role"] for m in build_messages("What is 1+1?", "Think first.")]
    ['system', 'user']
    """
    return with_system([{"role": "user", "content": user}], system_prompt)
