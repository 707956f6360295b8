"""Shared fixtures: the real Qwen2.5 tokenizer (built offline once per machine), a tiny random
Qwen2 student, and ../shared when a developer checkout has it (tests must pass without it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def qwen_tokenizer_dir() -> Path:
    """Directory with the real Qwen2.5 tokenizer files, built from dashscope's BPE ranks."""
    from distilled.data.tokenizer import cached_qwen2_5_tokenizer_dir

    return cached_qwen2_5_tokenizer_dir()


@pytest.fixture(scope="session")
def qwen_tokenizer(qwen_tokenizer_dir):
    from distilled.data.tokenizer import load_tokenizer

    return load_tokenizer(qwen_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory, qwen_tokenizer_dir) -> Path:
    """A tiny random Qwen2ForCausalLM (HF safetensors + tokenizer files), seed 0."""
    from distilled.train.tiny_model import make_tiny_qwen2

    return make_tiny_qwen2(tmp_path_factory.mktemp("tiny") / "student", tokenizer_dir=qwen_tokenizer_dir)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared beside the checkout; tests that need it skip on a fresh clone."""
    if not SHARED.is_dir():
        pytest.skip("../shared is not present (fresh clone)")
    return SHARED


@pytest.fixture(autouse=True, scope="session")
def _quiet_env():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("GLOG_v", "3")
    yield
