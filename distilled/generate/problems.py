"""Synthetic arithmetic/algebra word problems, and the solver the stand-in teacher uses.

Why this exists: the pipeline must run end to end offline (tests, benchmarks, the demo) with a
teacher whose answers can be checked. ``distill problems synth`` writes short, formulaic problems
with exact LaTeX answers; :func:`parse_problem` / :func:`solve` read the *same* templates back, so
the stand-in teacher (:mod:`distilled.generate.teacher_server`) can produce step-by-step R1-style solutions.
The generator and the parser live in this one module so they cannot drift apart (a test checks
that every generated problem parses back to its own answer).

Kinds (``kind`` column):

- ``arithmetic``: multi-step shopping/counting story, integer answer;
- ``linear``: ``Solve for x: a x + b = c``, answer an integer or a (possibly negative) fraction;
- ``fraction``: ``\\frac{a}{b} + \\frac{c}{d}`` (or ``-``), answer reduced;
- ``percent``: ``p% of n`` or a discounted price, answer an integer or a fraction.

Answers are LaTeX strings: ``12``, ``-7``, ``\\frac{3}{4}``, ``-\\frac{5}{2}``.

Train and test problems are disjoint by construction: a problem goes to the held-out pool iff a
hash of its text falls in the test bucket, so the test set depends only on ``(seed, test_n)`` and
the train set only on ``(seed, n)``, and no text can appear in both.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import re
import sys
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterator

from distilled.settings import add_arguments, from_args, option

KINDS = ("arithmetic", "linear", "fraction", "percent")

_NAMES = ("Ava", "Ben", "Chen", "Dana", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jia", "Kofi", "Lena",
          "Mateo", "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tara", "Uma", "Viktor", "Wen", "Yusuf")
_ITEMS = ("apple", "marble", "pencil", "sticker", "cookie", "book", "card", "shell", "coin", "stamp")

# --- templates (generator) and their regexes (parser): keep each pair together -----------------
_T_ARITH = ("{name} has {a} {item}s. {name} buys {b} boxes with {c} {item}s in each box, then gives away "
            "{d} {item}s. How many {item}s does {name} have now?")
_R_ARITH = re.compile(r"(?P<name>[A-Z][a-z]+) has (?P<a>\d+) (?P<item>[a-z]+)s\. (?P=name) buys (?P<b>\d+) boxes "
                      r"with (?P<c>\d+) (?P=item)s in each box, then gives away (?P<d>\d+) (?P=item)s\. "
                      r"How many (?P=item)s does (?P=name) have now\?")
_T_SHARE = ("{name} has {a} {item}s and finds {b} more. {name} shares them equally among {k} friends. "
            "How many {item}s does each friend get?")
_R_SHARE = re.compile(r"(?P<name>[A-Z][a-z]+) has (?P<a>\d+) (?P<item>[a-z]+)s and finds (?P<b>\d+) more\. "
                      r"(?P=name) shares them equally among (?P<k>\d+) friends\. "
                      r"How many (?P=item)s does each friend get\?")
_T_LINEAR = "Solve for $x$: ${lhs} = {c}$."
_R_LINEAR = re.compile(r"Solve for \$x\$: \$(?P<a>-?\d*)x(?: (?P<op>[+-]) (?P<b>\d+))? = (?P<c>-?\d+)\$\.")
_T_FRAC = r"Compute $\frac{{{a}}}{{{b}}} {op} \frac{{{c}}}{{{d}}}$. Give the answer as a reduced fraction."
_R_FRAC = re.compile(r"Compute \$\\frac\{(?P<a>\d+)\}\{(?P<b>\d+)\} (?P<op>[+-]) \\frac\{(?P<c>\d+)\}\{(?P<d>\d+)\}\$\.")
_T_PCT = "What is {p}% of {n}?"
_R_PCT = re.compile(r"What is (?P<p>\d+)% of (?P<n>\d+)\?")
_T_DISC = "A jacket costs {n} dollars and is on sale for {p}% off. What is the sale price in dollars?"
_R_DISC = re.compile(r"A jacket costs (?P<n>\d+) dollars and is on sale for (?P<p>\d+)% off\. "
                     r"What is the sale price in dollars\?")


def latex_number(x: Fraction | int) -> str:
    """Render an exact rational as the LaTeX answer string (``7``, ``-\\frac{3}{4}``)."""
    x = Fraction(x)
    if x.denominator == 1:
        return str(x.numerator)
    sign = "-" if x < 0 else ""
    return f"{sign}\\frac{{{abs(x.numerator)}}}{{{x.denominator}}}"


@dataclass(frozen=True)
class Parsed:
    """A problem recognised in free text: its kind, the template name and the numbers in it."""

    kind: str
    template: str
    values: dict


@dataclass(frozen=True)
class Solution:
    """Step-by-step reasoning lines and the exact answer (``answer`` is LaTeX)."""

    steps: list[str]
    value: Fraction
    answer: str


def parse_problem(text: str) -> Parsed | None:
    """Find a synth problem anywhere in ``text`` (a prompt template may surround it).

    >>> parse_problem("Please reason step by step. What is 20% of 45?").values
    {'p': 20, 'n': 45}
    """
    m = _R_ARITH.search(text)
    if m:
        v = {k: int(m[k]) for k in "abcd"}
        return Parsed("arithmetic", "arith", {**v, "name": m["name"], "item": m["item"]})
    m = _R_SHARE.search(text)
    if m:
        v = {k: int(m[k]) for k in "abk"}
        return Parsed("arithmetic", "share", {**v, "name": m["name"], "item": m["item"]})
    m = _R_LINEAR.search(text)
    if m:
        a_txt = m["a"]
        a = 1 if a_txt == "" else -1 if a_txt == "-" else int(a_txt)
        b = int(m["b"] or 0) * (-1 if m["op"] == "-" else 1)
        return Parsed("linear", "linear", {"a": a, "b": b, "c": int(m["c"])})
    m = _R_FRAC.search(text)
    if m:
        return Parsed("fraction", "frac", {"a": int(m["a"]), "b": int(m["b"]), "c": int(m["c"]),
                                           "d": int(m["d"]), "op": m["op"]})
    m = _R_DISC.search(text)
    if m:
        return Parsed("percent", "discount", {"p": int(m["p"]), "n": int(m["n"])})
    m = _R_PCT.search(text)
    if m:
        return Parsed("percent", "percent", {"p": int(m["p"]), "n": int(m["n"])})
    return None


def solve(p: Parsed) -> Solution:
    """Solve a parsed problem exactly, with the short reasoning steps a teacher would write."""
    v = p.values
    if p.template == "arith":
        bought = v["b"] * v["c"]
        total = v["a"] + bought
        ans = Fraction(total - v["d"])
        steps = [f"{v['name']} starts with {v['a']} {v['item']}s.",
                 f"{v['b']} boxes with {v['c']} each is {v['b']} \\times {v['c']} = {bought}.",
                 f"After buying: {v['a']} + {bought} = {total}.",
                 f"After giving away {v['d']}: {total} - {v['d']} = {latex_number(ans)}."]
    elif p.template == "share":
        total = v["a"] + v["b"]
        ans = Fraction(total, v["k"])
        steps = [f"Total {v['item']}s: {v['a']} + {v['b']} = {total}.",
                 f"Shared among {v['k']} friends: {total} \\div {v['k']} = {latex_number(ans)}."]
    elif p.template == "linear":
        a, b, c = v["a"], v["b"], v["c"]
        rhs = c - b
        ans = Fraction(rhs, a)
        steps = []
        if b:
            verb = f"Subtract {b}" if b > 0 else f"Add {-b}"
            steps.append(f"{verb} on both sides: {a}x = {c} {'-' if b > 0 else '+'} {abs(b)} = {rhs}.")
        steps.append(f"Divide both sides by {a}: x = \\frac{{{rhs}}}{{{a}}} = {latex_number(ans)}.")
        steps.append(f"Check: {a} \\cdot {latex_number(ans)} + {b} = {c}.")
    elif p.template == "frac":
        x, y = Fraction(v["a"], v["b"]), Fraction(v["c"], v["d"])
        den = v["b"] * v["d"]
        num1, num2 = v["a"] * v["d"], v["c"] * v["b"]
        ans = x + y if v["op"] == "+" else x - y
        raw = num1 + num2 if v["op"] == "+" else num1 - num2
        steps = [f"Common denominator {v['b']} \\times {v['d']} = {den}.",
                 f"\\frac{{{v['a']}}}{{{v['b']}}} = \\frac{{{num1}}}{{{den}}} and "
                 f"\\frac{{{v['c']}}}{{{v['d']}}} = \\frac{{{num2}}}{{{den}}}.",
                 f"{num1} {v['op']} {num2} = {raw}, so the result is \\frac{{{raw}}}{{{den}}}.",
                 f"Reduced: {latex_number(ans)}."]
    elif p.template == "percent":
        ans = Fraction(v["p"] * v["n"], 100)
        steps = [f"{v['p']}\\% of {v['n']} is \\frac{{{v['p']}}}{{100}} \\times {v['n']}.",
                 f"{v['p']} \\times {v['n']} = {v['p'] * v['n']}, divided by 100 is {latex_number(ans)}."]
    elif p.template == "discount":
        off = Fraction(v["p"] * v["n"], 100)
        ans = v["n"] - off
        steps = [f"The discount is {v['p']}\\% of {v['n']} = {latex_number(off)}.",
                 f"Sale price: {v['n']} - {latex_number(off)} = {latex_number(ans)}."]
    else:  # pragma: no cover - parse_problem only returns the templates above
        raise ValueError(f"unknown template {p.template!r}")
    return Solution(steps, ans, latex_number(ans))


def _render(rng: random.Random, kind: str) -> str:
    if kind == "arithmetic":
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        if rng.random() < 0.6:
            a, b, c = rng.randint(3, 60), rng.randint(2, 9), rng.randint(2, 12)
            d = rng.randint(1, a + b * c - 1)
            return _T_ARITH.format(name=name, item=item, a=a, b=b, c=c, d=d)
        k = rng.randint(2, 9)
        total = k * rng.randint(2, 15)
        a = rng.randint(1, total - 1)
        return _T_SHARE.format(name=name, item=item, a=a, b=total - a, k=k)
    if kind == "linear":
        a = rng.choice([x for x in range(-9, 10) if x not in (0,)])
        b = rng.randint(-30, 30)
        c = rng.randint(-40, 60)
        lhs = ("" if a == 1 else "-" if a == -1 else str(a)) + "x"
        if b:
            lhs += f" {'+' if b > 0 else '-'} {abs(b)}"
        return _T_LINEAR.format(lhs=lhs, c=c)
    if kind == "fraction":
        b, d = rng.randint(2, 12), rng.randint(2, 12)
        a, c = rng.randint(1, b - 1), rng.randint(1, d - 1)
        return _T_FRAC.format(a=a, b=b, c=c, d=d, op=rng.choice("+-"))
    if kind == "percent":
        p = rng.choice([5, 10, 12, 15, 20, 25, 30, 35, 40, 45, 50, 60, 75, 80, 90])
        n = rng.randint(2, 80) * rng.choice([1, 2, 4, 5, 10])
        return (_T_PCT if rng.random() < 0.5 else _T_DISC).format(p=p, n=n)
    raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")


def _is_test_text(text: str) -> bool:
    """Hash bucket deciding train vs held-out test: 1 in 8 problem texts is test-only."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=4).digest()[0] % 8 == 0


