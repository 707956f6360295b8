"""Recipes: every published distillation run this project reproduces, as one YAML and a few commands.

Why a registry and not only YAMLs: a recipe is more than a MindFormers config. It is the guide it
comes from, the student and data it names, the data format, the published results to compare
against, the tiny CPU twin that proves it here, and the exact commands. The README table,
docs/recipes.md, the model card written by ``distill convert mf-to-hf`` and tests/test_recipes.py
all read this one list, so they cannot drift apart.

``distill recipe list`` prints the table; ``distill recipe show NAME [--tokens N]`` prints the
commands and the paper wall-time estimate (docs/scaling.md's model, see :func:`estimate_hours`).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distilled.paths import REPO_ROOT as REPO
from distilled.settings import add_arguments, from_args, option

OPEN_R1_SYSTEM_PROMPT = (
    "You are Open-R1, a language model trained by Hugging Face to help users. Your role as an assistant "
    "involves thoroughly exploring questions through a systematic thinking process before providing the "
    "final precise and accurate solutions. This requires engaging in a comprehensive cycle of analysis, "
    "summarizing, exploration, reassessment, reflection, backtracing, and iteration to develop "
    "well-considered thinking process. Please structure your response into two main sections: Thought and "
    "Solution using the specified format: <think> Thought section </think> Solution section. In the Thought "
    "section, detail your reasoning process in steps. Each step should include detailed considerations such "
    "as analysing questions, summarizing relevant findings, brainstorming new ideas, verifying the accuracy "
    "of the current steps, refining any errors, and revisiting previous steps. In the Solution section, "
    "based on various attempts, explorations, and reflections from the Thought section, systematically "
    "present the final solution that you deem correct. The Solution section should be logical, accurate, "
    "and concise and detail necessary steps needed to reach the conclusion. Now, try to solve the following "
    "question through the above guidelines.")
"""The default system prompt of open-r1's OpenR1-Distill-7B chat template (used when a row has none)."""

IM_END_ID = 151645
ENDOFTEXT_ID = 151643


@dataclass(frozen=True)
class Recipe:
    """One published run. Paths are relative to the repository root."""

    name: str
    title: str
    source: str                       # the guide / recipe file it reproduces
    student: str                      # HF id of the base model
    data: str                         # HF id of the training set
    data_format: str                  # `distill preprocess --format`
    config: str                       # the 8-NPU MindFormers YAML
    twin: str                         # the tiny CPU twin (same structure)
    data_configs: tuple[str, ...]     # MindFormers data-process YAMLs: handling, then packing
    preprocess_args: tuple[str, ...]  # extra `distill preprocess` flags
    expected: dict[str, float]        # task -> published pass@1 (%) of this recipe's own run
    expected_source: str
    eval_tasks: tuple[str, ...] = ("aime24", "math_500", "gpqa_diamond")
    lora: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)
    raw_subdir: str = "data"          # the folder of the downloaded set that holds its parquet files

    def yaml(self) -> dict:
        import yaml

        return yaml.safe_load((REPO / self.config).read_text())


