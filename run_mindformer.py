#!/usr/bin/env python
"""MindFormers-compatible training entry for this project (same CLI as MindFormers' run_mindformer.py).

    python run_mindformer.py --config configs/finetune_qwen2_5_tiny_cpu.yaml --run_mode finetune
    bash scripts/msrun_launcher.sh "run_mindformer.py --config configs/finetune_qwen2_5_7b_32k.yaml --run_mode finetune" 8

On top of MindFormers' own script it registers this project's data handlers, applies the CPU
shims only when context.device_target is CPU, fixes packed-row RoPE positions and masks, checks
the YAML against the data before training (errors name the YAML key), and writes
<output_dir>/loss.jsonl. The logic lives in distilled/train/mindformers_run.py (see docs/finetune.md).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from distilled.train.mindformers_run import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run())
