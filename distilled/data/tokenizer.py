"""Build and load the real Qwen2.5 tokenizer, offline.

Why: every stage after generation needs Qwen2.5's exact token ids (labels, packing, training,
eval), but this project must run with no model hub. The byte-level BPE ranks of Qwen2/2.5 ship
inside the PyPI package ``dashscope`` (``dashscope/resources/qwen.tiktoken``); from them
we derive the same ``tokenizer.json`` / ``vocab.json`` / ``merges.txt`` a Qwen2.5 model folder
holds, with Qwen2's pre-tokenizer (digits split one by one), NFC normalisation, the 22 Qwen2.5
added tokens (151643..151664) and the official chat template.

Everything else loads a tokenizer from a model directory with :func:`load_tokenizer`, so a real
Qwen2.5-Math-7B folder works unchanged.

>>> d = build_qwen2_5_tokenizer("runs/tokenizer")          # doctest: +SKIP
>>> load_tokenizer(d).encode("Hello world")                 # doctest: +SKIP
[9707, 1879]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerFast

from distilled.paths import REPO_ROOT
from distilled.settings import add_arguments, from_args, option
CHAT_TEMPLATE_PATH = REPO_ROOT / "configs" / "qwen2_5_chat_template.jinja"

# Qwen2's pre-tokenizer regex (identical to dashscope's PAT_STR and to Qwen2's tokenizer.json):
# unlike cl100k's ``\p{N}{1,3}`` it takes ``\p{N}`` alone, so every digit is its own pre-token.
QWEN2_PAT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)

NUM_BPE_TOKENS = 151643
"""Ranks 0..151642 are the byte-level BPE vocabulary; added tokens start right after."""

# (content, special) in id order from 151643, as in Qwen2.5's tokenizer_config.json
# ``added_tokens_decoder``: tool-call and FIM markers are added but not "special" (they are
# kept by ``decode(skip_special_tokens=True)``).
QWEN2_5_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)


def added_token_ids(bpe_tokens: int = NUM_BPE_TOKENS) -> dict[str, int]:
    """Ids of the added tokens, which follow the BPE vocabulary (151643.. for the full one)."""
    return {tok: bpe_tokens + i for i, (tok, _) in enumerate(QWEN2_5_ADDED_TOKENS)}


ADDED_TOKEN_IDS = added_token_ids()
ENDOFTEXT_ID = ADDED_TOKEN_IDS["<|endoftext|>"]  # 151643, the pad id
IM_START_ID = ADDED_TOKEN_IDS["<|im_start|>"]  # 151644
IM_END_ID = ADDED_TOKEN_IDS["<|im_end|>"]  # 151645, eos of the chat models

BUILD_VERSION = "1"
"""Bumped when the builder's output changes, so stale caches are rebuilt."""
_STAMP = ".distilled-tokenizer-build"


def qwen_tiktoken_path() -> Path:
    """Path of ``qwen.tiktoken`` inside the installed ``dashscope`` package."""
    import importlib.util

    spec = importlib.util.find_spec("dashscope")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the PyPI package 'dashscope' is not installed; it ships qwen.tiktoken "
                                "(pip install dashscope)")
    path = Path(list(spec.submodule_search_locations)[0]) / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found in the installed dashscope package")
    return path


def load_qwen_ranks(path: str | os.PathLike | None = None) -> dict[bytes, int]:
    """Read the tiktoken rank file: one ``base64(token) rank`` per line."""
    path = Path(path) if path else qwen_tiktoken_path()
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    if len(ranks) != NUM_BPE_TOKENS or sorted(ranks.values()) != list(range(NUM_BPE_TOKENS)):
        raise ValueError(f"{path}: expected ranks 0..{NUM_BPE_TOKENS - 1}, got {len(ranks)} tokens")
    return ranks


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map used by byte-level BPE files."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _split_by_lower_ranks(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Run tiktoken's BPE on ``token``'s bytes using only merges ranked below ``max_rank``.

    For a token of rank r this stops with exactly the two parts that tiktoken itself merges
    last to form it, i.e. the one merge rule ``left right`` byte-level BPE needs (OpenAI's own
    recipe for recovering GPT-2 merges from ranks). Taking every split of a token instead, as
    transformers' generic converter does, adds rules tiktoken never applies.
    """
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best_i, best_rank = -1, max_rank
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best_i, best_rank = i, r
        if best_i < 0:
            break
        parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


def derive_vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE ``vocab`` (token string -> id) and ``merges`` (ordered by rank) from ranks."""
    enc = bytes_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(enc[x] for x in b)

    vocab: dict[str, int] = {}
    merges: list[tuple[int, str, str]] = []
    for token, rank in ranks.items():
        vocab[to_str(token)] = rank
        if len(token) == 1:
            continue
        parts = _split_by_lower_ranks(ranks, token, rank)
        if len(parts) != 2:
            raise ValueError(f"token rank {rank} ({token!r}) cannot be formed from lower-ranked pieces")
        merges.append((rank, to_str(parts[0]), to_str(parts[1])))
    merges.sort()
    return vocab, [(a, b) for _, a, b in merges]