RECIPES: tuple[Recipe, ...] = (
    Recipe(
        name="mindspore-docs-7b",
        title="MindSpore docs' DeepSeek-R1 distillation (OpenR1-Qwen-7B)",
        source="MindSpore docs distillation example (open-r1's OpenR1-Qwen-7B)",
        student="Qwen/Qwen2.5-Math-7B-Instruct",
        data="open-r1/OpenR1-Math-220k (or your own `distill reject` output)",
        data_format="openr1",
        config="configs/finetune_qwen2_5_7b_32k.yaml",
        twin="configs/finetune_qwen2_5_tiny_cpu.yaml",
        data_configs=("configs/data_process_handling.yaml", "configs/data_process_packing.yaml"),
        preprocess_args=(),
        expected={"math_500": 90.0},
        expected_source="MindSpore docs (OpenR1-Qwen-7B trained with MindFormers)",
        eval_tasks=("math_500", "aime24"),
    ),
    Recipe(
        name="openr1-stratos-1.5b",
        title="open-r1 guide: Qwen2.5-Math-1.5B on Bespoke-Stratos-17k",
        source="open-r1 README (SFT on Bespoke-Stratos-17k, 1 epoch)",
        student="Qwen/Qwen2.5-Math-1.5B",
        data="bespokelabs/Bespoke-Stratos-17k",
        data_format="stratos",
        config="configs/finetune_qwen2_5_math_1_5b_4k.yaml",
        twin="configs/finetune_qwen2_5_math_1_5b_4k_tiny_cpu.yaml",
        data_configs=("configs/data_process_bespoke_stratos.yaml", "configs/data_process_bespoke_stratos_packing_4k.yaml"),
        preprocess_args=("--think-style", "keep"),
        expected={"aime24": 6.67, "math_500": 45.4, "gpqa_diamond": 28.79},
        expected_source="open-r1 README (its own 1-epoch run, lighteval)",
        notes=("Qwen2.5-Math-1.5B ties its embeddings: the YAML and its twin set tie_word_embeddings: True.",),
    ),
    Recipe(
        name="magpie-lora-3b",
        title="LoRA guide: Magpie-Reasoning-V2 (Qwen2.5-3B-Instruct instead of Phi-3-mini)",
        source="LoRA reasoning-distillation guide on Magpie-Reasoning-V2 (Phi-3-mini there)",
        student="Qwen/Qwen2.5-3B-Instruct",
        data="Magpie-Align/Magpie-Reasoning-V2-250K-CoT-Deepseek-R1-Llama-70B",
        data_format="magpie",
        config="configs/finetune_qwen2_5_3b_8k_lora_magpie.yaml",
        twin="configs/finetune_qwen2_5_3b_8k_lora_magpie_tiny_cpu.yaml",
        data_configs=("configs/data_process_magpie.yaml", "configs/data_process_magpie_packing_8k.yaml"),
        preprocess_args=(),
        expected={},
        expected_source="none published for this student",
        lora=True,
        notes=("MindFormers 1.9 has no Phi-3 model (mindformers/models holds llama, qwen2, qwen3, glm, "
               "deepseek3, telechat only); Qwen2.5-3B-Instruct is the nearest Qwen2.5 size to Phi-3-mini's 3.8B.",),
    ),
    Recipe(
        name="openr1-distill-7b",
        title="OpenR1-Distill-7B: Qwen2.5-Math-7B (RoPE 300k) on Mixture-of-Thoughts",
        source="open-r1 recipes/OpenR1-Distill-7B/sft/config_distill.yaml",
        student="open-r1/Qwen2.5-Math-7B-RoPE-300k",
        data="open-r1/Mixture-of-Thoughts (all: math, code, science)",
        data_format="messages",
        config="configs/finetune_qwen2_5_math_7b_32k_openr1_distill.yaml",
        twin="configs/finetune_qwen2_5_math_7b_32k_openr1_distill_tiny_cpu.yaml",
        data_configs=("configs/data_process_mixture_of_thoughts.yaml",
                      "configs/data_process_mixture_of_thoughts_packing_32k.yaml"),
        preprocess_args=("--system-prompt", '"$(cat configs/open_r1_system_prompt.txt)"'),
        expected={"aime24": 52.7, "math_500": 89.0, "gpqa_diamond": 52.8},
        expected_source="open-r1 README (OpenR1-Distill-7B)",
        raw_subdir="all",
        notes=("open-r1 trains without packing; here rows are BFD-packed with a per-document mask and the "
               "loss is the token mean over the whole global batch (calculate_per_token_loss).",),
    ),
)


def get(name: str) -> Recipe:
    """The recipe called ``name`` (error lists the known names)."""
    for r in RECIPES:
        if r.name == name:
            return r
    raise KeyError(f"unknown recipe {name!r}; known: {', '.join(r.name for r in RECIPES)}")


def for_config(path: str | Path) -> Recipe | None:
    """The recipe whose 8-NPU YAML or CPU twin is ``path`` (by file name), else None."""
    name = Path(path).name
    for r in RECIPES:
        if name in (Path(r.config).name, Path(r.twin).name):
            return r
    return None


