"""Chat encoding: messages -> (input_ids, labels) with only assistant turns trained, exactly as
``tokenizer.apply_chat_template`` would encode them.

Why this module exists: the MindSpore docs' handler renders the chat template twice per row
(prompt, then prompt + answer) and assumes the prompt's ids are a prefix of the full ids. That
is slow (two template renders and two tokenizations per row) and silently wrong when the answer
starts with whitespace that BPE merges with the template's ``\\n``. Here the template is
rendered once per *role layout* with sentinel contents, split into literal pieces, and rows are
rendered by string concatenation; one batched fast-tokenizer call encodes the whole batch and
the trained spans are found from special-token positions with numpy (no per-token Python loop).
The ids equal ``tokenizer.apply_chat_template(messages)`` exactly. That is checked at run time on
the first rows of every layout and on the first row of every *row class* (per message: contains
``</think>``, contains ``<think>``, leading whitespace, trailing whitespace): a template whose
output depends on the content (DeepSeek-R1-Distill's drops the reasoning before ``</think>`` in
assistant turns) renders a harmless first row exactly and diverges later, so every class that
could render differently is checked; a diverging row raises :class:`TemplateError` naming it.

Labels are **unshifted** (``labels[i] == input_ids[i]`` where trained, ``-100`` elsewhere): the
assistant content plus its closing ``<|im_end|>`` are trained, so the model learns to stop.
Packing shifts them as MindFormers expects. Row formats -> messages live in
:mod:`distilled.data.formats`.
"""

from __future__ import annotations

import os
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from distilled.data.formats import IGNORE_INDEX, FormatConfig, SkipCounter, rows_to_conversations


# ----------------------------------------------------------------------------- tokenize + mask

@dataclass
class _Layout:
    """The chat template rendered for one sequence of roles, split at the message contents."""

    pieces: list[str]  # len(roles) + 1 literal strings around the contents
    trained: list[tuple[int, int, int, list[int]]]  # per assistant turn: (marker_id, occurrence, closing_id, header_ids)
    fast: bool  # False when the template does not put special tokens around assistant turns
    checked_classes: set = field(default_factory=set)  # row classes compared with apply_chat_template
    checked_rows: int = 0  # rows of this layout compared so far


CHECK_ROWS_PER_LAYOUT = 8
"""Rows of each layout compared with ``apply_chat_template`` whatever their class (a cheap
deterministic sample on top of the per-class check, for content dependence no class names)."""


def _row_class(conv: Sequence[dict[str, str]]) -> tuple:
    """What about a row's contents could make a template render it differently from the layout's
    segments: per message, (has ``</think>``, has ``<think>``, leading space, trailing space)."""
    return tuple((m["role"], "</think>" in m["content"], "<think>" in m["content"],
                  m["content"][:1].isspace(), m["content"][-1:].isspace()) for m in conv)


@dataclass
class EncodedBatch:
    """Flat int32 ids/labels with row offsets (Arrow-ready, no per-row Python lists)."""

    ids: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray  # len(rows) + 1

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def select(self, keep: np.ndarray) -> "EncodedBatch":
        """The samples where the boolean mask ``keep`` is true (vectorised)."""
        lengths = self.lengths
        tok_keep = np.repeat(keep, lengths)
        offsets = np.zeros(int(keep.sum()) + 1, np.int64)
        np.cumsum(lengths[keep], out=offsets[1:])
        return EncodedBatch(self.ids[tok_keep], self.labels[tok_keep], offsets)

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.ids[a:b], self.labels[a:b]

    def to_arrow(self):
        """A ``pyarrow.Table`` with ``input_ids`` and ``labels`` as ``list<int32>``."""
        import pyarrow as pa

        offs = pa.array(self.offsets.astype(np.int32, copy=False))
        return pa.table({"input_ids": pa.ListArray.from_arrays(offs, pa.array(self.ids, pa.int32())),
                         "labels": pa.ListArray.from_arrays(offs, pa.array(self.labels, pa.int32()))})

    @classmethod
    def empty(cls) -> "EncodedBatch":
        z = np.zeros(0, np.int32)
        return cls(z, z.copy(), np.zeros(1, np.int64))


class TemplateError(RuntimeError):
    """The chat template rewrites message contents, so segment rendering cannot be exact."""


