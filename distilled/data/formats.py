"""Input formats -> chat messages (validated, one reason code per bad row).

Every supported row shape (OpenR1-Math ``generations``, ``messages``, Bespoke-Stratos
``system`` + ``conversations``, Magpie ``instruction``/``response``, plain CoT) becomes one
``[system?, user, assistant]`` list here, with a reason code for each row that cannot; the
Mixture-of-Thoughts domain filter lives here too. Tokenizing and masking those messages, and
checking the result against ``apply_chat_template``, is :mod:`distilled.data.chat`.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from distilled import SYSTEM_PROMPT
from distilled.settings import option

FORMATS = ("openr1", "cot", "messages", "stratos", "magpie")
GENERATION_POLICIES = ("first_correct", "shortest_correct", "all_correct")
THINK_STYLES = ("keep", "r1")
ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100


class RowError(ValueError):
    """A row that cannot be used: ``reason`` is the skip-counter key, ``field`` the column/path."""

    def __init__(self, reason: str, field: str, detail: str):
        super().__init__(f"{field}: {detail}")
        self.reason = reason
        self.field = field
        self.detail = detail


class DataError(ValueError):
    """Raised in strict mode: names the file, row (1-based line for JSONL) and field."""


@dataclass
class FormatConfig:
    """How rows become conversations.

    ``system_prompt``: prepended as a system turn when a conversation has none. ``None`` or
    ``""`` disables it (the chat template may then insert its own default, as Qwen2.5's does).
    """

    # Each option() field is also a `distill preprocess` flag (distilled.settings). `name` is not:
    # the CLI's --format is required, while Python callers get "cot" by default.
    name: str = "cot"
    system_prompt: str | None = option(SYSTEM_PROMPT, help="system turn added when a row has none")
    generation_policy: str | None = option(None, choices=GENERATION_POLICIES,
                                           help="openr1: build the answer from `generations` instead of `messages`")
    think_style: str = option("keep", choices=THINK_STYLES,
                              help="stratos: keep <|begin_of_thought|> markers, or convert to <think> (r1)")
    messages_column: str = option("messages", help="column holding the conversation")
    # Mixture-of-Thoughts-style domain column: keep only rows whose ``domain_column`` value is a key
    # of ``domains``, each kept with its fraction (1.0 = all). ``None`` keeps every row.
    domain_column: str = option("source", help="column naming each row's domain (default source)")
    domains: dict[str, float] | None = option(
        None, metavar="D[=FRAC],...",
        help="keep only rows whose --domain-column value is listed, each at FRAC (default 1), "
             "e.g. Mixture-of-Thoughts 'math,science,code=0.5'; dropped rows are counted")

    def __post_init__(self) -> None:
        self.domains = parse_domains(self.domains)
        if self.name not in FORMATS:
            raise ValueError(f"unknown format {self.name!r}; choose one of {', '.join(FORMATS)}")
        if self.generation_policy in ("", "messages", "none"):
            self.generation_policy = None
        if self.generation_policy is not None and self.generation_policy not in GENERATION_POLICIES:
            raise ValueError(f"unknown generation_policy {self.generation_policy!r}; choose one of "
                             f"{', '.join(GENERATION_POLICIES)}")
        if self.think_style not in THINK_STYLES:
            raise ValueError(f"unknown think_style {self.think_style!r}; choose one of {', '.join(THINK_STYLES)}")


def parse_domains(spec: Any) -> dict[str, float] | None:
    """``"math,code=0.5"`` / ``["math", "code"]`` / ``{"math": 1.0}`` -> ``{value: fraction}``.

    Why fractions: mixing domains (e.g. half of Mixture-of-Thoughts' code rows with all of its math)
    must be reproducible across shards and reruns, so a row is kept when a hash of its content falls
    below its domain's fraction (:func:`domain_keeps`), never by a random draw.
    """
    if spec is None or spec == "" or spec == {}:
        return None
    if isinstance(spec, str):
        spec = [p for p in spec.split(",") if p.strip()]
    if isinstance(spec, (list, tuple)):
        out: dict[str, float] = {}
        for part in spec:
            name, _, frac = str(part).partition("=")
            out[name.strip()] = float(frac) if frac.strip() else 1.0
        spec = out
    if not isinstance(spec, dict):
        raise ValueError(f"domains: expected 'a,b=0.5', a list or a mapping, got {_type_name(spec)}")
    out = {str(k): float(v) for k, v in spec.items()}
    bad = {k: v for k, v in out.items() if not 0.0 < v <= 1.0}
    if bad:
        raise ValueError(f"domains: fractions must be in (0, 1], got {bad}")
    return out


def domain_keeps(row: dict, cfg: "FormatConfig") -> None:
    """Raise :class:`RowError` (``domain_filtered``/``domain_subsampled``) for a row the domain
    selection drops; a no-op without ``cfg.domains``."""
    if not cfg.domains:
        return
    value = row.get(cfg.domain_column)
    if value not in cfg.domains:
        raise RowError("domain_filtered", cfg.domain_column,
                       f"{value!r} is not one of the selected domains {sorted(cfg.domains)}")
    frac = cfg.domains[value]
    if frac < 1.0:
        import hashlib
        import json

        key = json.dumps(row.get(cfg.messages_column) if cfg.messages_column in row else row, sort_keys=True,
                         default=str, ensure_ascii=False)
        u = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64
        if u >= frac:
            raise RowError("domain_subsampled", cfg.domain_column, f"{value!r} kept at fraction {frac:g}")


FILTER_REASONS = frozenset({"domain_filtered", "domain_subsampled"})
"""Skip reasons that are a selection, not bad data: ``strict`` never stops on them."""


# ----------------------------------------------------------------------------- row -> messages

def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _need_str(row: dict, col: str) -> str:
    if row.get(col) is None:  # Arrow-backed inputs turn a missing field into null
        raise RowError("missing_column", col, "column is missing or null")
    v = row[col]
    if not isinstance(v, str):
        raise RowError("bad_type", col, f"expected a string, got {_type_name(v)}")
    if not v.strip():
        raise RowError("empty_content", col, "empty string")
    return v


def _need_list(row: dict, col: str) -> list:
    if row.get(col) is None:
        raise RowError("missing_column", col, "column is missing or null")
    v = row[col]
    if isinstance(v, np.ndarray):  # parquet/pandas may hand over arrays
        v = v.tolist()
    if not isinstance(v, (list, tuple)):
        raise RowError("bad_type", col, f"expected a list, got {_type_name(v)}")
    return list(v)


def validate_messages(msgs: Any, field: str = "messages") -> list[dict[str, str]]:
    """Check a messages list and return clean ``{role, content}`` dicts.

    Why strict: an empty or non-string turn renders as ``None``/``""`` through the template and
    trains the model on garbage; a conversation without an assistant turn trains nothing.
    """
    if isinstance(msgs, np.ndarray):
        msgs = msgs.tolist()
    if not isinstance(msgs, (list, tuple)):
        raise RowError("bad_type", field, f"expected a list of {{role, content}}, got {_type_name(msgs)}")
    if not msgs:
        raise RowError("no_assistant_turn", field, "empty conversation")
    out = []
    for i, m in enumerate(msgs):
        f = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise RowError("bad_type", f, f"expected an object {{role, content}}, got {_type_name(m)}")
        role = m.get("role")
        if role not in ROLES:
            raise RowError("bad_role", f"{f}.role", f"expected one of {', '.join(ROLES)}, got {role!r}")
        if "content" not in m:
            raise RowError("missing_column", f"{f}.content", "field is missing")
        content = m["content"]
        if not isinstance(content, str):
            raise RowError("non_string_content", f"{f}.content", f"expected a string, got {_type_name(content)}")
        if not content.strip():
            raise RowError("empty_content", f"{f}.content", "empty message")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise RowError("no_assistant_turn", field, "no assistant turn to train on")
    return out


def _with_system(msgs: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    from distilled.prompts import with_system  # one [system?, user] rule for generate, train and eval

    return with_system(msgs, system_prompt)


def _openr1_from_generations(row: dict, policy: str) -> list[list[dict[str, str]]]:
    problem = _need_str(row, "problem")
    gens = _need_list(row, "generations")
    correct = _need_list(row, "correctness_math_verify")
    complete = _need_list(row, "is_reasoning_complete")
    for name, col in (("correctness_math_verify", correct), ("is_reasoning_complete", complete)):
        if len(col) != len(gens):
            raise RowError("length_mismatch", name, f"{len(col)} entries for {len(gens)} generations")
    ok = [i for i, (g, c, d) in enumerate(zip(gens, correct, complete))
          if c is True and d is True and isinstance(g, str) and g.strip()]
    if not ok:
        raise RowError("no_correct_generation", "correctness_math_verify",
                       "no generation is both math-verify correct and complete")
    if policy == "first_correct":
        ok = ok[:1]
    elif policy == "shortest_correct":
        ok = [min(ok, key=lambda i: len(gens[i]))]
    return [[{"role": "user", "content": problem}, {"role": "assistant", "content": gens[i]}] for i in ok]


_THOUGHT_RE = re.compile(
    r"^\s*<\|begin_of_thought\|>\s*(?P<think>.*?)\s*<\|end_of_thought\|>\s*"
    r"<\|begin_of_solution\|>\s*(?P<sol>.*?)\s*<\|end_of_solution\|>\s*$", re.S)


def stratos_to_r1(text: str, field: str = "conversations") -> str:
    """``<|begin_of_thought|>T<|end_of_thought|><|begin_of_solution|>S<|end_of_solution|>`` ->
    ``<think>\\nT\\n</think>\\n\\nS`` (the DeepSeek-R1 style the rest of the toolkit uses)."""
    m = _THOUGHT_RE.match(text)
    if not m:
        raise RowError("missing_think_markers", field,
                       "assistant text lacks <|begin_of_thought|>..<|end_of_solution|> markers")
    return f"<think>\n{m.group('think')}\n</think>\n\n{m.group('sol')}"


_SHAREGPT_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
                   "system": "system"}


def _stratos(row: dict, cfg: FormatConfig) -> list[dict[str, str]]:
    conv = _need_list(row, "conversations")
    msgs = []
    for i, turn in enumerate(conv):
        f = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise RowError("bad_type", f, f"expected an object {{from, value}}, got {_type_name(turn)}")
        role = _SHAREGPT_ROLES.get(turn.get("from"))
        if role is None:
            raise RowError("bad_role", f"{f}.from", f"expected user or assistant, got {turn.get('from')!r}")
        msgs.append({"role": role, "content": turn.get("value")})
    msgs = validate_messages(msgs, "conversations")
    if cfg.think_style == "r1":
        msgs = [dict(m, content=stratos_to_r1(m["content"], f"conversations[{i}].value"))
                if m["role"] == "assistant" else m for i, m in enumerate(msgs)]
        return _with_system(msgs, cfg.system_prompt)
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        raise RowError("bad_type", "system", f"expected a string, got {_type_name(system)}")
    if system and system.strip() and msgs[0]["role"] != "system":
        return [{"role": "system", "content": system}] + msgs
    return _with_system(msgs, cfg.system_prompt)


def row_to_conversations(row: dict, cfg: FormatConfig) -> list[list[dict[str, str]]]:
    """One input row -> one or more conversations (``all_correct`` can yield several).

    >>> row_to_conversations({"messages": [{"role": "user", "content": "1+1?"},
    ...                                    {"role": "assistant", "content": "2"}]}, FormatConfig("cot"))[0][0]["role"]
    'system'
    """
    if not isinstance(row, dict):
        raise RowError("bad_type", "row", f"expected an object, got {_type_name(row)}")
    domain_keeps(row, cfg)
    name = cfg.name
    if name == "openr1" and cfg.generation_policy:
        convs = _openr1_from_generations(row, cfg.generation_policy)
    elif name in ("openr1", "cot", "messages"):
        if row.get(cfg.messages_column) is None:  # absent, or null in an Arrow-backed input
            raise RowError("missing_column", cfg.messages_column, "column is missing or null")
        convs = [validate_messages(row[cfg.messages_column], cfg.messages_column)]
    elif name == "magpie":
        convs = [[{"role": "user", "content": _need_str(row, "instruction")},
                  {"role": "assistant", "content": _need_str(row, "response")}]]
    elif name == "stratos":
        return [_stratos(row, cfg)]
    else:  # pragma: no cover - FormatConfig validates the name
        raise ValueError(name)
    return [_with_system(c, cfg.system_prompt) for c in convs]


@dataclass
class SkipCounter:
    """Skips by reason, with the first location of each (for reports and error messages)."""

    counts: Counter = field(default_factory=Counter)
    first: dict[str, str] = field(default_factory=dict)

    def add(self, reason: str, where: str, n: int = 1) -> None:
        self.counts[reason] += n
        self.first.setdefault(reason, where)

    def merge(self, other: "SkipCounter") -> None:
        for k, v in other.counts.items():
            self.add(k, other.first.get(k, ""), v)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict:
        return {"total": self.total, "by_reason": dict(sorted(self.counts.items())),
                "first_seen": dict(sorted(self.first.items()))}


def rows_to_conversations(rows: Sequence[dict], cfg: FormatConfig, skips: SkipCounter,
                          locations: Sequence[str] | None = None, strict: bool = False,
                          check_specials: re.Pattern | None = None,
                          owners: list[int] | None = None) -> list[list[dict[str, str]]]:
    """Convert a batch of rows; bad rows are counted in ``skips`` (or raise :class:`DataError`
    naming ``locations[i]`` and the field when ``strict``).

    ``check_specials``: a regex of special-token strings; a message containing one is skipped
    (``special_token_in_content``) because the tokenizer would turn it into a real control
    token (a literal ``<|im_end|>`` inside an answer would teach the model to stop there).
    ``owners``: if given, receives the batch row index of every returned conversation.
    """
    out: list[list[dict[str, str]]] = []
    for i, row in enumerate(rows):
        where = locations[i] if locations is not None else f"row {i + 1}"
        try:
            convs = row_to_conversations(row, cfg)
            if check_specials is not None:
                for conv in convs:
                    for j, m in enumerate(conv):
                        hit = check_specials.search(m["content"])
                        if hit:
                            raise RowError("special_token_in_content", f"turn {j} ({m['role']}) content",
                                           f"contains the special token {hit.group(0)}")
        except RowError as e:
            if strict and e.reason not in FILTER_REASONS:
                raise DataError(f"{where}: field {e.field!r}: {e.detail} [{e.reason}]") from None
            skips.add(e.reason, f"{where}: {e.field}: {e.detail}")
            continue
        out.extend(convs)
        if owners is not None:
            owners.extend([i] * len(convs))
    return out


def iter_batch_rows(batch: dict[str, list]) -> list[dict]:
    """Column-oriented batch (``datasets`` batched map / ``Dataset.iter``) -> list of row dicts."""
    keys = list(batch)
    if not keys:
        return []
    return [dict(zip(keys, vals)) for vals in zip(*(batch[k] for k in keys))]
