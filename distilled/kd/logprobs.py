"""OpenAI-compatible ``logprobs`` -> :class:`~distilled.kd.sidecar.TokenTopK`, with the vocabulary proven.

Why: logits distillation is only correct when the teacher's token ``i`` *is* the student's token
``i``. The API does not send ids; it sends token strings and (chat) their UTF-8 ``bytes``. We map
each teacher token to a student id **by its bytes** (vLLM's ``return_tokens_as_token_ids`` sends
``"token_id:N"`` strings, used directly), then check that the sampled tokens

1. spell exactly the returned text, byte for byte (else the vocabularies differ: refuse), and
2. are what the student's tokenizer makes of that text (else the top-K would sit at the wrong
   positions after preprocessing re-tokenizes the text).

A teacher with another vocabulary (DeepSeek-R1/V3: 129k tokens) fails (1) or (2) on its first
generation; the error names the first differing position and both tokens. Special tokens are
the one exception to "same bytes": DeepSeek-R1-Distill-Qwen keeps Qwen2.5's 151,643 BPE tokens but
renames the specials (``<｜end▁of▁sentence｜>`` is id 151643), so a closing special token the
student cannot name is left out of the record (it spells no text), and an unnamed special
*alternative* is left out of the top-K (its mass counts in the tail bucket). Sampling can, rarely,
pick a non-canonical split of a word that the tokenizer would merge; such a generation keeps its
text (trained by CE) and is counted, and :class:`VocabularyGuard` refuses the run when that is not
rare (a different tokenizer, not an accident).

Shapes parsed (:func:`parse_choice_logprobs`):

* chat: ``choice.logprobs.content[*] = {token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}``;
* completions: ``choice.logprobs = {tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset}``
  (no bytes: token strings are UTF-8 encoded; a token holding U+FFFD (part of a character) is
  ambiguous unless it is a ``token_id:N`` string: as the sampled token it is refused, as an
  alternative it is left out, so its probability counts in the tail bucket);
* vLLM prompt log-probabilities: ``choice.prompt_logprobs = [None, {"id": {logprob, rank, decoded_token}}]``
  (keys are ids: exact).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from distilled.kd import MAX_TOP_LOGPROBS, NO_TOKEN
from distilled.kd.sidecar import TokenTopK


_SPECIAL_RE = re.compile(r"^<[|｜].{1,60}[|｜]>$")  # <|im_end|>, <｜end▁of▁sentence｜>


class VocabularyMismatch(ValueError):
    """The teacher's tokens are not the student's: logits distillation would be misaligned."""

    def __init__(self, message: str, position: int | None = None, kind: str = "vocabulary"):
        super().__init__(message)
        self.position = position
        self.kind = kind


class LogprobsFormatError(ValueError):
    """A response without usable ``logprobs`` (the message names the field)."""


# --------------------------------------------------------------------------------------------
# Student vocabulary by bytes
# --------------------------------------------------------------------------------------------
class StudentVocab:
    """``bytes -> id`` and ``id -> bytes`` for a byte-level BPE tokenizer (Qwen2/2.5 and kin).

    Built once from the tokenizer (~0.5 s for 151k tokens). Added/special tokens map from their
    literal text (``<|im_end|>``), which is what servers send for them.
    """

    def __init__(self, tokenizer):
        from distilled.data.tokenizer import bytes_to_unicode

        dec = {c: b for b, c in bytes_to_unicode().items()}
        self.tokenizer = tokenizer
        n = len(tokenizer)
        self.size = n
        self.id_bytes: list[bytes] = [b""] * n
        self.by_bytes: dict[bytes, int] = {}
        self.special: set[int] = set()
        added = {int(i): t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
        vocab = tokenizer.get_vocab()
        for tok, i in vocab.items():
            if i >= n:
                continue
            if i in added:
                b = added[i].encode("utf-8")
                self.special.add(i)
            else:
                try:
                    b = bytes(dec[c] for c in tok)
                except KeyError:  # not a byte-level token string
                    b = tok.encode("utf-8")
            self.id_bytes[i] = b
            self.by_bytes.setdefault(b, i)

    def bytes_of(self, i: int) -> bytes:
        return self.id_bytes[i]

    def token_text(self, i: int) -> str:
        return self.id_bytes[i].decode("utf-8", errors="replace")

    def resolve(self, token: str | None, raw: Sequence[int] | None, where: str) -> int:
        """Student id of one teacher token (``where`` names it in errors)."""
        if isinstance(token, str) and token.startswith("token_id:"):
            try:
                i = int(token[len("token_id:"):])
            except ValueError:
                raise LogprobsFormatError(f"{where}: bad token id string {token!r}") from None
            if not 0 <= i < self.size:
                raise VocabularyMismatch(f"{where}: teacher token id {i} is outside the student's vocabulary "
                                         f"(0..{self.size - 1}); the teacher must share the student's tokenizer")
            return i
        if raw is not None:
            b = bytes(raw)
        elif isinstance(token, str):
            if "\ufffd" in token:
                raise VocabularyMismatch(
                    f"{where}: token {token!r} holds part of a character and the response has no 'bytes' to say "
                    f"which; ask the server for ids (vLLM: return_tokens_as_token_ids) or use the chat API",
                    kind="ambiguous")
            b = token.encode("utf-8")
        else:
            raise LogprobsFormatError(f"{where}: no token string and no bytes")
        i = self.by_bytes.get(b)
        if i is None and _SPECIAL_RE.match(b.decode("utf-8", "replace")):
            raise VocabularyMismatch(f"{where}: teacher special token {b.decode('utf-8', 'replace')!r} has no student "
                                     f"token of that name", kind="special")
        if i is None:
            raise VocabularyMismatch(f"{where}: teacher token {b.decode('utf-8', 'replace')!r} (bytes {list(b)[:16]}) "
                                     f"is not a token of the student's vocabulary; the teacher must share the "
                                     f"student's tokenizer (DeepSeek-R1 does not: train on its text only)")
        return i


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------
@dataclass
class _Step:
    token: str | None
    raw: Sequence[int] | None
    logprob: float
    top: list[tuple[str | None, Sequence[int] | None, float]]


def _steps_chat(lp: dict, where: str) -> list[_Step]:
    content = lp.get("content")
    if not isinstance(content, list):
        raise LogprobsFormatError(f"{where}.logprobs.content: expected a list, got {type(content).__name__}")
    steps = []
    for i, e in enumerate(content):
        if not isinstance(e, dict) or "logprob" not in e:
            raise LogprobsFormatError(f"{where}.logprobs.content[{i}]: expected {{token, logprob, top_logprobs}}")
        top = [(t.get("token"), t.get("bytes"), float(t["logprob"])) for t in (e.get("top_logprobs") or [])]
        steps.append(_Step(e.get("token"), e.get("bytes"), float(e["logprob"]), top))
    return steps


def _steps_completion(lp: dict, where: str, start: int = 0) -> list[_Step]:
    toks = lp.get("tokens")
    lps = lp.get("token_logprobs")
    tops = lp.get("top_logprobs")
    if not isinstance(toks, list) or not isinstance(lps, list) or len(toks) != len(lps):
        raise LogprobsFormatError(f"{where}.logprobs: expected lists 'tokens' and 'token_logprobs' of equal length")
    tops = tops if isinstance(tops, list) else [None] * len(toks)
    steps = []
    for i in range(start, len(toks)):
        top = [(t, None, float(v)) for t, v in (tops[i] or {}).items()]
        steps.append(_Step(toks[i], None, float(lps[i]) if lps[i] is not None else float("nan"), top))
    return steps


def _steps_vllm_prompt(plp: list, prompt_ids: Sequence[int], where: str, start: int) -> list[_Step]:
    if len(plp) != len(prompt_ids):
        raise LogprobsFormatError(f"{where}.prompt_logprobs: {len(plp)} entries for {len(prompt_ids)} prompt tokens")
    steps = []
    for i in range(start, len(plp)):
        d = plp[i]
        if not isinstance(d, dict):
            raise LogprobsFormatError(f"{where}.prompt_logprobs[{i}]: expected a dict, got {type(d).__name__}")
        own = d.get(str(prompt_ids[i])) or d.get(prompt_ids[i])
        if own is None:
            raise LogprobsFormatError(f"{where}.prompt_logprobs[{i}]: no entry for the prompt token {prompt_ids[i]}")
        # vLLM adds the prompt token itself to the top-k dict when it is not among them; it has the
        # lowest logprob then, so the caller's top-k cut drops it
        top = [(f"token_id:{int(key)}", None, float(v["logprob"])) for key, v in d.items()]
        steps.append(_Step(f"token_id:{int(prompt_ids[i])}", None, float(own["logprob"]), top))
    return steps


def parse_choice_logprobs(choice: dict, vocab: StudentVocab, k: int, where: str = "choice",
                          prompt_ids: Sequence[int] | None = None, start: int = 0) -> TokenTopK:
    """The teacher's per-token top-``k`` from one response ``choice`` (any shape in the module doc).

    ``start`` skips the first steps (for prompt scoring: the prompt before the answer).
    ``prompt_ids`` are needed for vLLM ``prompt_logprobs``. Entries past ``k`` are dropped, fewer
    are padded with ``-1`` / ``0``; entries are kept in descending logprob order.
    """
    if not 1 <= k <= MAX_TOP_LOGPROBS:
        raise ValueError(f"top-logprobs K must be 1..{MAX_TOP_LOGPROBS}, got {k}")
    if "prompt_logprobs" in choice and choice["prompt_logprobs"] is not None and prompt_ids is not None:
        steps = _steps_vllm_prompt(choice["prompt_logprobs"], prompt_ids, where, start)
    else:
        lp = choice.get("logprobs")
        if not isinstance(lp, dict):
            raise LogprobsFormatError(f"{where}.logprobs: missing (did the server ignore 'logprobs'/'top_logprobs'?)")
        steps = _steps_chat(lp, where) if "content" in lp else _steps_completion(lp, where, start)
    n = len(steps)
    sampled = np.empty(n, np.int32)
    sampled_lp = np.empty(n, np.float32)
    ids = np.full((n, k), NO_TOKEN, np.int32)
    lps = np.zeros((n, k), np.float32)
    for t, s in enumerate(steps):
        try:
            sampled[t] = vocab.resolve(s.token, s.raw, f"{where} token {t}")
        except VocabularyMismatch as exc:
            # a teacher whose special tokens have other names (DeepSeek-R1-Distill-Qwen's
            # <｜end▁of▁sentence｜> is Qwen's id 151643): closing special tokens after the text
            # carry no text to align, so they are left out; anywhere else it is a mismatch
            if exc.kind == "special" and all(_SPECIAL_RE.match(str(x.token or "")) for x in steps[t:]):
                n = t
                sampled, sampled_lp, ids, lps = sampled[:n], sampled_lp[:n], ids[:n], lps[:n]
                break
            raise
        sampled_lp[t] = s.logprob
        top = sorted(s.top, key=lambda e: -e[2])[:k]
        j = 0
        for tok, raw, v in top:
            try:
                ids[t, j] = vocab.resolve(tok, raw, f"{where} token {t} top_logprobs[{j}]")
            except VocabularyMismatch as exc:
                if exc.kind not in ("ambiguous", "special"):
                    raise
                continue  # an alternative we cannot name: its mass stays in the tail bucket
            lps[t, j] = max(v, -65000.0)  # -inf / -9999 from servers: float16-safe, still zero probability
            j += 1
    return TokenTopK(sampled, sampled_lp, ids, lps)


# --------------------------------------------------------------------------------------------
# Vocabulary check
# --------------------------------------------------------------------------------------------
def check_sampled(text: str, sampled_ids: Sequence[int], vocab: StudentVocab, where: str = "generation") -> int:
    """Prove ``sampled_ids`` (student ids) are the student's tokenization of ``text``.

    Returns how many leading ids spell ``text`` (the rest must be special tokens, e.g. the closing
    ``<|im_end|>`` that servers strip from ``content``). Raises :class:`VocabularyMismatch` with
    ``kind="bytes"`` when the tokens do not spell the text (another vocabulary) and
    ``kind="segmentation"`` when they spell it but the student would split it differently.
    The message names the first differing token position and both sides.
    """
    ids = [int(i) for i in sampled_ids]
    n_text = len(ids)
    while n_text and ids[n_text - 1] in vocab.special:
        n_text -= 1
    want = text.encode("utf-8")
    pos = 0
    for t in range(n_text):
        b = vocab.bytes_of(ids[t])
        if want[pos:pos + len(b)] != b:
            raise VocabularyMismatch(
                f"{where}: teacher token {t} {vocab.token_text(ids[t])!r} does not continue the text at byte {pos} "
                f"({want[pos:pos + max(len(b), 8)].decode('utf-8', 'replace')!r}): the teacher's tokens do not spell "
                f"its text in the student's vocabulary; the teacher must share the student's tokenizer",
                position=t, kind="bytes")
        pos += len(b)
    if pos != len(want):
        raise VocabularyMismatch(f"{where}: the teacher's {n_text} tokens spell {pos} of the text's {len(want)} bytes "
                                 f"(first missing: {want[pos:pos + 16].decode('utf-8', 'replace')!r})",
                                 position=n_text, kind="bytes")
    student = vocab.tokenizer.encode(text, add_special_tokens=False)
    if student != ids[:n_text]:
        t = next((i for i, (a, b) in enumerate(zip(student, ids)) if a != b), min(len(student), n_text))
        s_tok = vocab.token_text(student[t]) if t < len(student) else "<end>"
        t_tok = vocab.token_text(ids[t]) if t < n_text else "<end>"
        raise VocabularyMismatch(
            f"{where}: token {t} differs: teacher {t_tok!r} (id {ids[t] if t < n_text else None}), student "
            f"{s_tok!r} (id {student[t] if t < len(student) else None}); the student's tokenizer splits this text "
            f"differently from the teacher's sample", position=t, kind="segmentation")
    return n_text


@dataclass
class VocabularyGuard:
    """Run-level policy over :func:`check_sampled` results.

    A ``bytes`` mismatch or an unknown token is fatal at once (another vocabulary). A
    ``segmentation`` mismatch drops the generation's top-K (its text still trains by CE) and is
    counted; when more than ``max_noncanonical_rate`` of at least ``min_checked`` generations
    (or the first ``min_checked`` in a row) mismatch, the tokenizers differ: fatal.
    """

    max_noncanonical_rate: float = 0.05
    min_checked: int = 20
    checked: int = 0
    noncanonical: int = 0
    first_noncanonical: list[str] = field(default_factory=list)

    def check(self, text: str, rec: TokenTopK, vocab: StudentVocab, where: str) -> TokenTopK | None:
        """The record to store (None: keep the text, drop its top-K); raises when the run must stop."""
        self.checked += 1
        try:
            check_sampled(text, rec.sampled_ids, vocab, where)
        except VocabularyMismatch as exc:
            if exc.kind != "segmentation":
                raise
            self.noncanonical += 1
            if len(self.first_noncanonical) < 5:
                self.first_noncanonical.append(str(exc))
            if (self.noncanonical == self.checked and self.checked >= min(self.min_checked, 3)) or (
                    self.checked >= self.min_checked and self.noncanonical > self.max_noncanonical_rate * self.checked):
                raise VocabularyMismatch(
                    f"{self.noncanonical} of {self.checked} generations are not the student's tokenization of their "
                    f"text (first: {self.first_noncanonical[0]}); the teacher does not share the student's tokenizer",
                    position=exc.position, kind="tokenizer") from None
            return None
        return rec

    def summary(self) -> dict[str, Any]:
        return {"checked": self.checked, "noncanonical": self.noncanonical,
                "first_noncanonical": self.first_noncanonical}
