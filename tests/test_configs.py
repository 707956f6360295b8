"""configs/: file names follow MindFormers' task_model_size_seq convention; the MindSpore docs' name still works."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def test_mindspore_docs_name_is_an_alias_of_the_7b_32k_yaml():
    alias = CONFIGS / "finetune_qwen_2_5_7b.yaml"  # the file name the MindSpore distillation docs type
    assert alias.is_symlink() and alias.resolve() == (CONFIGS / "finetune_qwen2_5_7b_32k.yaml").resolve()
    cfg = yaml.safe_load(alias.read_text())
    assert cfg["model"]["model_config"]["seq_length"] == 32768


def test_old_names_are_only_mentioned_as_the_alias():
    out = subprocess.run(["git", "grep", "-l", "-e", "finetune_qwen_2_5_7b", "-e", "finetune_qwen2_5_7b_lora"],
                         cwd=REPO, capture_output=True, text=True).stdout.split()
    assert sorted(set(out) - {"tests/test_configs.py"}) == ["README.md", "README.zh-CN.md", "docs/finetune.md"], out
