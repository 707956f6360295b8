"""Benchmark tasks for ``distill eval``: loading (local files or the hub), prompts, GPQA shuffle.

Why here and not in lighteval: lighteval's prompts drift between releases (the math_500 prompt
changed from a ``\\boxed{}`` instruction to ``ANSWER: $ANSWER`` in 0.11+), and its GPQA task
shuffles answer positions with the unseeded global ``random``, so two runs never see the same
prompts. We pin the prompt text (recorded as ``PROMPT_VERSION`` in results.json), seed the GPQA
shuffle per problem, and check every row before any generation starts.

Prompt texts (copied in meaning from lighteval 0.13.0, ``lighteval/tasks/tasks/aime.py`` and
``gpqa.py``, checked in .venv-eval):
- math (math_500, aime24, aime25, synth, jsonl:PATH): lighteval's ``MATH_PROMPT_TEMPLATE``
  (``Solve the following math problem efficiently and clearly. ... \\boxed{ANSWER} ...``), the one
  its AIME tasks use and the one open-r1 reported MATH-500 with (lighteval <= 0.10). R1-style
  models are trained to box answers, which is what the verifier reads.
- gpqa_diamond: lighteval's ``gpqa_instruct_prompt`` (``Answer: $LETTER``).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from distilled.prompts import render_prompt

PROMPT_VERSION = "distilled-eval-v1 (lighteval 0.13.0 aime MATH_PROMPT_TEMPLATE / gpqa_instruct_prompt)"

MATH_PROMPT_TEMPLATE = (
    "\nSolve the following math problem efficiently and clearly.  The last line of your response should be "
    "of the following format: 'Therefore, the final answer is: $\\boxed{{ANSWER}}$. I hope it is correct' "
    "(without quotes) where ANSWER is just the final number or expression that solves the problem. "
    "Think step by step before answering.\n\n{prompt}\n"
)

GPQA_INSTRUCTION = (
    "Answer the following multiple choice question. The last line of your response should be of the "
    "following format: 'Answer: $LETTER' (without quotes) where LETTER is one of ABCD. "
    "Think step by step before answering."
)
GPQA_TEMPLATE = "{Instruction}\n\n{Question}\n\nA) {A}\nB) {B}\nC) {C}\nD) {D}"
GPQA_COLUMNS = ("Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")


SCORING_RULE = ("evaluation: the text after the last </think> is judged whatever the finish_reason; an unclosed "
                "<think> (or no answer text) scores 0")
"""The one scoring rule of ``distill eval`` and ``distilled/eval/lighteval_tasks.py`` (recorded in
results.json). It is lighteval's and open-r1's: a sample cut by the token limit *after* its
reasoning closed is scored on the answer it wrote. ``distill reject`` is stricter on purpose (a
truncated generation is never training data); evaluation is not filtering."""


def answer_to_score(text: str) -> str | None:
    """The answer text :data:`SCORING_RULE` judges, or None when the sample scores 0 unjudged.

    Why one function: ``distill eval`` (main env, math-verify) and the lighteval task file
    (.venv-eval, lighteval's math-verify port) must pick the same text, or "the same scoring under
    lighteval" is false. ``finish_reason`` is deliberately not an argument.
    """
    from distilled.verify import split_reasoning

    _, answer, complete = split_reasoning(text)
    return answer if complete else None


class TaskError(ValueError):
    """Bad task name or task data; the message names the file, row and field."""


@dataclass(frozen=True)
class TaskSpec:
    """Where a benchmark lives and how to read it."""

    name: str
    kind: str  # "math" | "choice"
    local_names: tuple[str, ...]  # file stems tried in --data-dir
    hub: tuple[str, str | None, str] | None  # (repo, config, split)
    default_n: int
    problem_field: str = "problem"
    answer_field: str = "answer"


TASKS: dict[str, TaskSpec] = {
    "math_500": TaskSpec("math_500", "math", ("math500", "math_500", "MATH-500"),
                         ("HuggingFaceH4/MATH-500", None, "test"), 4),
    "aime24": TaskSpec("aime24", "math", ("aime24", "aime_2024"), ("HuggingFaceH4/aime_2024", None, "train"), 64),
    "aime25": TaskSpec("aime25", "math", ("aime25", "aime_2025"), ("yentinglin/aime_2025", None, "train"), 64),
    "gpqa_diamond": TaskSpec("gpqa_diamond", "choice", ("gpqa_diamond", "gpqa"),
                             ("Idavidrein/gpqa", "gpqa_diamond", "train"), 8,
                             problem_field="Question", answer_field="Correct Answer"),
    "synth": TaskSpec("synth", "math", ("synth", "synth_test", "test"), None, 4),
}


@dataclass
class Problem:
    """One benchmark problem, ready to prompt and to score."""

    task: str
    index: int  # 0-based row in the source
    id: str
    kind: str
    user_prompt: str
    gold: str  # a LaTeX answer (math) or a letter (choice)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Task:
    """A loaded task: its problems, where they came from, and the default sample count."""

    name: str
    kind: str
    source: str
    problems: list[Problem]
    default_n: int


def parse_task_names(spec: str | list[str]) -> list[str]:
    """Split ``--tasks`` (comma separated, repeatable); unknown names fail here, before any work.

    ``jsonl:PATH`` (or ``parquet:PATH``) names a user file of ``problem``/``answer`` rows.
    """
    items = spec if isinstance(spec, list) else [spec]
    names: list[str] = []
    for item in items:
        for name in str(item).split(","):
            name = name.strip()
            if not name:
                continue
            if name.startswith(("jsonl:", "parquet:", "file:")):
                names.append(name)
                continue
            if name not in TASKS:
                raise TaskError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}, or jsonl:PATH")
            names.append(name)
    if not names:
        raise TaskError("--tasks is empty")
    if len(set(names)) != len(names):
        raise TaskError(f"--tasks lists a task twice: {names}")
    return names


def task_label(name: str) -> str:
    """Short name used in tables and samples.jsonl (``jsonl:dir/test.jsonl`` -> ``test``)."""
    if ":" in name:
        return Path(name.split(":", 1)[1]).stem
    return name


def _read_rows(path: Path) -> list[tuple[int, dict | str]]:
    """(1-based line or row number, row) from JSONL/JSON/parquet/CSV through the one row reader
    (``io_utils.read_rows``); a bad record becomes its ``FILE:N: message`` text."""
    from distilled.io_utils import BadRecord, read_rows

    if path.suffix not in (".jsonl", ".parquet", ".json", ".csv"):
        raise TaskError(f"{path}: unsupported file type {path.suffix!r} (use .jsonl, .parquet, .json or .csv)")
    return [(n, str(r) if isinstance(r, BadRecord) else r) for n, r in read_rows(path)]


def _find_local(spec: TaskSpec, data_dir: Path) -> Path | None:
    for stem in spec.local_names:
        for ext in (".jsonl", ".parquet", ".json", ".csv"):
            p = data_dir / f"{stem}{ext}"
            if p.exists():
                return p
    return None


def _gpqa_seed(seed: int, problem_id: str) -> int:
    digest = hashlib.sha256(f"gpqa:{seed}:{problem_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def gpqa_shuffle(row: dict, seed: int, problem_id: str) -> tuple[list[str], int]:
    """Choices A-D and the gold index, as lighteval builds them (incorrect answers in order, the
    correct one inserted at a random position), but drawn from a per-problem seeded RNG.

    Why per problem: the permutation of a problem does not depend on which other problems were
    loaded (``--limit``) or on the order, so a resumed or partial run sees the same prompt.
    """
    rng = random.Random(_gpqa_seed(seed, problem_id))
    gold_index = rng.randint(0, 3)
    choices = [str(row["Incorrect Answer 1"]).strip(), str(row["Incorrect Answer 2"]).strip(),
               str(row["Incorrect Answer 3"]).strip()]
    choices.insert(gold_index, str(row["Correct Answer"]).strip())
    return choices, gold_index


def math_prompt(problem: str, template: str | None = None) -> str:
    """The pinned math prompt (see module docstring), or ``template`` (``--prompt-template``,
    rendered by :func:`distilled.prompts.render_prompt`, the very function ``distill generate``
    uses) to evaluate a model on the prompt format it was trained with."""
    return render_prompt(template or MATH_PROMPT_TEMPLATE, problem)


def gpqa_prompt(question: str, choices: list[str]) -> str:
    """The pinned GPQA prompt with choices A-D."""
    return GPQA_TEMPLATE.format(Instruction=GPQA_INSTRUCTION, Question=question.strip(),
                                A=choices[0], B=choices[1], C=choices[2], D=choices[3])


def row_id(row: dict, index: int | None, label: str) -> str:
    """A problem's id: its ``id``/``unique_id``/``Record ID`` column, else ``label/index``.

    GPQA rows without an id column get ``gpqa/<sha1 of the question>`` instead of the index, so
    the lighteval task file (whose prompt function never sees the row index) derives the same id
    and therefore the same seeded answer shuffle.
    """
    for key in ("id", "unique_id", "Record ID", "ID", "problem_id"):
        v = row.get(key)
        if v is not None and str(v).strip():
            return str(v)
    if "Correct Answer" in row:
        return "gpqa/" + hashlib.sha1(str(row.get("Question", "")).strip().encode()).hexdigest()[:12]
    return f"{label}/{index}"


def build_problems(label: str, kind: str, rows: list[tuple[int, dict | str]], source: str,
                   seed: int, problem_field: str = "problem", answer_field: str = "answer",
                   math_template: str | None = None) -> list[Problem]:
    """Turn rows into problems; every missing or empty field is an error naming file, row, field."""
    problems: list[Problem] = []
    errors: list[str] = []
    for index, (line, row) in enumerate(rows):
        where = f"{source}:{line}"
        if isinstance(row, str):
            errors.append(row)
            continue
        if kind == "choice":
            missing = [c for c in GPQA_COLUMNS if row.get(c) is None or not str(row.get(c)).strip()]
            if missing:
                errors.append(f"{where}: missing or empty field(s) {missing} (GPQA columns: {list(GPQA_COLUMNS)})")
                continue
            pid = row_id(row, index, label)
            choices, gold_index = gpqa_shuffle(row, seed, pid)
            problems.append(Problem(label, index, pid, kind, gpqa_prompt(str(row["Question"]), choices),
                                    "ABCD"[gold_index], {"choices": choices, "gold_index": gold_index}))
            continue
        prob, ans = row.get(problem_field), row.get(answer_field)
        if not isinstance(prob, str) or not prob.strip():
            errors.append(f"{where}: field {problem_field!r} is missing or not a non-empty string "
                          f"(got {type(prob).__name__})")
            continue
        if ans is None or (isinstance(ans, str) and not ans.strip()) or isinstance(ans, (dict, list)):
            errors.append(f"{where}: field {answer_field!r} is missing or empty (got {type(ans).__name__})")
            continue
        problems.append(Problem(label, index, row_id(row, index, label), kind, math_prompt(prob, math_template), str(ans).strip()))
    if errors:
        more = f" (and {len(errors) - 10} more)" if len(errors) > 10 else ""
        raise TaskError(f"{len(errors)} bad row(s) in task {label}:\n  " + "\n  ".join(errors[:10]) + more)
    ids = [p.id for p in problems]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise TaskError(f"{source}: duplicate problem ids {dup}; ids must be unique for resume")
    return problems


def load_task(name: str, data_dir: str | Path | None = None, task_file: str | Path | None = None,
              seed: int = 0, limit: int | None = None,
              hub_loader: Callable[[str, str | None, str], Any] | None = None,
              math_template: str | None = None) -> Task:
    """Load one task: ``jsonl:PATH``; else ``--task-file`` (synth); else ``--data-dir``; else the hub.

    Fails with :class:`TaskError` on an empty dataset or a bad row, so nothing is generated for a
    run that cannot be scored.
    """
    label = task_label(name)
    if ":" in name:
        path = Path(name.split(":", 1)[1])
        if not path.exists():
            raise TaskError(f"task {name}: file {path} does not exist")
        spec = TaskSpec(label, "math", (), None, 4)
    else:
        spec = TASKS[name]
        path = None
        if name == "synth" and task_file is not None:
            path = Path(task_file)
            if not path.exists():
                raise TaskError(f"--task-file {path} does not exist")
        elif data_dir is not None:
            path = _find_local(spec, Path(data_dir))
            if path is None and spec.hub is None:
                raise TaskError(f"task {name}: none of {[s + '.jsonl' for s in spec.local_names]} in {data_dir}")
        elif spec.hub is None:
            raise TaskError(f"task {name} needs --task-file FILE or --data-dir DIR (it has no hub dataset)")
    if path is not None:
        rows = _read_rows(path)
        source = str(path)
    else:
        assert spec.hub is not None
        repo, config, split = spec.hub
        if data_dir is not None:
            raise TaskError(f"task {name}: no {spec.local_names[0]}.jsonl (or .parquet) in --data-dir {data_dir}")
        loader = hub_loader or _hub_load
        try:
            ds = loader(repo, config, split)
        except Exception as exc:  # offline, gated, renamed: say what to do instead
            raise TaskError(f"task {name}: could not load hub dataset {repo} ({config or 'default'}/{split}): "
                            f"{type(exc).__name__}: {exc}. Offline? Pass --data-dir with {spec.local_names[0]}.jsonl") from None
        rows = [(i + 1, dict(r)) for i, r in enumerate(ds)]
        source = f"hf://{repo}/{config or 'default'}/{split}"
    if not rows:
        raise TaskError(f"task {label}: dataset {source} is empty")
    if limit is not None:
        rows = rows[:limit]
    problems = build_problems(label, spec.kind, rows, source, seed, spec.problem_field, spec.answer_field,
                              math_template)
    if not problems:
        raise TaskError(f"task {label}: dataset {source} has no usable problems")
    return Task(label, spec.kind, source, problems, spec.default_n)


def _hub_load(repo: str, config: str | None, split: str):
    import datasets

    return datasets.load_dataset(repo, config, split=split)
