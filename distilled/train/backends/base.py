"""The small interface every training backend implements, and the pieces they share.

Why one interface: ``distill parity`` feeds the *same* packed batches and the *same* HF weights to
two implementations (MindFormers on MindSpore, transformers on torch) and compares what comes out.
That only means something when both sides get identical inputs built by one function
(:func:`packed_batch`) and follow one definition of the training step (:class:`TrainSettings`:
MindFormers' AdamW, ``LinearWithWarmUpLR`` and clip-by-global-norm, reproduced exactly).

Nothing here imports torch or MindSpore: the CLI stays fast and each backend imports its own
framework lazily.
"""

from __future__ import annotations

import abc
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from distilled.train.hf_mf_names import MODULE_NAMES  # MindFormers module -> HF module (wq -> q_proj, w1 -> gate_proj)

IGNORE_INDEX = -100


# --------------------------------------------------------------------------------------------
# Packed batches
# --------------------------------------------------------------------------------------------
@dataclass
class PackedBatch:
    """One batch of packed rows, in the layout MindFormers' ``_get_packed_data`` produces.

    ``labels`` are already shifted (``labels[i]`` is the target of position ``i``); -100 is
    ignored. ``doc_ids`` numbers the documents of each row (the padding tail after the last
    ``actual_seq_len`` end is a document of its own, as in MindFormers), and
    ``position_ids`` restart at 0 at each document start.
    """

    input_ids: np.ndarray  # (B, S) int64
    labels: np.ndarray  # (B, S) int64
    loss_mask: np.ndarray  # (B, S) float32, labels != -100
    position_ids: np.ndarray  # (B, S) int64
    doc_ids: np.ndarray  # (B, S) int64
    actual_seq_len: list[list[int]] = field(default_factory=list)
    topk_ids: np.ndarray | None = None  # (B, S, K) int32, -1 = none: logits distillation (distilled/kd/align.py)
    topk_logprobs: np.ndarray | None = None  # (B, S, K) float16/32

    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_length(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum())

    def block_causal_mask(self) -> np.ndarray:
        """(B, S, S) bool, True where query i may attend key j: same document and j <= i.

        The complement is exactly MindFormers' packed ``attention_mask`` (1 = masked)."""
        same = self.doc_ids[:, :, None] == self.doc_ids[:, None, :]
        causal = np.tril(np.ones((self.seq_length, self.seq_length), dtype=bool))
        return same & causal[None]

    def mindformers_attention_mask(self) -> np.ndarray:
        """(B, 1, S, S) uint8 with 1 = masked: what ``_get_packed_data`` feeds the legacy model."""
        return (~self.block_causal_mask()).astype(np.uint8)[:, None]

    def row(self, i: int) -> "PackedBatch":
        """Batch of one row (for the per-document packing check)."""
        return PackedBatch(self.input_ids[i:i + 1], self.labels[i:i + 1], self.loss_mask[i:i + 1],
                           self.position_ids[i:i + 1], self.doc_ids[i:i + 1],
                           self.actual_seq_len[i:i + 1],
                           None if self.topk_ids is None else self.topk_ids[i:i + 1],
                           None if self.topk_logprobs is None else self.topk_logprobs[i:i + 1])


class PackedDataError(ValueError):
    """A packed row that does not fit data-contracts §5 (names row and field)."""