def _stream(seed: int, split: str, kinds: tuple[str, ...]) -> Iterator[dict]:
    rng = random.Random(f"distilled-problems:{seed}:{split}")
    seen: set[str] = set()
    i = 0
    misses = 0
    while True:
        kind = rng.choice(kinds)
        text = _render(rng, kind)
        if (split == "test") != _is_test_text(text) or text in seen:
            misses += 1
            if misses > 200_000:
                raise RuntimeError(f"problem space exhausted for split {split!r} (seed {seed}); ask for fewer")
            continue
        misses = 0
        seen.add(text)
        answer = solve(parse_problem(text)).answer  # type: ignore[arg-type]
        yield {"id": f"synth-s{seed}-{split}-{i:06d}", "problem": text, "answer": answer, "kind": kind}
        i += 1


def synth(n: int, seed: int = 0, split: str = "train", kinds: tuple[str, ...] = KINDS) -> list[dict]:
    """Return ``n`` distinct problems for ``split`` ("train" or "test"), deterministic per seed.

    >>> rows = synth(2, seed=0)
    >>> sorted(rows[0])
    ['answer', 'id', 'kind', 'problem']
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    out = []
    for row in _stream(seed, split, tuple(kinds)):
        if len(out) >= n:
            break
        out.append(row)
    return out


def _write(path: str, rows: list[dict]) -> None:
    import json

    from distilled.io_utils import atomic_write

    with atomic_write(path) as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


@dataclass
class SynthOptions:
    """Options of ``distill problems synth``; each field is one CLI flag (declared here only)."""

    n: int = option(help="number of train problems")
    output: str = option(help="train JSONL path")
    seed: int = option(0, help="random seed (same seed, same files)")
    test_output: str | None = option(None, help="held-out test JSONL path")
    test_n: int = option(100, help="number of held-out test problems (default 100)")
    kinds: str = option(",".join(KINDS), help=f"comma list of kinds (default {','.join(KINDS)})")


def cmd_synth(args: argparse.Namespace) -> int:
    """``distill problems synth``: write train (and optionally held-out test) problems atomically."""
    o = from_args(SynthOptions, args)
    kinds = tuple(k.strip() for k in o.kinds.split(",") if k.strip())
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        print(f"error: --kinds: unknown kind(s) {', '.join(bad)}; choose from {', '.join(KINDS)}", file=sys.stderr)
        return 2
    train = synth(o.n, o.seed, "train", kinds)
    _write(o.output, train)
    msg = f"wrote {len(train)} train problems to {o.output}"
    if o.test_output:
        test = synth(o.test_n, o.seed, "test", kinds)
        _write(o.test_output, test)
        msg += f" and {len(test)} held-out test problems to {o.test_output}"
    counts = {k: sum(r["kind"] == k for r in train) for k in kinds}
    print(msg + " (" + ", ".join(f"{k} {v}" for k, v in counts.items()) + f"; seed {o.seed})")
    return 0


def register_cli(sub: argparse._SubParsersAction) -> None:
    """Add ``distill problems synth``."""
    p = sub.add_parser("problems", help="synthetic problem sets (offline demo and tests)")
    psub = p.add_subparsers(dest="problems_command", metavar="SUBCOMMAND")
    s = psub.add_parser("synth", help="write arithmetic/algebra word problems with exact LaTeX answers",
                        description="Write deterministic arithmetic/algebra word problems (JSONL: id, problem, "
                                    "answer, kind). Held-out test problems never share text with train ones.")
    add_arguments(s, SynthOptions)
    s.set_defaults(func=cmd_synth)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])