def _build_backend(vocab: dict[str, int], merges: list[tuple[str, str]]):
    """The ``tokenizers`` object Qwen2.5's tokenizer.json describes."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    tok = Tokenizer(BPE(vocab, merges, dropout=None, unk_token=None, continuing_subword_prefix="",
                        end_of_word_suffix="", fuse_unk=False, byte_fallback=False, ignore_merges=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PAT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    # one call, in id order, so ids are 151643.. exactly (len(vocab).. for a trimmed vocabulary)
    tok.add_tokens([AddedToken(t, single_word=False, lstrip=False, rstrip=False, normalized=False, special=s)
                    for t, s in QWEN2_5_ADDED_TOKENS])
    for t, want in added_token_ids(len(vocab)).items():
        got = tok.token_to_id(t)
        if got != want:
            raise RuntimeError(f"added token {t} got id {got}, expected {want}")
    return tok


def read_chat_template(path: str | os.PathLike | None = None) -> str:
    """The official Qwen2.5 chat template (vendored in ``configs/`` as Qwen's own config data)."""
    path = Path(path) if path else CHAT_TEMPLATE_PATH
    if not path.is_file():
        raise FileNotFoundError(f"{path}: Qwen2.5 chat template not found (it is vendored in configs/)")
    return path.read_text(encoding="utf-8")


def _tokenizer_config(chat_template: str, bpe_tokens: int = NUM_BPE_TOKENS) -> dict:
    """tokenizer_config.json as Qwen2.5 instruct models ship it."""
    ids = added_token_ids(bpe_tokens)
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(ids[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                      "single_word": False, "special": s}
            for t, s in QWEN2_5_ADDED_TOKENS
        },
        "additional_special_tokens": [t for t, s in QWEN2_5_ADDED_TOKENS if s and t != "<|endoftext|>"],
        "bos_token": None,
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def write_qwen2_5_tokenizer_files(out: Path, ranks_path: str | os.PathLike | None = None,
                                  chat_template_path: str | os.PathLike | None = None,
                                  bpe_tokens: int | None = None) -> None:
    """Write the four tokenizer files into an existing directory ``out`` (not atomic by itself).

    ``bpe_tokens``: keep only the BPE tokens of rank < N (see ``build_qwen2_5_tokenizer``).
    """
    ranks = load_qwen_ranks(ranks_path)
    if bpe_tokens is not None:
        if not 256 <= bpe_tokens <= NUM_BPE_TOKENS:
            raise ValueError(f"bpe_tokens must be between 256 and {NUM_BPE_TOKENS}, got {bpe_tokens}")
        ranks = {b: r for b, r in ranks.items() if r < bpe_tokens}
    vocab, merges = derive_vocab_and_merges(ranks)
    template = read_chat_template(chat_template_path)
    backend = _build_backend(vocab, merges)
    backend.save(str(out / "tokenizer.json"))
    with open(out / "vocab.json", "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False, separators=(",", ":"))
    with open(out / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    with open(out / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(_tokenizer_config(template, len(vocab)), f, ensure_ascii=False, indent=2)
        f.write("\n")
    special_map = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                   "additional_special_tokens": _tokenizer_config("")["additional_special_tokens"]}
    with open(out / "special_tokens_map.json", "w", encoding="utf-8") as f:
        json.dump(special_map, f, ensure_ascii=False, indent=2)
        f.write("\n")
    (out / _STAMP).write_text(BUILD_VERSION + "\n")


def build_qwen2_5_tokenizer(output_dir: str | os.PathLike, ranks_path: str | os.PathLike | None = None,
                            chat_template_path: str | os.PathLike | None = None,
                            bpe_tokens: int | None = None) -> Path:
    """Build the Qwen2.5 tokenizer into ``output_dir`` atomically and return its path.

    ``bpe_tokens=N`` trims the vocabulary to the N lowest-ranked BPE tokens (the first N merges),
    for tiny CPU students whose 151,936-row embedding and softmax would dominate every step.
    Tokens below N keep their real Qwen2.5 ids, text still round-trips (it splits into more,
    smaller pieces), and the 22 added tokens follow at N, N+1, ...; default: the full tokenizer.

    Writes ``tokenizer.json``, ``vocab.json``, ``merges.txt``, ``tokenizer_config.json`` (official
    chat template, eos ``<|im_end|>``, pad ``<|endoftext|>``) and ``special_tokens_map.json``.
    An existing ``output_dir`` is replaced only once the new one is complete.

    >>> build_qwen2_5_tokenizer("runs/qwen2.5-tokenizer")  # doctest: +SKIP
    PosixPath('runs/qwen2.5-tokenizer')
    """
    from distilled.io_utils import atomic_dir

    output_dir = Path(output_dir)
    with atomic_dir(output_dir) as tmp:
        write_qwen2_5_tokenizer_files(tmp, ranks_path, chat_template_path, bpe_tokens)
    return output_dir


def cache_root() -> Path:
    """``$DISTILLED_CACHE`` if set, else ``~/.cache/distilled``."""
    env = os.environ.get("DISTILLED_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "distilled"


def _is_complete(d: Path) -> bool:
    stamp = d / _STAMP
    return stamp.is_file() and stamp.read_text().strip() == BUILD_VERSION and (d / "tokenizer.json").is_file()


def cached_qwen2_5_tokenizer_dir() -> Path:
    """Return ``<cache_root>/qwen2.5-tokenizer``, building it on first use.

    Safe under concurrent callers (pytest workers, several engineers' tests): each builds into
    its own temp directory and renames it into place; a loser of the rename race discards its
    copy and uses the winner's. A directory from an older builder version is replaced.
    """
    final = cache_root() / "qwen2.5-tokenizer"
    if _is_complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".qwen2.5-tokenizer.", suffix=".tmp", dir=final.parent))
    try:
        write_qwen2_5_tokenizer_files(tmp)
        if final.exists() and not _is_complete(final):  # stale version or foreign leftovers
            aside = final.parent / f".qwen2.5-tokenizer.stale-{os.getpid()}"
            try:
                os.replace(final, aside)
                shutil.rmtree(aside, ignore_errors=True)
            except OSError:
                pass
        try:
            os.rename(tmp, final)  # fails if another caller already put a complete one there
        except OSError:
            if not _is_complete(final):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_tokenizer(path: str | os.PathLike) -> "PreTrainedTokenizerFast":
    """Load a fast tokenizer from any model/tokenizer directory (ours or a real Qwen2.5 folder).

    Raises a clear error naming the directory when it holds no tokenizer files.
    """
    from transformers import AutoTokenizer

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: tokenizer directory not found (build one with "
                                "`distill tokenizer qwen2.5 --output DIR`)")
    if not ((p / "tokenizer.json").is_file() or (p / "vocab.json").is_file()):
        raise FileNotFoundError(f"{p}: no tokenizer.json or vocab.json in this directory")
    tok = AutoTokenizer.from_pretrained(str(p), use_fast=True, trust_remote_code=False)
    if not tok.is_fast:  # pragma: no cover - every Qwen2.5 folder has tokenizer.json
        raise TypeError(f"{p}: expected a fast tokenizer, got {type(tok).__name__}")
    return tok


# ----------------------------------------------------------------------------- CLI

@dataclass
class Qwen25TokenizerArgs:
    """``distill tokenizer qwen2.5``'s options, declared once (:mod:`distilled.settings` makes the flags)."""

    output: str = option(help="directory to write (replaced atomically)")
    bpe_tokens: int | None = option(None, metavar="N",
                                    help="trim to the N lowest-ranked BPE tokens (tiny CPU students; ids below N are "
                                         "the real Qwen2.5 ids, the added tokens follow at N..N+21). Default: all 151643")


def _cmd_qwen(args: argparse.Namespace) -> int:
    import time

    args = from_args(Qwen25TokenizerArgs, args)
    t0 = time.perf_counter()
    out = build_qwen2_5_tokenizer(args.output, bpe_tokens=args.bpe_tokens)
    tok = load_tokenizer(out)
    check = tok.encode("Hello world")
    if args.bpe_tokens is None and check != [9707, 1879]:
        print(f"error: built tokenizer encodes 'Hello world' as {check}, expected [9707, 1879]", file=sys.stderr)
        return 1
    print(f"wrote Qwen2.5 tokenizer to {out} ({len(tok)} tokens, eos {tok.eos_token} "
          f"{tok.eos_token_id}, pad {tok.pad_token} {tok.pad_token_id}) in {time.perf_counter() - t0:.1f}s")
    return 0


def register_cli(sub) -> None:
    """``distill tokenizer qwen2.5 --output DIR``."""
    p = sub.add_parser("tokenizer", help="build tokenizers offline",
                       description="Build a tokenizer offline (no model hub needed).")
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="NAME")
    q = tsub.add_parser("qwen2.5", help="the real Qwen2.5 tokenizer from dashscope's BPE ranks",
                        description="Write tokenizer.json, vocab.json, merges.txt and tokenizer_config.json "
                                    "of Qwen2.5 (official chat template, eos <|im_end|>, pad <|endoftext|>).")
    add_arguments(q, Qwen25TokenizerArgs)
    q.set_defaults(func=_cmd_qwen)

    def _need_name(_args: argparse.Namespace) -> int:
        p.print_help()
        return 2

    p.set_defaults(func=_need_name)