class TiktokenEngine:
    """Encode with ``tiktoken`` the exact byte-level BPE a Qwen2-style ``tokenizer.json`` defines.

    Why: the HF ``tokenizers`` BPE is the preprocessing bottleneck; on this machine
    ``tiktoken`` encodes the same ranks + regex several times faster, and gives identical ids
    whenever (checked here, else :meth:`from_tokenizer` returns ``None`` and the HF backend is used):
    the model is byte-level BPE whose merge order equals token-id order (true for tiktoken-trained
    vocabularies such as Qwen2/2.5's); the pre-tokenizer is one regex ``Split`` + ``ByteLevel``
    without its own regex; the normaliser is none or NFC (applied here with ``unicodedata``); and
    added tokens are plain (no strip/single-word/normalised flags). :class:`ChatEncoder`
    also compares both engines on the first texts it sees and falls back on any difference.
    """

    def __init__(self, encoding, nfc: bool, specials: dict[str, int]):
        self.encoding = encoding
        self.nfc = nfc
        self.specials = specials

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "TiktokenEngine | None":
        """An engine equivalent to ``tokenizer``'s backend, or ``None`` when it is not provably so.

        Cached per process for tokenizers loaded from a folder (keyed by the folder and the
        ``tokenizer.json`` mtime): building takes a few seconds (7 MB of JSON), and forked
        workers inherit a parent's engine for free.
        """
        key = None
        path = getattr(tokenizer, "name_or_path", None)
        tj = os.path.join(path, "tokenizer.json") if path and os.path.isdir(path) else None
        if tj and os.path.isfile(tj):
            key = (os.path.realpath(tj), os.stat(tj).st_mtime_ns, len(tokenizer))
            if key in _ENGINE_CACHE:
                return _ENGINE_CACHE[key]
        engine = cls._build(tokenizer)
        if key is not None:
            _ENGINE_CACHE[key] = engine
        return engine

    @classmethod
    def _build(cls, tokenizer) -> "TiktokenEngine | None":
        import json as _json

        try:
            import tiktoken
        except ImportError:
            return None
        try:
            raw = tokenizer.backend_tokenizer.to_str()
            spec = _json.loads(raw)
        except Exception:  # pragma: no cover - backend not serialisable
            return None
        model = spec.get("model") or {}
        if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("dropout") \
                or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
            return None
        norm = spec.get("normalizer")
        if norm is not None and norm.get("type") != "NFC":
            return None
        pre = spec.get("pre_tokenizer") or {}
        if pre.get("type") != "Sequence" or len(pre.get("pretokenizers", [])) != 2:
            return None
        split, byte_level = pre["pretokenizers"]
        if split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert") \
                or "Regex" not in (split.get("pattern") or {}):
            return None
        if byte_level.get("type") != "ByteLevel" or byte_level.get("use_regex") or byte_level.get("add_prefix_space"):
            return None
        pattern = split["pattern"]["Regex"]
        vocab: dict[str, int] = model["vocab"]
        from distilled.data.tokenizer import bytes_to_unicode

        inv = {c: b for b, c in bytes_to_unicode().items()}
        ranks: dict[bytes, int] = {}
        try:
            for tok, i in vocab.items():
                ranks[bytes(inv[c] for c in tok)] = i
        except KeyError:
            return None
        if len(ranks) != len(vocab) or sorted(ranks.values()) != list(range(len(ranks))):
            return None
        # merge priority must follow token ids (tiktoken merges by the rank of the result)
        last = -1
        rules: dict[str, tuple[str, str]] = {}
        for m in model.get("merges", []):
            a, b = m.split(" ", 1) if isinstance(m, str) else m
            r = vocab.get(a + b)
            if r is None or r <= last:
                return None
            last = r
            rules[a + b] = (a, b)
        if not _canonical_merges(vocab, rules, ranks, inv, raw):
            return None
        specials = {}
        for t in spec.get("added_tokens", []):
            if t.get("lstrip") or t.get("rstrip") or t.get("single_word") or t.get("normalized"):
                return None
            specials[t["content"]] = t["id"]
        try:
            enc = tiktoken.Encoding("distilled-bpe", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
        except Exception:
            return None
        return cls(enc, norm is not None, specials)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Ids of each text (added tokens recognised anywhere, as HF does)."""
        if self.nfc:
            texts = [t if unicodedata.is_normalized("NFC", t) else unicodedata.normalize("NFC", t) for t in texts]
        return self.encoding.encode_batch(texts, num_threads=_threads(), allowed_special="all")


_ENGINE_CACHE: dict[tuple, "TiktokenEngine | None"] = {}


def _canonical_merges(vocab: dict[str, int], rules: dict[str, tuple[str, str]], ranks: dict[bytes, int],
                      inv: dict[str, int], raw: str) -> bool:
    """True when every multi-byte token has exactly the merge rule tiktoken's BPE would use last
    to form it (run on the token's own bytes with lower-ranked merges only).

    With merges in id order this makes HF's merge-priority BPE and tiktoken's rank-of-result BPE
    pick the same pair at every step (parts are always formed from lower ranks, so a pair that is
    a token is always that token's rule). A few seconds for 151k tokens, so the verdict is cached
    on disk per tokenizer (sha256 of its JSON) under ``$DISTILLED_CACHE/bpe-verified``.
    """
    import hashlib

    from distilled.data.tokenizer import _split_by_lower_ranks, cache_root

    digest = hashlib.sha256(raw.encode("utf-8")).hexdigest()
    marker = cache_root() / "bpe-verified" / digest
    if marker.is_file():
        return marker.read_text().strip() == "ok"
    ok = True
    for tok, r in vocab.items():
        if len(tok) == 1:
            continue
        rule = rules.get(tok)
        b = bytes(inv[c] for c in tok)
        if rule is None:
            ok = False
            break
        parts = _split_by_lower_ranks(ranks, b, r)
        if len(parts) != 2 or parts[0] != bytes(inv[c] for c in rule[0]):
            ok = False
            break
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text("ok\n" if ok else "no\n")
        os.replace(tmp, marker)
    except OSError:
        pass
    return ok


def _threads() -> int:
    if os.environ.get("TOKENIZERS_PARALLELISM", "").lower() in ("false", "0"):
        return 1
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))




class ChatEncoder:
    """Encode conversations with a chat template: ids identical to ``apply_chat_template``,
    labels = ids on assistant content + closing token, ``-100`` elsewhere.

    >>> enc = ChatEncoder(load_tokenizer(d))                               # doctest: +SKIP
    >>> b = enc.encode([[{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]])  # doctest: +SKIP
    >>> b.to_arrow().column_names                                         # doctest: +SKIP
    ['input_ids', 'labels']
    """

    _SENTINEL = "\u2063\u2063DISTILLED{}\u2063\u2063"

    ENGINES = ("auto", "hf", "tiktoken")

    def __init__(self, tokenizer, chat_template: str | None = None, engine: str = "auto"):
        if engine not in self.ENGINES:
            raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(self.ENGINES)}")
        self.tokenizer = tokenizer
        self.backend = tokenizer.backend_tokenizer
        self.tiktoken = TiktokenEngine.from_tokenizer(tokenizer) if engine != "hf" else None
        if engine == "tiktoken" and self.tiktoken is None:
            raise ValueError("engine 'tiktoken' requested but this tokenizer is not a plain byte-level BPE "
                             "that tiktoken reproduces exactly; use engine 'auto' or 'hf'")
        self._engine_checked = self.tiktoken is None
        if chat_template is None:
            chat_template = getattr(tokenizer, "chat_template", None)
        if not chat_template:
            from distilled.data.tokenizer import read_chat_template

            chat_template = read_chat_template()
        self.chat_template = chat_template
        specials = sorted({t for t in tokenizer.all_special_tokens if t} |
                          {t.content for t in tokenizer.added_tokens_decoder.values() if t.special},
                          key=len, reverse=True)
        self.special_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in specials}
        self.specials_re = re.compile("|".join(re.escape(t) for t in specials)) if specials else None
        self._layouts: dict[tuple[str, ...], _Layout] = {}
        self.fallback_rows = 0  # rows whose mask needed offsets (whitespace merged at a boundary)

    # -- layout (template rendered once per role sequence)
    def _render_template(self, msgs: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(msgs, tokenize=False, chat_template=self.chat_template)

    def _layout(self, roles: tuple[str, ...]) -> _Layout:
        lay = self._layouts.get(roles)
        if lay is not None:
            return lay
        sentinels = [self._SENTINEL.format(i) for i in range(len(roles))]
        text = self._render_template([{"role": r, "content": s} for r, s in zip(roles, sentinels)])
        pieces, rest = [], text
        for s in sentinels:
            if rest.count(s) != 1:
                raise TemplateError("the chat template does not render each message content exactly once "
                                    "(it drops or repeats contents); cannot derive exact segments")
            a, rest = rest.split(s)
            pieces.append(a)
        pieces.append(rest)
        trained, fast = [], self.specials_re is not None
        for i, role in enumerate(roles):
            if role != "assistant" or not fast:
                continue
            before = list(self.specials_re.finditer(pieces[i]))
            after = self.specials_re.match(pieces[i + 1])
            if not before or not after:
                fast = False
                continue
            marker = before[-1].group(0)
            occurrence = "".join(pieces[: i + 1]).count(marker) - 1
            header = pieces[i][before[-1].end():]
            header_ids = self.backend.encode(header, add_special_tokens=False).ids if header else []
            trained.append((self.special_ids[marker], occurrence, self.special_ids[after.group(0)], header_ids))
        lay = _Layout(pieces, trained, fast)
        self._layouts[roles] = lay
        return lay

    @staticmethod
    def _join(lay: _Layout, contents: list[str]) -> tuple[str, list[int]]:
        parts, starts, pos = [], [], 0
        for piece, content in zip(lay.pieces, contents):
            parts.append(piece)
            pos += len(piece)
            starts.append(pos)
            parts.append(content)
            pos += len(content)
        parts.append(lay.pieces[-1])
        return "".join(parts), starts

    def _check_row(self, lay: _Layout, conv: Sequence[dict[str, str]], text: str, where: str) -> None:
        """Compare the segment rendering of ``conv`` with ``apply_chat_template``; see the module
        docstring for which rows are compared and why."""
        cls = _row_class(conv)
        if cls in lay.checked_classes and lay.checked_rows >= CHECK_ROWS_PER_LAYOUT:
            return
        ref = self._render_template(list(conv))
        if ref != text:
            n_ours = len(self.backend.encode(text, add_special_tokens=False).ids)
            n_ref = len(self.backend.encode(ref, add_special_tokens=False).ids)
            what = ", ".join(k for k, on in zip(("</think>", "<think>", "leading whitespace", "trailing whitespace"),
                                                 map(any, zip(*(c[1:] for c in cls)))) if on) or "no marker"
            raise TemplateError(
                f"{where}: the chat template renders this row differently from its segments ({n_ours} tokens "
                f"against apply_chat_template's {n_ref}; the row has {what}): the template rewrites message "
                "contents (e.g. drops the reasoning before </think> or strips whitespace), so exact "
                "segment rendering is impossible. Use a template that renders contents verbatim "
                "(chat_template / --chat-template), or remove the reasoning from the data first")
        lay.checked_classes.add(cls)
        lay.checked_rows += 1

    # -- encode
    def encode(self, conversations: Sequence[Sequence[dict[str, str]]],
               locations: Sequence[str] | None = None) -> EncodedBatch:
        """Encode a batch (messages must be validated; see :func:`rows_to_conversations`).

        ``locations[i]`` names conversation ``i`` in a :class:`TemplateError`."""
        if not conversations:
            return EncodedBatch.empty()
        texts, layouts, metas = [], [], []
        for ci, conv in enumerate(conversations):
            roles = tuple(m["role"] for m in conv)
            lay = self._layout(roles)
            contents = [m["content"] for m in conv]
            text, starts = self._join(lay, contents)
            self._check_row(lay, conv, text, locations[ci] if locations is not None else f"conversation {ci + 1}")
            texts.append(text)
            layouts.append(lay)
            metas.append((roles, contents, starts))
        all_ids = self._encode_texts(texts)
        lengths = np.fromiter((len(e) for e in all_ids), dtype=np.int64, count=len(all_ids))
        offsets = np.zeros(len(all_ids) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids = np.empty(int(offsets[-1]), np.int32)
        labels = np.full(int(offsets[-1]), IGNORE_INDEX, np.int32)
        for r, (e, lay) in enumerate(zip(all_ids, layouts)):
            a, b = int(offsets[r]), int(offsets[r + 1])
            row_ids = ids[a:b]
            row_ids[:] = e
            spans = self._spans_fast(row_ids, lay) if lay.fast else None
            if spans is None:
                self.fallback_rows += 1
                spans = self._spans_offsets(self.backend.encode(texts[r], add_special_tokens=False), texts[r], lay,
                                            metas[r])
            row_labels = labels[a:b]
            for s, t in spans:
                row_labels[s:t] = row_ids[s:t]
        return EncodedBatch(ids, labels, offsets)

    @property
    def engine_name(self) -> str:
        """``tiktoken`` or ``hf`` (the engine that produced the ids)."""
        return "tiktoken" if self.tiktoken is not None else "hf"

    def _encode_texts(self, texts: list[str]) -> list[list[int]]:
        if self.tiktoken is None:
            return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]
        out = self.tiktoken.encode_batch(texts)
        if not self._engine_checked:
            # belt and braces: the first texts through both engines must agree exactly
            sample = list(range(min(16, len(texts))))
            ref = self.backend.encode_batch([texts[i] for i in sample], add_special_tokens=False)
            if any(out[i] != ref[k].ids for k, i in enumerate(sample)):
                import logging

                logging.getLogger(__name__).warning("tiktoken engine disagrees with the HF tokenizer; using HF")
                self.tiktoken = None
                return self._encode_texts(texts)
            self._engine_checked = True
        return out

    @staticmethod
    def _spans_fast(row_ids: np.ndarray, lay: _Layout) -> list[tuple[int, int]] | None:
        """Trained [start, end) token spans from special-token positions, or None when a
        content's first token merged with the template's header (then offsets decide)."""
        spans = []
        cache: dict[int, np.ndarray] = {}
        for marker_id, occ, closing_id, header in lay.trained:
            pos = cache.get(marker_id)
            if pos is None:
                pos = cache[marker_id] = np.flatnonzero(row_ids == marker_id)
            if occ >= len(pos):
                return None
            s = int(pos[occ]) + 1 + len(header)
            if header and row_ids[s - len(header):s].tolist() != header:
                return None
            cpos = cache.get(-closing_id - 1)
            if cpos is None:
                cpos = cache[-closing_id - 1] = np.flatnonzero(row_ids == closing_id)
            k = int(np.searchsorted(cpos, s))
            if k >= len(cpos):
                return None
            spans.append((s, int(cpos[k]) + 1))
        return spans

    def _spans_offsets(self, enc, text: str, lay: _Layout, meta) -> list[tuple[int, int]]:
        """Slow path: a token is trained when it starts inside [content start, end of the
        closing token). A token that straddles the boundary (template ``\\n`` merged with a
        leading newline of the content) starts in template text and stays untrained."""
        roles, contents, starts = meta
        offs = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
        tok_start = offs[:, 0] if len(offs) else np.zeros(0, np.int64)
        spans = []
        for i, role in enumerate(roles):
            if role != "assistant":
                continue
            c0 = starts[i]
            c1 = c0 + len(contents[i])
            m = self.specials_re.match(lay.pieces[i + 1]) if self.specials_re else None
            end_char = c1 + (m.end() if m else 0)
            s = int(np.searchsorted(tok_start, c0, side="left"))
            t = int(np.searchsorted(tok_start, end_char, side="left"))
            spans.append((s, t))
        return spans


def encode_rows(rows: Sequence[dict], cfg: FormatConfig, encoder: ChatEncoder, skips: SkipCounter,
                locations: Sequence[str] | None = None, strict: bool = False,
                owners: list[int] | None = None) -> EncodedBatch:
    """Rows -> validated conversations -> :class:`EncodedBatch` (bad rows counted in ``skips``)."""
    own: list[int] = owners if owners is not None else []
    convs = rows_to_conversations(rows, cfg, skips, locations, strict, encoder.specials_re, own)
    locs = [locations[i] if locations is not None else f"row {i + 1}" for i in own]
    return encoder.encode(convs, locs)


def mask_stats(batch: EncodedBatch) -> dict[str, int]:
    """Token counts for reports: all tokens and trained tokens."""
    return {"tokens": int(len(batch.ids)), "trained_tokens": int((batch.labels != IGNORE_INDEX).sum())}