# ------------------------------------------------------------------------------ YAML facts

def _node(raw: dict, dotted: str, default: Any = None) -> Any:
    cur: Any = raw
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return default
        cur = cur[part]
    return cur


def global_batch(raw: dict) -> int:
    """Rows per optimizer step as MindFormers 1.9 counts them (base_trainer, semi-auto parallel):
    ``batch_size x data_parallel x gradient_accumulation_steps`` (x micro_batch_interleave_num)."""
    return (int(_node(raw, "runner_config.batch_size", 1)) * int(_node(raw, "parallel_config.data_parallel", 1))
            * int(_node(raw, "runner_config.gradient_accumulation_steps", 1) or 1)
            * int(raw.get("micro_batch_interleave_num", 1) or 1))


def devices(raw: dict) -> int:
    """NPUs the layout needs: dp x mp x cp x pp."""
    pc = raw.get("parallel_config") or {}
    return (int(pc.get("data_parallel", 1)) * int(pc.get("model_parallel", 1)) * int(pc.get("context_parallel", 1))
            * int(pc.get("pipeline_stage", 1)))


def training_settings(raw: dict) -> dict[str, Any]:
    """The settings a model card should state, read from a MindFormers YAML."""
    mc = _node(raw, "model.model_config", {}) or {}
    lr = raw.get("lr_schedule") or {}
    opt = raw.get("optimizer") or {}
    wrap = raw.get("runner_wrapper") or {}
    pc = raw.get("parallel_config") or {}
    out: dict[str, Any] = {
        "sequence length": mc.get("seq_length"),
        "global batch (rows)": global_batch(raw),
        "per-device batch x data parallel x accumulation": (
            f"{_node(raw, 'runner_config.batch_size', 1)} x {pc.get('data_parallel', 1)} x "
            f"{_node(raw, 'runner_config.gradient_accumulation_steps', 1)}"),
        "layout": (f"dp{pc.get('data_parallel', 1)} x mp{pc.get('model_parallel', 1)} x "
                   f"cp{pc.get('context_parallel', 1)} x pp{pc.get('pipeline_stage', 1)}"),
        "epochs": _node(raw, "runner_config.epochs"),
        "optimizer": f"{opt.get('type')} betas {opt.get('betas')} eps {opt.get('eps')} "
                     f"weight decay {opt.get('weight_decay')}",
        "learning rate": lr.get("learning_rate"),
        "schedule": lr.get("type"),
        "warmup ratio": lr.get("warmup_ratio"),
        "min learning rate": lr.get("lr_end", 0.0 if "Cosine" in str(lr.get("type")) else None),
        "grad clip (max norm)": wrap.get("max_grad_norm") if wrap.get("use_clip_grad") else None,
        "loss": ("token mean over the global batch (calculate_per_token_loss)"
                 if raw.get("calculate_per_token_loss") else "mean of per-micro-batch token means"),
        "compute dtype": mc.get("compute_dtype"),
        "RoPE theta": None if mc.get("theta") is None else f"{float(mc['theta']):g}",
        "tied embeddings": bool(mc.get("tie_word_embeddings", False)),
    }
    pet = mc.get("pet_config")
    if pet:
        out["LoRA"] = (f"rank {pet.get('lora_rank')}, alpha {pet.get('lora_alpha')}, dropout "
                       f"{pet.get('lora_dropout')}, targets {pet.get('target_modules')}")
    return {k: v for k, v in out.items() if v is not None}


# ------------------------------------------------------------------------ wall-time model

NPU_PEAK_BF16 = 313e12
"""Ascend 910B dense bf16 FLOP/s per NPU (910B2-class), as in docs/scaling.md."""


