"""The repository root and its configs folder: the one place that knows where the checkout is.

Why: several modules read files that ship beside the package (``configs/*.yaml``, the chat
template, ``toolkit/``, ``run_mindformer.py``, ``bench/``), and each used to compute the root with
its own ``Path(__file__).parents[1]``, which breaks one module at a time when files move. This file
sits at the package top, so the expression below is right wherever the stage modules live.

>>> (REPO_ROOT / "pyproject.toml").is_file(), CONFIGS_DIR == REPO_ROOT / "configs"
(True, True)
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["REPO_ROOT", "CONFIGS_DIR"]

REPO_ROOT = Path(__file__).resolve().parents[1]
"""The checkout (or editable install) root: holds ``configs/``, ``toolkit/``, ``run_mindformer.py``."""

CONFIGS_DIR = REPO_ROOT / "configs"
"""MindFormers YAMLs, the Qwen2.5 chat template and the open-r1 system prompt."""
