"""Realistic top-K log-probabilities for the stand-in teacher, and the API JSON that carries them.

Why: the stand-in server (:mod:`distilled.generate.teacher_server`) writes its answers from templates; it has
no model. To exercise capture -> sidecar -> alignment -> KD loss end to end, it must still return
logprobs shaped and normalised like a real teacher's, over the *student's* tokens of the text it
emits:

* the emitted token gets most of the mass (p ~ Beta(8, 1.5): median ~0.87, sometimes much lower),
  and in about 8% of steps one alternative outranks it, as temperature sampling does;
* K-1 plausible alternatives: spelling variants of the emitted token that exist in the vocabulary
  (leading space toggled, capitalisation, the token minus its last byte), then frequent tokens
  (low BPE ranks), with geometrically decaying probabilities;
* a tail of 0.2-5% for the rest of the vocabulary, so ``sum(exp(top-K)) < 1`` as with a real
  150k-token softmax (the KD loss's tail bucket sees real mass);
* deterministic in ``seed`` (the server derives it from its seed, the prompt and the choice).

The logprobs are ``log(p)`` of a proper distribution over K entries plus the tail: a log-softmax.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from distilled.kd.logprobs import StudentVocab
from distilled.kd.sidecar import TokenTopK

_FREQUENT = 20000  # alternatives are drawn from the most frequent BPE tokens (lowest ranks)


def _variants(b: bytes) -> list[bytes]:
    core = b.strip()
    out = []
    if core:
        out += [b" " + core if not b.startswith(b" ") else core, core.capitalize(), core.lower(), core.upper()]
    if len(b) > 1:
        out.append(b[:-1])
    return [v for v in out if v and v != b]


def synth_top_logprobs(ids: Sequence[int], k: int, seed: int, vocab: StudentVocab | None = None,
                       vocab_size: int = 151643) -> TokenTopK:
    """Top-``k`` teacher logprobs for emitting ``ids`` (student ids), deterministic in ``seed``.

    ``vocab`` (optional) makes the first alternatives spelling variants of each token; without it
    all alternatives are frequent ids below ``min(vocab_size, 20000)``.
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    n = len(ids)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, n, int(k)]))
    p_emit = rng.beta(8.0, 1.5, size=n)
    tail = rng.uniform(0.002, 0.05, size=n)
    flip = rng.random(n) < 0.08  # an alternative outranks the emitted token
    decay = rng.uniform(0.35, 0.75, size=n)
    hi = min(vocab_size, _FREQUENT)
    top_ids = np.full((n, k), -1, np.int32)
    top_p = np.zeros((n, k), np.float64)
    for t in range(n):
        e = int(ids[t])
        cand: list[int] = [e]
        if vocab is not None and k > 1 and e < len(vocab.id_bytes):
            for v in _variants(vocab.id_bytes[e]):
                j = vocab.by_bytes.get(v)
                if j is not None and j not in cand and j < vocab_size:
                    cand.append(j)
                if len(cand) >= min(k, 4):
                    break
        while len(cand) < k:
            for j in rng.integers(0, hi, size=2 * k).tolist():
                if j not in cand:
                    cand.append(j)
                if len(cand) >= k:
                    break
        rest = 1.0 - tail[t]
        pe = p_emit[t] * rest
        alt = decay[t] ** np.arange(k - 1, dtype=np.float64)
        alt = alt / alt.sum() * (rest - pe) if k > 1 else alt
        probs = np.concatenate([[pe], alt]) if k > 1 else np.array([rest])
        if flip[t] and k > 1:
            probs[0], probs[1] = probs[1], probs[0]
        order = np.argsort(-probs, kind="stable")
        top_ids[t] = np.asarray(cand[:k])[order]
        top_p[t] = probs[order]
    lp = np.log(top_p)
    own = lp[top_ids == ids[:, None]]
    return TokenTopK(ids.astype(np.int32), own.astype(np.float32), top_ids, lp.astype(np.float32))


def _tok_entry(i: int, lp: float, vocab: StudentVocab, as_ids: bool) -> dict:
    b = vocab.bytes_of(int(i))
    return {"token": f"token_id:{int(i)}" if as_ids else b.decode("utf-8", errors="replace"),
            "logprob": float(lp), "bytes": list(b)}


