r"""Data for the rejection-sampling tests and bench: a hand-labelled set and a realistic generator.

``LABELLED`` holds R1-style generations with the verdict a careful human gives: keep (True)
only when the reasoning finished (``</think>`` closed, not cut by ``length``) and the final
answer after the reasoning equals the gold answer. It covers what breaks naive verifiers:
nested braces (``\frac{\sqrt{3}}{2}``), ``\dfrac``, tuples, intervals, degrees, ``\text{}``,
``x = 5``, complex numbers, unicode around the answer, boxed answers inside unfinished
reasoning, and ``finish_reason == "length"``.

``docs_reject`` re-implements the MindSpore docs' ``reject_sampling.py`` logic (last ``\boxed\{(.*?)\}`` match over the whole generation, ``verify(pred, gold)``
with gold second, no check that the reasoning finished). It is given the benefit of the doubt
everywhere else (both sides wrapped in ``$...$`` before ``parse``), so the gap it shows comes only
from those three bugs.

``realistic_pairs(n)`` builds ``(generation, gold, finish_reason)`` triples with multi-kB
reasoning and a typical R1 summary after ``</think>``, for throughput measurements.
"""

from __future__ import annotations

import random
import re

THINK = "<think>\n"
END = "\n</think>\n\n"


def _gen(reasoning: str, answer: str, closed: bool = True) -> str:
    if not closed:
        return THINK + reasoning
    return THINK + reasoning + END + answer


_R = ("Okay, let me work through this carefully. First I restate the problem in my own words and "
      "list what is given. Then I try a small case to see the pattern. ")

