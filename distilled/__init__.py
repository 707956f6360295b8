"""distilled: distil DeepSeek-R1 reasoning into small models on MindSpore/Ascend.

Every stage is a library of plain functions with a thin CLI over it (see ``distilled.cli``).
Modules keep heavy imports (mindspore, mindformers, torch, transformers) inside functions so
that ``distill --help`` and light stages start fast.
"""

__version__ = "0.1.0"

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
"""The system prompt the MindSpore docs' distillation recipe puts first."""