def chat_logprobs_json(rec: TokenTopK, vocab: StudentVocab, as_ids: bool = False) -> dict:
    """``choice.logprobs`` of a chat completion (OpenAI shape: content[*].top_logprobs)."""
    content = []
    for t in range(rec.n_tokens):
        e = _tok_entry(rec.sampled_ids[t], rec.sampled_logprobs[t], vocab, as_ids)
        e["top_logprobs"] = [_tok_entry(i, v, vocab, as_ids) for i, v in zip(rec.topk_ids[t], rec.topk_logprobs[t])
                             if i >= 0]
        content.append(e)
    return {"content": content}


def completion_logprobs_json(rec: TokenTopK, vocab: StudentVocab, as_ids: bool = False,
                             text_offset0: int = 0) -> dict:
    """``choice.logprobs`` of a ``/v1/completions`` response (legacy shape: tokens, token_logprobs,
    top_logprobs as {token: logprob} dicts, text_offset)."""
    def name(i: int) -> str:
        return f"token_id:{int(i)}" if as_ids else vocab.bytes_of(int(i)).decode("utf-8", errors="replace")

    tokens, offs, tops = [], [], []
    pos = text_offset0
    for t in range(rec.n_tokens):
        tokens.append(name(rec.sampled_ids[t]))
        offs.append(pos)
        pos += len(vocab.bytes_of(int(rec.sampled_ids[t])).decode("utf-8", errors="replace"))
        tops.append({name(i): float(v) for i, v in zip(rec.topk_ids[t], rec.topk_logprobs[t]) if i >= 0})
    return {"tokens": tokens, "token_logprobs": [float(x) for x in rec.sampled_logprobs], "top_logprobs": tops,
            "text_offset": offs}


class StandinLogprobs:
    """What the stand-in teacher server attaches to its answers when asked for log-probabilities.

    Why here and not in the server: the server stays a text server that knows nothing of
    tokenizers; given the *student's* tokenizer (``distill serve-teacher --tokenizer``) this turns
    an answer into per-token top-K log-probabilities over exactly the tokens that tokenizer makes
    of it, as a teacher sharing the student's vocabulary would.
    """

    def __init__(self, tokenizer, eos_id: int | None = None):
        if isinstance(tokenizer, str):
            from distilled.data.preprocess import resolve_tokenizer_dir
            from distilled.data.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(resolve_tokenizer_dir(tokenizer))
        self.tokenizer = tokenizer
        self.vocab = StudentVocab(tokenizer)
        eos = eos_id if eos_id is not None else self.vocab.by_bytes.get(b"<|im_end|>")
        self.eos_id = eos
        # alternatives come from the BPE tokens only (a trimmed vocabulary's specials follow them)
        self.bpe_size = min(self.vocab.special) if self.vocab.special else len(self.vocab.id_bytes)

    def _seed(self, text: str, seed) -> int:
        import hashlib

        return int.from_bytes(hashlib.blake2b(f"{seed}|{text}".encode(), digest_size=8).digest(), "little")

    def chat(self, text: str, k: int, seed, stopped: bool, as_ids: bool = False) -> dict:
        """``choice.logprobs`` for a chat answer ``text``; the closing ``<|im_end|>`` is included
        when the answer ``stopped`` (finish_reason "stop"), as a server that reports its EOS does."""
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if stopped and self.eos_id is not None:
            ids = ids + [self.eos_id]
        rec = synth_top_logprobs(ids, k, self._seed(text, seed), self.vocab, vocab_size=self.bpe_size)
        return chat_logprobs_json(rec, self.vocab, as_ids)

    def completion(self, prompt: str, text: str, k: int, seed, echo: bool, as_ids: bool = False) -> dict:
        """``choice.logprobs`` of ``/v1/completions`` (legacy shape). With ``echo`` the prompt's
        tokens come first, the very first with ``None`` logprob and top-K (nothing predicts it)."""
        full = (prompt + text) if echo else text
        ids = self.tokenizer.encode(full, add_special_tokens=False)
        rec = synth_top_logprobs(ids, k, self._seed(full, seed), self.vocab, vocab_size=self.bpe_size)
        out = completion_logprobs_json(rec, self.vocab, as_ids, text_offset0=0 if echo else len(prompt))
        if echo and ids:
            out["token_logprobs"][0] = None
            out["top_logprobs"][0] = None
        return out