# (gold, generation, finish_reason, label, what it tests)
LABELLED: list[tuple[str, str, str | None, bool, str]] = [
    (r"\frac{1}{2}", _gen(_R + "The probability is one half.", r"The probability is $\boxed{\frac{1}{2}}$."), "stop", True, "nested braces"),
    (r"\frac{3}{4}", _gen(_R + "So 3 out of 4.", r"Therefore the answer is $\boxed{\dfrac{3}{4}}$."), "stop", True, "dfrac"),
    (r"\sqrt{2}", _gen(_R + "The diagonal of the unit square.", r"The length is $\boxed{\sqrt{2}}$."), "stop", True, "sqrt braces"),
    (r"2\sqrt{3}", _gen(_R + "Height of the triangle doubled.", r"Hence $AB = \boxed{2\sqrt{3}}$."), "stop", True, "coefficient sqrt"),
    (r"\frac{\sqrt{3}}{2}", _gen(_R + "sin of 60 degrees.", r"$$\boxed{\frac{\sqrt{3}}{2}}$$"), "stop", True, "nested frac sqrt"),
    (r"\left( 3, \frac{\pi}{2} \right)", _gen(_R + "Convert to polar.", r"In polar coordinates the point is $\boxed{\left(3, \frac{\pi}{2}\right)}$."), "stop", True, "tuple"),
    (r"(1, 2)", _gen(_R + "Solve the linear system.", r"The solution is $(x, y) = \boxed{(1, 2)}$."), "stop", True, "tuple simple"),
    (r"[2, 5)", _gen(_R + "Combine both inequalities.", r"The solution set is $\boxed{[2, 5)}$."), "stop", True, "interval"),
    (r"(-\infty, 3]", _gen(_R + "The domain needs 3 - x >= 0.", r"Domain: $\boxed{(-\infty, 3]}$"), "stop", True, "interval infinity"),
    (r"30^\circ", _gen(_R + "The angle is thirty degrees.", r"So $\angle ABC = \boxed{30^\circ}$."), "stop", True, "degrees"),
    (r"30", _gen(_R + "Thirty degrees again.", r"The measure of the angle is $\boxed{30^{\circ}}$."), "stop", True, "degrees braces vs bare gold"),
    (r"\text{Evelyn}", _gen(_R + "Compare the slopes of the points.", r"The fastest runner is $\boxed{\text{Evelyn}}$."), "stop", True, "text"),
    (r"5", _gen(_R + "Substitute back.", r"Thus $\boxed{x = 5}$."), "stop", True, "equation x = 5"),
    (r"3", _gen(_R + "k must be 3.", r"The value is $\boxed{k=3}$."), "stop", True, "equation k=3"),
    (r"3+4i", _gen(_R + "Multiply by the conjugate.", r"The result is $\boxed{3 + 4i}$."), "stop", True, "complex"),
    (r"3-4i", _gen(_R + "Careful with the sign of the imaginary part.", r"So $z = \boxed{3 + 4i}$."), "stop", False, "complex wrong sign"),
    (r"12", _gen(_R + "Twelve apples in all.", "所以答案是 $\\boxed{12}$。✅"), "stop", True, "unicode around"),
    (r"\frac{3}{5}", _gen(_R + "Ratio of areas.", "∴ 答案： $\\boxed{\\frac{3}{5}}$ ✓"), "stop", True, "unicode nested"),
    (r"7", _gen(_R + r"So the answer should be \boxed{7}. Hmm, wait, let me double-check the case n = 3, because", "", closed=False), "stop", False, "unfinished think with boxed"),
    (r"7", _gen(_R + r"I get \boxed{7} for now; let me verify by another method. Consider", "", closed=False), "length", False, "length cut with boxed"),
    (r"4", _gen(_R + "Quick check gives 4.", r"The answer is $\boxed{4}$."), "length", False, "finish_reason length"),
    (r"12", _gen(_R + r"First guess \boxed{12}, but recount: I missed two.", r"Final answer: $\boxed{14}$"), "stop", False, "right in reasoning, wrong final"),
    (r"12", _gen(_R + r"First guess \boxed{14}, but I double counted two.", r"Final answer: $\boxed{12}$"), "stop", True, "wrong in reasoning, right final"),
    (r"12", _gen(_R + r"It is \boxed{12} by symmetry.", "I am not able to give a final answer with certainty."), "stop", False, "boxed only inside reasoning"),
    (r"\frac{1}{3}", _gen(_R + "One of two outcomes.", r"The probability is $\boxed{\frac{1}{2}}$."), "stop", False, "wrong fraction"),
    (r"\frac{2}{3}", _gen(_R + "Two of five.", r"Answer: $\boxed{\dfrac{2}{5}}$"), "stop", False, "wrong dfrac"),
    (r"\left( 1, 2 \right)", _gen(_R + "Intersection of the lines.", r"They meet at $\boxed{(1,2)}$."), "stop", True, "left right tuple"),
    (r"1000000", _gen(_R + "A million.", r"There are $\boxed{1,000,000}$ ways."), "stop", True, "thousands separator"),
    (r"\frac{1}{2}", _gen(_R + "Half.", r"The answer is $\boxed{0.5}$."), "stop", True, "decimal vs fraction"),
    (r"\frac{\pi}{2}", _gen(_R + "Quarter turn.", r"$\theta = \boxed{\pi/2}$"), "stop", True, "pi over 2"),
    (r"x^2+2x+1", _gen(_R + "Expand the square.", r"The polynomial is $\boxed{(x+1)^2}$."), "stop", True, "symbolic equality"),
    (r"\{1, 2, 3\}", _gen(_R + "The roots are 1, 2 and 3.", r"The set of roots is $\boxed{\{1,2,3\}}$."), "stop", True, "set braces"),
    (r"\$18.90", _gen(_R + "Add tax.", r"The total cost is $\boxed{\$18.90}$."), "stop", True, "currency"),
    (r"25\%", _gen(_R + "A quarter.", r"The increase is $\boxed{25\%}$."), "stop", True, "percent"),
    (r"10^{10}", _gen(_R + "Ten to the tenth.", r"There are $\boxed{10^{10}}$ strings."), "stop", True, "power braces"),
    (r"-\frac{1}{2}", _gen(_R + "The cosine of 120 degrees.", r"$\cos 120^\circ = \boxed{-\frac{1}{2}}$"), "stop", True, "negative fraction"),
    (r"\text{(B)}", _gen(_R + "Option B matches.", r"$\boxed{\text{(B)}}$"), "stop", True, "text choice"),
    (r"19", _gen(_R + "m = 7 and n = 12.", r"Therefore $m+n = \boxed{19}$."), "stop", True, "plain integer"),
    (r"19", _gen(_R + "m = 7 and n = 11.", r"Therefore $m+n = \boxed{18}$."), "stop", False, "wrong integer"),
    (r"6", _gen(_R + "I could not finish the count.", "I could not determine the number of ways."), "stop", False, "no answer"),
    (r"\frac{9}{4}", _gen(_R + "Vertex of the parabola.", "**Final Answer**\n\\[\n\\boxed{\\dfrac{9}{4}}\n\\]"), "stop", True, "display bracket dfrac"),
    (r"\frac{5}{2}", _gen(_R + "Two and a half.", r"The mean is $\boxed{2.5}$."), "stop", True, "decimal gold fraction"),
    (r"2\pi", _gen(_R + "Circumference of unit circle.", r"$\boxed{2\pi}$"), "stop", True, "2 pi"),
    (r"\frac{1}{4}", _gen(_R + "Quarter.", r"$\boxed{\frac14}$"), "stop", True, "frac without braces"),
    (r"\sqrt{5}", _gen(_R + "Distance formula.", r"The distance is $\boxed{\sqrt{6}}$."), "stop", False, "wrong sqrt"),
    (r"\frac{\sqrt{2}}{2}", _gen(_R + r"It is \boxed{\frac{\sqrt{2}}{2}} I think, but", "", closed=False), "stop", False, "unfinished nested"),
    (r"8", _gen(_R + "Eight vertices on a cube.", r"A cube has $\boxed{8}$ vertices."), None, True, "no finish_reason"),
    (r"(2, -1)", _gen(_R + "Solve for the center.", r"The center is $\boxed{(2,-1)}$."), "stop", True, "tuple negative"),
    (r"(2, -1)", _gen(_R + "Solve for the center.", r"The center is $\boxed{(-1,2)}$."), "stop", False, "tuple swapped"),
    (r"\frac{1}{6}", _gen(_R + "One face of a die.", r"The probability is $\boxed{\frac{1}{6}}$, about 16.7%."), "stop", True, "trailing text after boxed"),
]