def matmul_params(raw: dict) -> float:
    """Parameters that take part in matmuls per token: the layers plus ``lm_head`` (the embedding
    look-up is not a matmul; a tied ``lm_head`` is still one)."""
    mc = _node(raw, "model.model_config", {}) or {}
    d, layers = int(mc["hidden_size"]), int(mc["num_layers"])
    heads = int(mc["num_heads"])
    kv = int(mc.get("n_kv_heads") or heads)
    head_dim = d // heads
    attn = d * (d + 2 * kv * head_dim + d)
    mlp = 3 * d * int(mc["intermediate_size"])
    return layers * (attn + mlp) + int(mc["vocab_size"]) * d


def flops_per_token(raw: dict, mean_context: float) -> float:
    """Model FLOPs per trained token (docs/scaling.md): ``6 N + 12 L d s_ctx`` for a full fine-tune.
    LoRA skips the frozen weights' gradients: ``4 N + 8 L d s_ctx`` (forward + activation grads)."""
    mc = _node(raw, "model.model_config", {}) or {}
    d, layers = int(mc["hidden_size"]), int(mc["num_layers"])
    lora = bool(mc.get("pet_config"))
    k = 4.0 if lora else 6.0
    return k * matmul_params(raw) + (2 * k) * layers * d * mean_context


def estimate_hours(raw: dict, tokens_per_epoch: float, mfu: float = 0.4, mean_context: float = 2500.0,
                   n_devices: int | None = None) -> float:
    """Paper wall time (hours) of all epochs: ``epochs x tokens x F / (MFU x devices x peak)``.

    ``tokens_per_epoch``: padded tokens of the packed set (rows x seq_length; BFD fills >99.5%).
    ``mean_context``: mean attended context per token (half the token-weighted document length,
    capped at seq_length). Not a measurement: no NPU here.
    """
    n = n_devices or devices(raw)
    epochs = float(_node(raw, "runner_config.epochs", 1))
    ctx = min(mean_context, float(_node(raw, "model.model_config.seq_length", mean_context)) / 2)
    return epochs * tokens_per_epoch * flops_per_token(raw, ctx) / (mfu * n * NPU_PEAK_BF16) / 3600


