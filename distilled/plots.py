"""Markdown tables and PNG plots shared by the reject, preprocess, parity, eval and demo reports.

Reports are JSON first; markdown and PNG are rendered from the JSON with these helpers.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence


def md_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Render a GitHub markdown table; floats get 4 significant digits."""

    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> None:
    from distilled.io_utils import atomic_write

    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)


def line_plot(path: str | os.PathLike, series: dict[str, tuple[Sequence[float], Sequence[float]]],
              title: str, xlabel: str, ylabel: str) -> None:
    """One line per named series: ``{"mindspore": (steps, losses), ...}``."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), marker="o" if len(xs) < 30 else None, markersize=3, label=name)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    _save(fig, path)


def bar_chart(path: str | os.PathLike, groups: Sequence[str], series: dict[str, Sequence[float]],
              title: str, ylabel: str) -> None:
    """Grouped bars: ``groups`` on the x axis, one bar per named series in each group."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(groups) * max(1, len(series))), 3.5))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [g + i * width for g in range(len(groups))]
        bars = ax.bar(xs, list(values), width=width, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks([g + width * (len(series) - 1) / 2 for g in range(len(groups))])
    ax.set_xticklabels(list(groups))
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    if len(series) > 1:
        ax.legend()
    _save(fig, path)


def histogram(path: str | os.PathLike, values: Sequence[float], title: str, xlabel: str,
              bins: int = 40, vline: float | None = None) -> None:
    """A histogram, optionally with a vertical marker (e.g. the packing seq_length)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(list(values), bins=bins, color="#4878d0")
    if vline is not None:
        ax.axvline(vline, color="#d65f5f", linestyle="--")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    _save(fig, path)