def docs_reject(generation: str, gold: str) -> bool:
    r"""The MindSpore docs' ``reject_sampling.py`` verdict (re-implemented, see module docstring)."""
    from math_verify import parse, verify

    matches = re.findall(r"\\boxed\{(.*?)\}", generation)
    if not matches:
        return False
    pred = parse(f"${matches[-1]}$")
    gold_parsed = parse(f"${gold}$")
    return bool(verify(pred, gold_parsed))  # gold second: the docs' argument order


# ---------------------------------------------------------------------------------------------
# Realistic generator for throughput
# ---------------------------------------------------------------------------------------------

_ANSWERS = [  # (gold, [equivalent predictions], [wrong predictions])
    ("{a}", ["{a}"], ["{b}"]),
    (r"\frac{{{a}}}{{{b}}}", [r"\frac{{{a}}}{{{b}}}", r"\dfrac{{{a}}}{{{b}}}"], [r"\frac{{{b}}}{{{a}}}"]),
    (r"{a}\sqrt{{{p}}}", [r"{a}\sqrt{{{p}}}", r"\sqrt{{{p}}}\cdot {a}"], [r"{b}\sqrt{{{p}}}"]),
    (r"\left( {a}, {b} \right)", [r"({a}, {b})", r"\left({a},{b}\right)"], [r"({b}, {a})"]),
    (r"[{a}, {c})", [r"[{a}, {c})"], [r"({a}, {c}]"]),
    (r"{a}^\circ", [r"{a}^\circ", r"{a}^{{\circ}}"], [r"{b}^\circ"]),
    (r"{a}+{b}i", [r"{a} + {b}i"], [r"{a} - {b}i"]),
    (r"\frac{{{a}\pi}}{{{b}}}", [r"\frac{{{a}\pi}}{{{b}}}"], [r"\frac{{{b}\pi}}{{{a}}}"]),
    (r"x^2+{s}x+{q}", [r"x^2 + {s}x + {q}"], [r"x^2 - {s}x + {q}"]),
]