def _doc_layout(actual_seq_len: Sequence[int], seq_length: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """doc ids and restarting positions from cumulative ends, exactly like ``_get_packed_data``."""
    ends = [int(e) for e in actual_seq_len]
    if ends and ends[0] == 0:  # tolerate a leading 0 (Megatron style); MF writes none
        ends = ends[1:]
    prev = 0
    for e in ends:
        if e <= prev or e > seq_length:
            raise PackedDataError(f"{where}: field 'actual_seq_len' must be strictly increasing ends in "
                                  f"(0, {seq_length}], got {ends}")
        prev = e
    doc = np.zeros(seq_length, dtype=np.int64)
    pos = np.zeros(seq_length, dtype=np.int64)
    start = 0
    for d, e in enumerate(ends + ([seq_length] if prev < seq_length else [])):
        doc[start:e] = d
        pos[start:e] = np.arange(e - start)
        start = e
    return doc, pos


def packed_batch(rows: Sequence[Mapping[str, Any]], where: str = "batch",
                 restart_positions: bool = True) -> PackedBatch:
    """Build a :class:`PackedBatch` from packed Arrow rows (``input_ids``, ``labels``,
    ``actual_seq_len``; ``position_ids`` optional and checked when present).

    ``restart_positions=False`` returns 0..S-1 positions instead: only for tests that prove the
    packing check catches a model fed non-restarting positions.

    >>> b = packed_batch([{"input_ids": [5, 6, 7, 8], "labels": [6, -100, 8, -100], "actual_seq_len": [2, 4]}])
    >>> b.position_ids.tolist(), b.doc_ids.tolist()
    ([[0, 1, 0, 1]], [[0, 0, 1, 1]])
    """
    if not rows:
        raise PackedDataError(f"{where}: no rows")
    ids, labs, pos, docs, asl = [], [], [], [], []
    seq_length = None
    for n, r in enumerate(rows):
        w = f"{where}, row {r.get('_row', n)}"
        for k in ("input_ids", "labels", "actual_seq_len"):
            if k not in r or r[k] is None:
                raise PackedDataError(f"{w}: missing field {k!r} (see docs/data-contracts.md §5)")
        x = np.asarray(r["input_ids"], dtype=np.int64)
        y = np.asarray(r["labels"], dtype=np.int64)
        if x.ndim != 1 or y.shape != x.shape:
            raise PackedDataError(f"{w}: 'input_ids' and 'labels' must be 1-D lists of equal length, "
                                  f"got {x.shape} and {y.shape}")
        if seq_length is None:
            seq_length = len(x)
        elif len(x) != seq_length:
            raise PackedDataError(f"{w}: field 'input_ids' has length {len(x)}, other rows {seq_length} "
                                  "(packed rows must share seq_length)")
        d, p = _doc_layout(list(r["actual_seq_len"]), seq_length, w)
        if r.get("position_ids") is not None:
            given = np.asarray(r["position_ids"], dtype=np.int64)
            if given.shape != p.shape or not np.array_equal(given, p):
                bad = int(np.argmax(given != p)) if given.shape == p.shape else -1
                raise PackedDataError(f"{w}: field 'position_ids' does not restart at the 'actual_seq_len' "
                                      f"boundaries (first mismatch at index {bad})")
        if not restart_positions:
            p = np.arange(seq_length, dtype=np.int64)
        ids.append(x)
        labs.append(y)
        pos.append(p)
        docs.append(d)
        asl.append([int(e) for e in r["actual_seq_len"]])
    labels = np.stack(labs)
    topk_ids = topk_lp = None
    if all(r.get("topk_ids") is not None for r in rows):  # KD columns (flat S*K per row)
        topk_ids = np.stack([np.asarray(r["topk_ids"], dtype=np.int32) for r in rows])
        topk_lp = np.stack([np.asarray(r["topk_logprobs"], dtype=np.float32) for r in rows])
        if topk_ids.shape[1] % seq_length or topk_lp.shape != topk_ids.shape:
            raise PackedDataError(f"{where}: 'topk_ids' has {topk_ids.shape[1]} values per row, not a multiple of "
                                  f"seq_length {seq_length} (or 'topk_logprobs' differs)")
        k = topk_ids.shape[1] // seq_length
        topk_ids = topk_ids.reshape(len(rows), seq_length, k)
        topk_lp = topk_lp.reshape(len(rows), seq_length, k)
    return PackedBatch(np.stack(ids), labels, (labels != IGNORE_INDEX).astype(np.float32),
                       np.stack(pos), np.stack(docs), asl, topk_ids, topk_lp)


def split_documents(batch: PackedBatch, row: int = 0) -> list[PackedBatch]:
    """Each document of one packed row as its own single-document row, padded after its end
    (padding is never attended by the document under a causal mask, and carries label -100).

    Why: the packing check runs these one by one and compares the token-weighted loss with the
    packed row's loss."""
    S = batch.seq_length
    out = []
    for d in np.unique(batch.doc_ids[row]):
        idx = np.nonzero(batch.doc_ids[row] == d)[0]
        s, e = int(idx[0]), int(idx[-1]) + 1
        if batch.loss_mask[row, s:e].sum() == 0:
            continue
        n = e - s
        ids = np.zeros(S, dtype=np.int64)
        ids[:n] = batch.input_ids[row, s:e]
        ids[n:] = batch.input_ids[row, s]  # any real token id; never attended, never trained
        lab = np.full(S, IGNORE_INDEX, dtype=np.int64)
        lab[:n] = batch.labels[row, s:e]
        out.append(packed_batch([{"input_ids": ids, "labels": lab,
                                  "actual_seq_len": [n] if n < S else [S]}], where=f"doc {d}"))
    return out


# --------------------------------------------------------------------------------------------
# Training settings (MindFormers semantics)
# --------------------------------------------------------------------------------------------
@dataclass
class TrainSettings:
    """The training step both backends run, with MindFormers 1.9 semantics.

    - AdamW (mindformers/core/optim/adamw.py): ``p *= 1 - lr*wd``; Adam moments in fp32 with bias
      correction; ``p -= lr/bc1 * m / (sqrt(v/bc2) + eps)``. Weight decay only on parameters that
      are not 1-D and whose name does not end in ``.bias`` (optimizer_grouped_parameters.py).
    - ``LinearWithWarmUpLR``: see :func:`linear_warmup_lr`.
    - clip-by-global-norm (core/clip_grad.py): ``g *= max_norm / (max(norm, max_norm) + 1e-6)``
      (note: MindFormers scales by ``max_norm/(max_norm+1e-6)`` even when not clipping).
    """

    learning_rate: float = 1e-5
    warmup_lr_init: float = 0.0
    warmup_steps: int = 0
    total_steps: int = 1
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    lr_schedule: str = "LinearWithWarmUpLR"
    # logits distillation (model.arch.type KDLlamaForCausalLM): alpha * CE + (1 - alpha) * KL
    kd_alpha: float | None = None
    kd_temperature: float = 1.0

    def lr_at(self, step: int) -> float:
        """Learning rate used by optimizer step ``step`` (0-based)."""
        if self.lr_schedule == "constant":
            return float(self.learning_rate)
        return linear_warmup_lr(step, self.learning_rate, self.warmup_steps, self.total_steps,
                                self.warmup_lr_init)

    def to_dict(self) -> dict:
        return asdict(self)


def linear_warmup_lr(step: int, learning_rate: float, warmup_steps: int, total_steps: int,
                     warmup_lr_init: float = 0.0) -> float:
    """MindFormers 1.9 ``LinearWithWarmUpLR`` (core/lr/lr_schedule.py), formula for formula:
    ``warmup_lr_init + (lr - warmup_lr_init) * step / warmup`` while ``step < warmup``, then
    ``lr * max(0, (total - step) / max(1, total - warmup))``. The optimizer reads it with the
    global step *before* incrementing, so the first step uses ``step = 0``.

    >>> linear_warmup_lr(1, 0.005, 10, 20), linear_warmup_lr(15, 0.005, 10, 20)
    (0.0005, 0.0025)
    """
    s = float(step)
    if warmup_steps != 0 and warmup_steps > s:
        return warmup_lr_init + (learning_rate - warmup_lr_init) * (s / warmup_steps)
    linear = max(1, total_steps - warmup_steps)
    return learning_rate * max(0.0, (total_steps - s) / linear)


def warmup_steps_from(ratio: float | None, steps: int | None, total_steps: int) -> int:
    """``_get_lr_steps``: a ratio wins over steps and is truncated, ``int(total * ratio)``."""
    if ratio is not None:
        if not 0.0 <= float(ratio) <= 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1], got {ratio}")
        return int(total_steps * float(ratio))
    return int(steps or 0)


