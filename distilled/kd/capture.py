"""Capture the teacher's top-K during ``distill generate --top-logprobs K``.

Why a class of its own: :mod:`distilled.generate.runner` stays a text pipeline; it only (1) adds
:meth:`Capture.request_extra` to each request, (2) hands each answer's ``logprobs`` to
:meth:`Capture.take` and (3) calls :meth:`Capture.commit` right *before* writing a problem's JSONL
line, and :meth:`Capture.sync` before each fsync of the JSONL. That order makes the JSONL line
the commit point of the sidecar (:mod:`distilled.kd.sidecar`), so resume, torn-tail repair and
never-duplicate hold for both files together.

Every answer is checked (:class:`~distilled.kd.logprobs.VocabularyGuard`): a teacher with another
vocabulary stops the run with the first differing position; a rare non-canonical sample keeps its
text and loses its top-K (counted in the summary).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

from distilled.kd import MAX_TOP_LOGPROBS
from distilled.kd.logprobs import StudentVocab, VocabularyGuard, VocabularyMismatch, parse_choice_logprobs
from distilled.kd.sidecar import SidecarWriter, TokenTopK, sidecar_path


class Capture:
    """Top-K capture beside one generations file.

    ``tokenizer``: the *student's* tokenizer (a loaded fast tokenizer, or a directory / ``qwen2.5``).
    ``committed``: uuids already in the generations file (after its torn-tail repair).
    """

    def __init__(self, output_file: str | os.PathLike, k: int, tokenizer: Any, committed: Iterable[str],
                 fsync_every: float = 1.0, guard: VocabularyGuard | None = None):
        if not 1 <= int(k) <= MAX_TOP_LOGPROBS:
            raise ValueError(f"--top-logprobs must be 1..{MAX_TOP_LOGPROBS} (the OpenAI-compatible limit), got {k}")
        self.k = int(k)
        if isinstance(tokenizer, (str, os.PathLike)):
            from distilled.data.preprocess import resolve_tokenizer_dir
            from distilled.data.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(resolve_tokenizer_dir(str(tokenizer)))
        self.vocab = StudentVocab(tokenizer)
        self.path = sidecar_path(output_file)
        self.writer = SidecarWriter(self.path, committed=committed, fsync_every=fsync_every)
        self.guard = guard or VocabularyGuard()
        self.stored = 0
        self.dropped = 0
        self.missing = 0  # answers that came back without logprobs

    def request_extra(self, chat: bool = True) -> dict:
        """Request fields that ask for the top-K (chat: ``logprobs`` + ``top_logprobs``;
        completions: ``logprobs: K``)."""
        return {"logprobs": True, "top_logprobs": self.k} if chat else {"logprobs": self.k}

    def take(self, text: str, logprobs: dict | None, where: str) -> TokenTopK | None:
        """Parse and check one answer; None when it has no usable top-K (the text still trains).

        Raises :class:`VocabularyMismatch` when the teacher's vocabulary is not the student's
        (the run must stop: every answer would be misaligned).
        """
        if not isinstance(logprobs, dict):
            self.missing += 1
            if self.missing >= 3 and self.stored == 0:
                raise VocabularyMismatch(f"{where}: the server returned no 'logprobs' for {self.missing} answers; "
                                         f"it ignores 'logprobs'/'top_logprobs' (check the server's flags, e.g. "
                                         f"vLLM --max-logprobs >= {self.k})", kind="no_logprobs")
            return None
        rec = parse_choice_logprobs({"logprobs": logprobs}, self.vocab, self.k, where=where)
        rec = self.guard.check(text, rec, self.vocab, where)
        if rec is None:
            self.dropped += 1
        return rec

    def commit(self, uuid: str, records: list[TokenTopK | None]) -> None:
        """Store a problem's records (generation index = list position); call *before* its JSONL line."""
        for g, rec in enumerate(records):
            if rec is not None:
                self.writer.write(uuid, g, rec)
                self.stored += 1

    def sync(self) -> None:
        self.writer.sync()

    def close(self) -> None:
        self.writer.close()

    def summary(self) -> dict:
        """For the run's summary line / report."""
        return {"sidecar": str(self.path), "k": self.k, "stored": self.stored, "dropped_noncanonical": self.dropped,
                "without_logprobs": self.missing, "repaired_bytes": self.writer.repaired_bytes,
                "orphans_cut": self.writer.orphan_records, "committed_without_topk": self.writer.missing_committed,
                "tokens": self.writer.tokens, "bytes": self.writer.bytes,
                "bytes_per_token": round(self.writer.bytes / self.writer.tokens, 2) if self.writer.tokens else None}

    def line(self) -> str:
        s = self.summary()
        out = f"top-{self.k} logprobs: {s['stored']} generations -> {Path(s['sidecar']).name}"
        if s["bytes_per_token"]:
            out += f" ({s['bytes_per_token']} bytes/token)"
        if s["dropped_noncanonical"]:
            out += f"; {s['dropped_noncanonical']} non-canonical samples kept as text only"
        if s["without_logprobs"]:
            out += f"; {s['without_logprobs']} answers without logprobs"
        if s["orphans_cut"]:
            out += f"; {s['orphans_cut']} orphan records of an interrupted run cut"
        return out