_STEPS = [
    r"Let me denote the unknown by $x$. From the first condition, $x + {a} = {c}$, so $x = {d}$. ",
    r"Wait, that doesn't look right. Let me recompute: ${a} \times {b} = {ab}$, and adding ${c}$ gives ${abc}$. ",
    r"Alternatively, consider the generating function $f(t) = \sum_{{k \ge 0}} \binom{{{a}}}{{k}} t^k = (1+t)^{{{a}}}$. ",
    r"Hmm, maybe I should check small cases. For $n = 1$ we get ${a}$, for $n = 2$ we get ${b}$, and for $n = 3$ we get ${c}$. ",
    r"By the Pythagorean theorem, $\sqrt{{{a}^2 + {b}^2}} = \sqrt{{{sq}}}$. ",
    r"So the ratio is $\frac{{{a}}}{{{b}}}$, which simplifies since $\gcd({a}, {b})$ divides both. ",
    "Let me double-check the arithmetic once more, since it is easy to slip here. ",
    r"Using Vieta's formulas, the sum of the roots is $-\frac{{b}}{{a}}$ and the product is $\frac{{c}}{{a}}$. ",
    "So far so good. Now the second part of the problem asks for something slightly different, so I need to be careful. ",
]

_SUMMARY = [
    r"**Solution.** We set up the equation from the conditions: ${a}x + {b} = {c}$. ",
    r"Solving step by step, we find the intermediate value ${d}$ and check it against the constraints. ",
    r"1. From the first condition, $x = {a}$.\n2. From the second, $y = {b}$.\n3. Combining, $x + y = {ab}$. ",
    "Each case was checked above, so the count is complete. ",
]


def _fill(t: str, rng: random.Random) -> str:
    a, b, c = rng.randint(2, 97), rng.randint(2, 97), rng.randint(2, 97)
    return t.format(a=a, b=b, c=c, d=c - a, ab=a * b, abc=a * b + c, sq=a * a + b * b,
                    p=rng.choice([2, 3, 5, 6, 7]), s=2 * a, q=a * a)


def realistic_pairs(n: int, seed: int = 0, reasoning_chars: tuple[int, int] = (2000, 8000),
                    p_wrong: float = 0.2, p_unfinished: float = 0.05, p_length: float = 0.05
                    ) -> list[tuple[str, str, str]]:
    """``n`` ``(generation, gold, finish_reason)`` triples like DeepSeek-R1 output: a multi-kB
    ``<think>`` block of LaTeX-laden reasoning, then a few hundred characters of solution ending in
    ``\\boxed{}``. About 70% correct (in varied equivalent forms), 20% wrong, 10% unfinished."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b, c = rng.randint(2, 40), rng.randint(41, 90), rng.randint(91, 99)
        p, s, q = rng.choice([2, 3, 5, 6, 7]), 2 * a, a * a
        gold_t, good, bad = rng.choice(_ANSWERS)
        fmt = dict(a=a, b=b, c=c, p=p, s=s, q=q)
        gold = gold_t.format(**fmt)
        r = rng.random()
        pred = (rng.choice(bad) if r < p_wrong else rng.choice(good)).format(**fmt)
        target = rng.randint(*reasoning_chars)
        parts = []
        size = 0
        while size < target:
            step = _fill(rng.choice(_STEPS), rng)
            parts.append(step)
            size += len(step)
            if rng.random() < 0.15:
                parts.append("\n\n")
        reasoning = "".join(parts)
        summary = "".join(_fill(rng.choice(_SUMMARY), rng) for _ in range(rng.randint(2, 5)))
        answer = summary + f"\n\nTherefore, the final answer is $\\boxed{{{pred}}}$."
        finish = "stop"
        if r > 1 - p_unfinished:
            gen = THINK + reasoning + f" so maybe \\boxed{{{pred}}}, but wait"
        elif r > 1 - p_unfinished - p_length:
            gen = THINK + reasoning[: len(reasoning) // 2]
            finish = "length"
        else:
            gen = THINK + reasoning + END + answer
        out.append((gen, gold, finish))
    return out