def wants_weight_decay(name: str, ndim: int) -> bool:
    """MindFormers' no-decay rule: 1-D tensors (norms) and biases get no weight decay."""
    return not (ndim == 1 or name.endswith(".bias"))


# --------------------------------------------------------------------------------------------
# Results and the interface
# --------------------------------------------------------------------------------------------
@dataclass
class LoraSettings:
    """LoRA on the attention projections, as MindFormers' ``pet_config`` sets it (``pet_type: lora``).

    ``targets`` are HF module names (``q_proj``...); MindFormers' ``target_modules`` regex over its
    names (``.*wq|.*wk|.*wv|.*wo``) is translated by :func:`lora_targets_from_regex`. Scaling is
    ``alpha / rank`` on both sides (MindPet ``LoRADense`` and PEFT); A starts He-uniform, B at 0.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    def to_dict(self) -> dict:
        return asdict(self)


def lora_targets_from_regex(regex: str) -> tuple[str, ...]:
    """HF module names matched by a MindFormers ``target_modules`` regex.

    >>> lora_targets_from_regex('.*wq|.*wk|.*wv|.*wo')
    ('q_proj', 'k_proj', 'v_proj', 'o_proj')
    """
    import re

    out = tuple(hf for mf, hf in MODULE_NAMES.items()
                if re.match(regex, f"model.layers.0.attention.{mf}") or re.match(regex, f"model.layers.0.feed_forward.{mf}")
                or re.match(regex, mf))
    if not out:
        raise ValueError(f"pet_config.target_modules={regex!r} matches none of {sorted(MODULE_NAMES)}")
    return out


def lora_regex_from_targets(targets: Sequence[str]) -> str:
    """The MindFormers ``target_modules`` regex for HF module names."""
    inv = {v: k for k, v in MODULE_NAMES.items()}
    return "|".join(f".*{inv[t]}" for t in targets)


@dataclass
class StepResult:
    """What one training step reports: loss before the update, global grad norm before
    clipping, the learning rate used, and the number of loss tokens."""

    step: int
    loss: float
    grad_norm: float
    lr: float
    tokens: int


@dataclass
class ForwardResult:
    """Loss as MindFormers defines it (``sum(ce * mask) / (sum(mask) + 1e-8)``) plus the parts
    (token-summed CE and the count) for token-weighted averages, and optionally the logits."""

    loss: float
    loss_sum: float
    num_tokens: int
    logits: np.ndarray | None = None


class Backend(abc.ABC):
    """A training backend: HF safetensors in, HF safetensors out, MindFormers semantics inside.

    Parameter names in :meth:`named_parameters` and :meth:`save_hf` are always Hugging Face
    names (``model.layers.0.self_attn.q_proj.weight``), so backends can be compared name by name.
    """

    name: str = "base"

    @abc.abstractmethod
    def load_hf(self, weights_dir: str | Path, model_config: Mapping[str, Any] | None = None,
                dtype: str = "float32", seq_length: int | None = None, batch_size: int = 1) -> None:
        """Load ``config.json`` + ``*.safetensors`` from ``weights_dir``. ``model_config`` is the
        YAML's ``model.model_config`` (a backend may use it to build its model and must check it
        against the HF config)."""

    @abc.abstractmethod
    def forward(self, batch: PackedBatch, return_logits: bool = False) -> ForwardResult:
        """Forward + loss on a packed batch (per-document attention, restarting positions), no update."""

    @abc.abstractmethod
    def setup_training(self, settings: TrainSettings) -> None:
        """Build the optimizer and schedule; must be called before :meth:`train_step`."""

    @abc.abstractmethod
    def train_step(self, batch: "PackedBatch | Sequence[PackedBatch]") -> StepResult:
        """Forward, backward, clip by global norm, AdamW update with the scheduled lr.

        A list is the micro-batches of one optimizer step (gradient accumulation). The loss is
        per token over the whole global batch: ``sum(token CE) / (trained tokens + 1e-8)``
        summed over every micro-batch (and, for data parallel, every rank), never a mean of
        per-micro-batch means. ``StepResult.loss`` is that global per-token mean and
        ``StepResult.tokens`` the global trained-token count."""

    def enable_lora(self, lora: LoraSettings) -> None:
        """Wrap the loaded model with LoRA adapters; only adapter weights train afterwards.
        Adapter parameters are named ``<HF module>.lora_A.weight`` / ``.lora_B.weight``."""
        raise NotImplementedError(f"backend {self.name!r} has no LoRA support")

    @abc.abstractmethod
    def named_parameters(self) -> dict[str, np.ndarray]:
        """Every parameter as float32 numpy under its HF name."""

    @abc.abstractmethod
    def save_hf(self, output_dir: str | Path) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (HF layout) atomically."""