def steps(raw: dict, packed_rows: int) -> int:
    """Optimizer steps of the whole run (drop_remainder: a last partial global batch is dropped)."""
    return int(_node(raw, "runner_config.epochs", 1)) * (packed_rows // global_batch(raw))


# ------------------------------------------------------------------------------ commands

def commands(r: Recipe) -> dict[str, str]:
    """The exact commands of a recipe on 8 NPUs (paths under data/, output/, runs/)."""
    raw = r.yaml()
    seq = int(_node(raw, "model.model_config.seq_length"))
    slug = r.name
    fmt_args = " ".join(r.preprocess_args)
    data_id = r.data.split(" ")[0]
    download = (f"huggingface-cli download {data_id} --repo-type dataset --local-dir data/{slug}/raw && "
                f"huggingface-cli download {r.student} --local-dir /models/{r.student.split('/')[-1]}")
    data = (f"distill preprocess --input data/{slug}/raw/{r.raw_subdir} --format {r.data_format} {fmt_args} "
            f"--tokenizer /models/{r.student.split('/')[-1]} --seq-length {seq} --output data/{slug}/packed")
    data = " ".join(data.split())
    import yaml

    handled = yaml.safe_load((REPO / r.data_configs[1]).read_text())["train_dataset"]["data_loader"]["dataset_path"]
    data_yaml = (f"python toolkit/data_preprocess/huggingface/datasets_preprocess.py --config {r.data_configs[0]} "
                 f"--save_path {handled} && python toolkit/data_preprocess/huggingface/datasets_preprocess.py "
                 f"--config {r.data_configs[1]} --save_path data/{slug}/packed")
    n = devices(raw)
    finetune = (f'bash scripts/msrun_launcher.sh "run_mindformer.py --config {r.config} --run_mode finetune '
                f'--load_checkpoint /models/{r.student.split("/")[-1]} --train_dataset_dir data/{slug}/packed '
                f'--output_dir output/{slug}" {n}')
    unify = (f"python -c \"import mindspore as ms; ms.unified_safetensors('output/{slug}/checkpoint', "
             f"'output/{slug}/strategy', 'output/{slug}/unified')\"")
    verb = "merge-lora" if r.lora else "mf-to-hf"
    convert = (f"distill convert {verb} output/{slug}/unified runs/{slug}-hf --config {r.config} "
               f"--tokenizer /models/{r.student.split('/')[-1]}")
    sys_prompt = ' --system-prompt "$(cat configs/open_r1_system_prompt.txt)"' if r.name == "openr1-distill-7b" else ""
    evaluate = (f"distill eval --preset open-r1 --tasks {','.join(r.eval_tasks)} --engine vllm "
                f"--model runs/{slug}-hf{sys_prompt} --output runs/eval-{slug}")
    card = (f"distill convert {verb} output/{slug}/unified runs/{slug}-hf --config {r.config} "
            f"--tokenizer /models/{r.student.split('/')[-1]} --eval-run runs/eval-{slug}")
    compare = f"distill eval compare runs/eval-{slug} --reference"
    return {"download": download, "data": data, "data (MindFormers YAMLs)": data_yaml, "finetune": finetune, "unify": unify,
            "convert": convert, "eval": evaluate, "model card with results": card, "compare": compare}


def table_rows() -> list[list[str]]:
    """The README's recipe table: recipe, source, student, data, seq length, global batch, expected."""
    rows = []
    for r in RECIPES:
        raw = r.yaml()
        exp = ", ".join(f"{t} {v:g}" for t, v in r.expected.items()) or "-"
        rows.append([f"`{r.name}`", r.source, r.student + (" (LoRA)" if r.lora else ""), r.data,
                     str(_node(raw, "model.model_config.seq_length")), str(global_batch(raw)),
                     f"{exp}; {r.expected_source}" if r.expected else f"-; {r.expected_source}",
                     f"`{r.config}`", f"`distill recipe show {r.name}`"])
    return rows


TABLE_HEADERS = ["recipe", "source", "student", "data", "seq length", "global batch (rows)",
                 "expected pass@1 (%)", "YAML", "commands"]


# ------------------------------------------------------------------------------ CLI

def _cmd_list(a: argparse.Namespace) -> int:
    from distilled.plots import md_table

    print(md_table(TABLE_HEADERS, table_rows()))
    return 0


@dataclass
class ShowArgs:
    """``distill recipe show``'s options (declared once: :mod:`distilled.settings`)."""

    name: str = option(help="recipe name (`distill recipe list`)", positional=True)
    tokens: float | None = option(None, help="padded tokens per epoch for the estimate")
    mean_context: float = option(2500.0, help="mean attended context per token (default 2500, docs/scaling.md)")


def _cmd_show(ns: argparse.Namespace) -> int:
    a = from_args(ShowArgs, ns)
    try:
        r = get(a.name)
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    raw = r.yaml()
    print(f"# {r.title}\nsource: {r.source}\nstudent: {r.student}\ndata: {r.data} (--format {r.data_format})")
    print(f"config: {r.config} (CPU twin {r.twin})\ndata YAMLs: {', '.join(r.data_configs)}")
    for k, v in training_settings(raw).items():
        print(f"  {k}: {v}")
    for k, v in commands(r).items():
        print(f"\n# {k}\n{v}")
    if a.tokens:
        for mfu in (0.3, 0.4):
            h = estimate_hours(raw, a.tokens, mfu, a.mean_context)
            print(f"\npaper estimate at {mfu:.0%} MFU on {devices(raw)} x 910B: {h:.1f} h "
                  f"({a.tokens:.3g} tokens/epoch, mean context {a.mean_context:g})")
    return 0


def register_cli(sub: Any) -> None:
    """``distill recipe list|show``."""
    p = sub.add_parser("recipe", help="the published runs this project reproduces (docs/recipes.md)")
    rsub = p.add_subparsers(dest="recipe_command", metavar="{list,show}")
    lp = rsub.add_parser("list", help="the recipe table")
    lp.set_defaults(func=_cmd_list)
    sp = rsub.add_parser("show", help="one recipe: settings, commands, wall-time estimate")
    add_arguments(sp, ShowArgs)
    sp.set_defaults(func=_cmd_show)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