def as_micro_batches(batch: "PackedBatch | Sequence[PackedBatch]") -> list[PackedBatch]:
    """``train_step``'s argument as a non-empty list of micro-batches (one batch = one micro-batch)."""
    micro = [batch] if isinstance(batch, PackedBatch) else list(batch)
    if not micro:
        raise ValueError("train_step needs at least one micro-batch")
    return micro


def compare_parameters(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> dict:
    """Drift between two parameter sets: ``global_rel`` = ||a-b|| / ||a|| over all tensors,
    ``per_tensor_rel`` = each tensor's ||a-b|| / ||a||, and the largest per-tensor absolute and
    relative difference (with the tensor's name).

    Missing names on either side are listed, never skipped silently."""
    only_a = sorted(set(a) - set(b))
    sq_diff = sq_ref = 0.0
    only_b = sorted(set(b) - set(a))
    worst_abs, worst_abs_name, worst_rel, worst_rel_name = 0.0, None, 0.0, None
    per_tensor: dict[str, float] = {}
    for k in sorted(set(a) & set(b)):
        x = np.asarray(a[k], dtype=np.float64)
        y = np.asarray(b[k], dtype=np.float64)
        if x.shape != y.shape:
            raise ValueError(f"parameter {k}: shape {x.shape} vs {y.shape}")
        d = float(np.max(np.abs(x - y))) if x.size else 0.0
        r = float(np.linalg.norm(x - y) / max(np.linalg.norm(x), 1e-30))
        per_tensor[k] = r
        sq_diff += float(np.sum((x - y) ** 2))
        sq_ref += float(np.sum(x ** 2))
        if d > worst_abs:
            worst_abs, worst_abs_name = d, k
        if r > worst_rel:
            worst_rel, worst_rel_name = r, k
    return {"global_rel": (sq_diff ** 0.5) / max(sq_ref ** 0.5, 1e-30), "max_abs": worst_abs, "max_abs_param": worst_abs_name, "max_rel": worst_rel,
            "max_rel_param": worst_rel_name, "per_tensor_rel": per_tensor, "only_in_first": only_a,
            "only_in_second": only_b}


def rel_diff(a: float, b: float) -> float:
    """|a - b| / max(|a|, tiny): the relative difference used for losses and grad norms."""
    if math.isnan(a) or math.isnan(b):
        return float("inf")
    return abs(a - b) / max(abs(a), 1e-30)


def iter_batches(rows: Sequence[Mapping[str, Any]], batch_size: int, steps: int,
                 where: str = "data") -> Iterable[PackedBatch]:
    """``steps`` batches of ``batch_size`` rows in order, wrapping around to the start (epochs)
    like the MindFormers dataloader with ``shuffle: False`` and ``drop_remainder: True``."""
    n = len(rows)
    if n < batch_size:
        raise PackedDataError(f"{where}: {n} packed rows, fewer than batch_size {batch_size}")
    per_epoch = n // batch_size
    for s in range(steps):
        b = s % per_epoch
        chunk = [dict(rows[i], _row=i) for i in range(b * batch_size, (b + 1) * batch_size)]
        yield packed_batch(chunk, where=where)
