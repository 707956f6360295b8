"""The logic behind ``run_mindformer.py``: MindFormers' own CLI, this project's checks and shims,
then MindFormers' own ``Trainer``.

Why not MindFormers' ``run_mindformer.py`` as is: in 1.9 it (1) never registers a custom data
handler where ``HFDataLoader`` looks for it, (2) cannot run on CPU without the shims in
:mod:`distilled.train.mindformers_compat`, (3) trains packed rows with wrong RoPE positions and, without
flash attention, with a broken mask, and (4) starts a multi-hour job before discovering that the
dataset path is wrong, a column is missing, the packed rows are longer than ``seq_length`` or the
tokens do not fit the vocabulary. This module fixes those and otherwise keeps MindFormers' CLI and
Trainer, so a cluster user's command line is unchanged.

Per-step figures go to ``<output_dir>/loss_rank_<R>.jsonl`` (one JSON object per optimizer step:
``step, epoch, loss, global_norm, lr, overflow, step_time_s, tokens, tokens_per_s, rank,
peak_rss_mb``; ``tokens``/``tokens_per_s`` are this rank's); rank 0's
file is also ``<output_dir>/loss.jsonl``, the one the demo plots.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from distilled.paths import REPO_ROOT as REPO

PACKED_COLUMNS = ("input_ids", "labels", "actual_seq_len")
PLAIN_COLUMNS = ("input_ids", "labels")


class FinetuneConfigError(ValueError):
    """A YAML/data mismatch found before training; the message names the YAML key to fix."""


def _str2bool_or_str(value: str) -> bool | str:
    low = str(value).lower()
    if low in {"true", "1", "yes"}:
        return True
    if low in {"false", "0", "no"}:
        return False
    return value  # MindFormers also accepts a checkpoint name for --resume_training


def _str2bool(value: str) -> bool:
    v = _str2bool_or_str(value)
    if not isinstance(v, bool):
        raise argparse.ArgumentTypeError(f"expected true/false, got {value!r}")
    return v


def build_arg_parser() -> argparse.ArgumentParser:
    """MindFormers 1.9 ``run_mindformer.py`` arguments (same names and meaning).

    Why plain ``argparse`` and not :mod:`distilled.settings`: these flags are MindFormers' contract,
    copied name for name, and each one overrides a YAML key (``MindFormerConfig``), not a field of a
    config class of ours; the YAML is the one place the settings live.
    """
    p = argparse.ArgumentParser(
        prog="run_mindformer.py",
        description="MindFormers-compatible training entry (project handlers, CPU shims, packed-data fix, "
                    "pre-flight checks, then MindFormers' Trainer). Extra `--a.b.c VALUE` pairs override YAML keys.")
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument("--mode", type=int, default=None, help="0 GRAPH_MODE, 1 PYNATIVE_MODE (context.mode)")
    p.add_argument("--device_id", type=int, default=None)
    p.add_argument("--device_target", default=None, help="Ascend, GPU or CPU (context.device_target)")
    p.add_argument("--run_mode", default=None, help="train, finetune, eval or predict")
    p.add_argument("--do_eval", type=_str2bool, default=None)
    p.add_argument("--train_dataset_dir", default=None,
                   help="packed dataset directory (sets train_dataset.data_loader.dataset_path)")
    p.add_argument("--eval_dataset_dir", default=None)
    p.add_argument("--predict_data", nargs="+", default=None)
    p.add_argument("--predict_batch_size", type=int, default=None)
    p.add_argument("--load_checkpoint", default=None,
                   help="checkpoint file/dir: HF safetensors dir, MF safetensors, or an output checkpoint dir")
    p.add_argument("--src_strategy_path_or_dir", default=None)
    p.add_argument("--auto_trans_ckpt", type=_str2bool, default=None)
    p.add_argument("--transform_process_num", type=int, default=None)
    p.add_argument("--only_save_strategy", type=_str2bool, default=None)
    p.add_argument("--resume_training", type=_str2bool_or_str, default=None,
                   help="True (resume from load_checkpoint's last checkpoint) or a checkpoint file name")
    p.add_argument("--strategy_load_checkpoint", default=None)
    p.add_argument("--remote_save_url", default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--use_parallel", type=_str2bool, default=None)
    p.add_argument("--profile", type=_str2bool, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--gradient_accumulation_steps", type=int, default=None)
    p.add_argument("--sink_mode", type=_str2bool, default=None)
    p.add_argument("--num_samples", type=int, default=None)
    p.add_argument("--output_dir", default=None)
    p.add_argument("--register_path", default=None,
                   help="folder added to sys.path (MindFormers semantics) before handlers are registered")
    p.add_argument("--no_packed_shim", action="store_true",
                   help="do not fix RoPE positions/mask for packed rows (for comparison only)")
    p.add_argument("--no_global_token_mean", action="store_true",
                   help="keep MindFormers' per-rank token mean under data parallel (for comparison only)")
    p.add_argument("--skip_checks", action="store_true", help="skip the pre-flight data checks")
    return p


def _parse_value(text: str) -> Any:
    """YAML scalar semantics for ``--a.b value`` overrides (ints, floats, bools, lists)."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def world_size_from_env() -> int:
    """Worker count when started by msrun (``MS_WORKER_NUM``), else 1."""
    for key in ("MS_WORKER_NUM", "RANK_SIZE"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 1


def rank_from_env() -> int:
    for key in ("MS_NODE_ID", "RANK_ID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def _resolve(path: str) -> str:
    """Relative paths: the working directory first, then the repo root (MF resolves against the
    script's folder; both agree when run from the repo root)."""
    if not path or os.path.isabs(path) or os.path.exists(path):
        return os.path.abspath(path) if path else path
    alt = REPO / path
    return str(alt) if alt.exists() else os.path.abspath(path)


def load_config(argv: list[str] | None = None):
    """Parse MindFormers' CLI and return ``(MindFormerConfig, args)`` with every override applied."""
    parser = build_arg_parser()
    args, rest = parser.parse_known_args(argv)
    rest = [piece for item in rest for piece in item.split("=", 1)]
    if len(rest) % 2:
        parser.error(f"extra arguments must be `--key value` pairs, got {rest}")

    if args.register_path:
        reg = _resolve(args.register_path)
        os.environ["REGISTER_PATH"] = reg
        if reg not in sys.path:
            sys.path.append(reg)

    from mindformers.tools.register import MindFormerConfig

    cfg_path = _resolve(args.config)
    if not os.path.isfile(cfg_path):
        raise FinetuneConfigError(f"--config {args.config}: no such file")
    config = MindFormerConfig(cfg_path)
    ctx = config.context
    for flag, key in (("device_id", "device_id"), ("device_target", "device_target"), ("mode", "mode")):
        if getattr(args, flag) is not None:
            ctx[key] = getattr(args, flag)
    simple = ("run_mode", "do_eval", "seed", "use_parallel", "load_checkpoint", "src_strategy_path_or_dir",
              "auto_trans_ckpt", "transform_process_num", "only_save_strategy", "resume_training",
              "remote_save_url", "profile", "output_dir")
    for key in simple:
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    if args.strategy_load_checkpoint is not None:
        config.parallel.strategy_ckpt_load_file = args.strategy_load_checkpoint
    for key in ("epochs", "batch_size", "gradient_accumulation_steps", "sink_mode"):
        if getattr(args, key) is not None:
            config.runner_config[key] = getattr(args, key)
    if args.train_dataset_dir:
        config.train_dataset.data_loader.dataset_path = args.train_dataset_dir
    if args.eval_dataset_dir and config.get("eval_dataset"):
        config.eval_dataset.data_loader.dataset_path = args.eval_dataset_dir
    if args.num_samples is not None and config.get("train_dataset"):
        config.train_dataset.data_loader.num_samples = args.num_samples
    if args.predict_data is not None:
        config.input_data = args.predict_data if len(args.predict_data) > 1 else args.predict_data[0]
    if args.predict_batch_size is not None:
        config.predict_batch_size = args.predict_batch_size
    while rest:
        key, value = rest.pop(0), rest.pop(0)
        if not key.startswith("--"):
            raise FinetuneConfigError(f"override {key!r}: custom keys must start with --")
        parts = key[2:].split(".")
        node = config
        for part in parts[:-1]:
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]  # e.g. --callbacks.1.save_checkpoint_steps 100
                continue
            if isinstance(node, list) or part not in node:
                raise FinetuneConfigError(f"override {key}: {part!r} is not a key of the YAML")
            node = node[part]
        node[parts[-1]] = _parse_value(value)
    if config.run_mode not in ("train", "finetune", "eval", "predict"):
        raise FinetuneConfigError(f"run_mode must be train, finetune, eval or predict, got {config.run_mode!r}")
    # paths are resolved once, so every rank sees the same absolute paths
    if config.get("load_checkpoint"):
        config.load_checkpoint = _resolve(str(config.load_checkpoint))
    if config.get("output_dir"):
        config.output_dir = os.path.abspath(str(config.output_dir))
    dl = config.get("train_dataset", {}).get("data_loader", {}) if config.get("train_dataset") else {}
    if dl and dl.get("dataset_path"):
        dl["dataset_path"] = _resolve(str(dl["dataset_path"]))
    return config, args


def _get(config: Any, dotted: str, default: Any = None) -> Any:
    node = config
    for part in dotted.split("."):
        if node is None or not hasattr(node, "get"):
            return default
        node = node.get(part)
    return default if node is None else node


def adapt_to_world(config: Any, world: int) -> list[str]:
    """Make the YAML's parallel settings match how the job was started; return notes to print.

    One process (no msrun): data_parallel becomes 1 and use_parallel False (the tiny YAML says
    data_parallel 2 for its msrun run). Under msrun: use_parallel True, and on CPU a full
    checkpoint must be sliced per rank, which MindFormers 1.9 only allows with auto_trans_ckpt.
    """
    notes = []
    pc = config.parallel_config
    if world == 1:
        if config.get("use_parallel"):
            notes.append("one process: use_parallel True -> False (start with msrun for parallel runs)")
            config.use_parallel = False
        if int(pc.get("data_parallel", 1)) != 1:
            notes.append(f"one process: parallel_config.data_parallel {pc.data_parallel} -> 1")
            pc.data_parallel = 1
    else:
        if not config.get("use_parallel"):
            notes.append(f"{world} workers: use_parallel False -> True")
            config.use_parallel = True
        dp, mp, pp = int(pc.get("data_parallel", 1)), int(pc.get("model_parallel", 1)), int(pc.get("pipeline_stage", 1))
        cp = int(pc.get("context_parallel", 1))
        if dp * mp * pp * cp != world:
            raise FinetuneConfigError(
                f"parallel_config: data_parallel {dp} x model_parallel {mp} x context_parallel {cp} x "
                f"pipeline_stage {pp} = {dp * mp * pp * cp}, but {world} workers were started")
    return notes


def _dataset_columns_and_stats(path: str) -> tuple[list[str], int | None, int | None, int, int | None]:
    """Columns, longest input_ids row, largest token id, row count and most documents in one row,
    read memory-mapped (no row is decoded into Python)."""
    import datasets
    import pyarrow.compute as pc

    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        raise FinetuneConfigError(f"train_dataset.data_loader.dataset_path: {path} is a DatasetDict "
                                  f"({list(ds)}); point it at one split's directory")
    cols = list(ds.column_names)
    longest = max_id = max_docs = None
    if "input_ids" in cols and len(ds):
        table = ds.data.table
        ids = table.column("input_ids")
        longest = int(pc.max(pc.list_value_length(ids)).as_py())
        max_id = pc.max(pc.list_flatten(ids)).as_py()
        max_id = None if max_id is None else int(max_id)
        if "actual_seq_len" in cols:
            max_docs = int(pc.max(pc.list_value_length(table.column("actual_seq_len"))).as_py() or 0)
    return cols, longest, max_id, len(ds), max_docs


def _tokenizer_vocab(config: Any) -> tuple[int, str] | None:
    """Size of the tokenizer that goes with the checkpoint, if one is found beside it."""
    candidates = []
    tok = _get(config, "processor.tokenizer.vocab_file") or _get(config, "processor.tokenizer.tokenizer_file")
    if tok:
        candidates.append(Path(str(tok)).parent)
    if config.get("load_checkpoint") and os.path.isdir(str(config.load_checkpoint)):
        candidates.append(Path(str(config.load_checkpoint)))
    for d in candidates:
        f = d / "tokenizer.json"
        if f.is_file():
            from tokenizers import Tokenizer

            return Tokenizer.from_file(str(f)).get_vocab_size(with_added_tokens=True), str(f)
    return None


def validate_config(config: Any, world: int = 1) -> dict:
    """Pre-flight checks; raise :class:`FinetuneConfigError` naming the YAML key to fix.

    Returns facts found on the way (columns, rows, longest row, largest id) for the log.
    """
    facts: dict[str, Any] = {}
    mc = _get(config, "model.model_config")
    if mc is None:
        raise FinetuneConfigError("model.model_config: missing")
    device = str(_get(config, "context.device_target", "Ascend"))
    if config.run_mode in ("train", "finetune"):
        dl = _get(config, "train_dataset.data_loader")
        if dl is None:
            raise FinetuneConfigError("train_dataset.data_loader: missing")
        path = dl.get("dataset_path") or dl.get("path")
        if not path:
            raise FinetuneConfigError("train_dataset.data_loader.dataset_path: not set (or pass --train_dataset_dir)")
        if not os.path.exists(str(path)):
            raise FinetuneConfigError(f"train_dataset.data_loader.dataset_path: {path} does not exist "
                                      "(run `distill preprocess` first, or pass --train_dataset_dir)")
        if dl.get("split") is not None and dl.get("load_func") == "load_from_disk":
            raise FinetuneConfigError("train_dataset.data_loader.split: remove it; MindFormers 1.9 passes it "
                                      "to datasets.load_from_disk, which rejects it")
        cols, longest, max_id, rows, max_docs = _dataset_columns_and_stats(str(path))
        facts.update(columns=cols, rows=rows, longest_row=longest, max_token_id=max_id, max_docs_per_row=max_docs)
        packed_mode = bool(dl.get("create_attention_mask", False))
        need = PACKED_COLUMNS if packed_mode else PLAIN_COLUMNS
        missing = [c for c in need if c not in cols]
        if missing:
            hint = ("packed data (create_attention_mask: True) needs input_ids, labels, actual_seq_len"
                    if packed_mode else "unpacked data needs input_ids and labels")
            raise FinetuneConfigError(
                f"train_dataset.data_loader.dataset_path: {path} has columns {cols}, missing {missing}; {hint}")
        if not packed_mode and "actual_seq_len" in cols:
            raise FinetuneConfigError(
                "train_dataset.data_loader.create_attention_mask: must be True for packed data (the dataset has "
                "actual_seq_len); without it every packed row trains as one long document")
        seq = int(mc.get("seq_length") or 0)
        if longest is not None and longest > seq:
            raise FinetuneConfigError(
                f"model.model_config.seq_length: {seq} is smaller than the packed rows ({longest} tokens in "
                f"{path}); set it to the packing length")
        vocab = int(mc.get("vocab_size") or 0)
        if max_id is not None and max_id >= vocab:
            raise FinetuneConfigError(
                f"model.model_config.vocab_size: {vocab} but the data holds token id {max_id}; "
                "use the tokenizer's model or a larger vocab_size")
        tok = _tokenizer_vocab(config)
        if tok is not None and tok[0] > vocab:
            raise FinetuneConfigError(
                f"model.model_config.vocab_size: {vocab} is smaller than the tokenizer's {tok[0]} tokens ({tok[1]})")
        compressed = bool(dl.get("create_compressed_eod_mask", False))
        loader_cols = (["input_ids", "labels", "loss_mask", "position_ids",
                        "actual_seq_len" if compressed else "attention_mask"] if packed_mode else None)
        from distilled.kd import KD_COLUMNS, uses_kd

        if loader_cols is not None and uses_kd(config):  # logits distillation: two more packed columns
            lacking = [c for c in KD_COLUMNS if c not in cols]
            if lacking:
                raise FinetuneConfigError(
                    f"train_dataset.data_loader.dataset_path: {path} has no {lacking} columns, which this KD YAML "
                    "trains on; build the data with `distill preprocess ... --kd-sidecar FILE`")
            loader_cols = loader_cols + list(KD_COLUMNS)
        yaml_cols = _get(config, "train_dataset.input_columns")
        if loader_cols is not None and yaml_cols is not None and list(yaml_cols) != loader_cols:
            raise FinetuneConfigError(
                f"train_dataset.input_columns: {list(yaml_cols)} but the packed loader yields {loader_cols} "
                f"(create_compressed_eod_mask: {compressed}); use exactly those, in that order")
        cak = _get(config, "train_dataset.construct_args_key")
        if loader_cols is not None and cak is not None and list(cak) != loader_cols:
            raise FinetuneConfigError(f"train_dataset.construct_args_key: {list(cak)} must equal {loader_cols}")
        if compressed:
            if not mc.get("use_eod_attn_mask_compression", False):
                raise FinetuneConfigError("model.model_config.use_eod_attn_mask_compression: must be True with "
                                          "create_compressed_eod_mask (the model must read actual_seq_len)")
            docs = facts.get("max_docs_per_row")
            limit = int(dl.get("compressed_eod_mask_length", 128))
            if docs is not None and docs > limit:
                raise FinetuneConfigError(
                    f"train_dataset.data_loader.compressed_eod_mask_length: {limit} but a packed row holds {docs} "
                    "documents; raise it to at least that")
        if packed_mode and not mc.get("input_sliced_sig", False):
            raise FinetuneConfigError("model.model_config.input_sliced_sig: must be True for packed data "
                                      "(labels are already shifted; False would cut one more token)")
        if world > 1 and device == "CPU" and dl.get("use_broadcast_data", True):
            raise FinetuneConfigError("train_dataset.data_loader.use_broadcast_data: must be False on CPU "
                                      "(the broadcast needs ops.Barrier, which has no CPU kernel)")
    check_per_token_loss(config, world)
    if device == "CPU":
        if mc.get("use_flash_attention", False):
            raise FinetuneConfigError("model.model_config.use_flash_attention: must be False on CPU")
        if not mc.get("use_rope_slice", False):
            raise FinetuneConfigError("model.model_config.use_rope_slice: must be True on CPU "
                                      "(the batched RoPE matmul cannot broadcast there)")
        if str(mc.get("compute_dtype", "float32")) not in ("float32", "fp32"):
            raise FinetuneConfigError("model.model_config.compute_dtype: use float32 on CPU")
    return facts


def per_token_loss_enabled(config: Any) -> bool:
    """Whether both MindFormers 1.9 per-token keys are on (see :func:`check_per_token_loss`)."""
    return bool(config.get("calculate_per_token_loss")) and bool(
        _get(config, "runner_wrapper.calculate_per_token_loss", False))


def check_per_token_loss(config: Any, world: int = 1) -> None:
    """Refuse a YAML whose loss would be a mean of per-micro-batch (or per-rank) means.

    Why: with ``gradient_accumulation_steps > 1`` MindFormers 1.9 wraps the net in
    ``GradAccumulationCell``, which sums each micro-batch's own token mean, so a micro-batch with
    10 trained tokens weighs as much as one with 400 (and the logged loss is GA x larger). Its own
    fix needs two keys: top-level ``calculate_per_token_loss`` (the Trainer hands it to the model,
    whose ``CrossEntropyLoss`` then returns numerator and denominator, to ``MFTrainOneStepCell``
    and to ``MFLossMonitor``) and ``runner_wrapper.calculate_per_token_loss``, the one
    ``_wrap_network_with_tool_cells_legacy`` reads to pick ``GradAccumulationCellWithTwoOutput``
    (only the semi/auto-parallel and pipeline paths copy the top-level key there). With only the
    first, accumulation crashes on the model's two outputs; with only the second, the model
    returns one mean and the accumulation cell fails. Several data-parallel workers need it too:
    then :func:`distilled.train.mindformers_compat.shim_global_token_mean_data_parallel` divides by the
    token count of all ranks.
    """
    top = bool(config.get("calculate_per_token_loss"))
    wrap = bool(_get(config, "runner_wrapper.calculate_per_token_loss", False))
    if top != wrap:
        raise FinetuneConfigError(
            f"calculate_per_token_loss: {top} but runner_wrapper.calculate_per_token_loss: {wrap}; MindFormers 1.9 "
            "reads both (the model and wrapper read the top-level key, gradient accumulation reads the "
            "runner_wrapper one): set both to True")
    if config.run_mode not in ("train", "finetune") or top:
        return
    gas = int(_get(config, "runner_config.gradient_accumulation_steps", 1) or 1)
    dp = int(_get(config, "parallel_config.data_parallel", 1) or 1)
    if gas > 1:
        raise FinetuneConfigError(
            f"runner_config.gradient_accumulation_steps: {gas} without calculate_per_token_loss averages per "
            "micro-batch (a micro-batch with few trained tokens weighs as much as a full one, and the logged "
            "loss is that many times larger); set calculate_per_token_loss: True and "
            "runner_wrapper.calculate_per_token_loss: True")
    if world > 1 and dp > 1:
        raise FinetuneConfigError(
            f"parallel_config.data_parallel: {dp} without calculate_per_token_loss averages per rank (a rank "
            "with few trained tokens weighs as much as a full one); set calculate_per_token_loss: True and "
            "runner_wrapper.calculate_per_token_loss: True")


_REGISTRY_TYPES = (
    ("trainer", "TRAINER"), ("runner_wrapper", "WRAPPER"), ("optimizer", "OPTIMIZER"), ("lr_schedule", "LR"),
    ("train_dataset.data_loader", "DATASET_LOADER"), ("train_dataset_task", "DATASET"),
    ("model.model_config", "CONFIG"), ("model.arch", "MODELS"),
)


def yaml_problems(path: str | os.PathLike) -> list[str]:
    """Check a finetune YAML against MindFormers 1.9's own config classes, without a device.

    * ``ConfigTemplate.apply_template`` (mindformers.tools.register.template): MF's schema of the
      top-level, ``runner_config``, ``parallel_config``, ``recompute_config``... sections; it
      raises on a key MF does not know;
    * every ``type:`` is registered in ``MindFormerRegister`` under its module type;
    * ``model.model_config`` keys are ``LlamaConfig``/``PretrainedConfig`` arguments (LlamaConfig
      takes ``**kwargs``, so a typo would otherwise be silently ignored);
    * ``optimizer``/``lr_schedule``/callbacks keys are arguments of their classes;
    * data-loader keys are ``HFDataLoaderConfig`` fields or arguments of ``datasets.<load_func>``.
    Returns human-readable problems naming the YAML key (empty list = valid).
    """
    import copy
    import inspect
    import re

    import yaml
    from mindformers.tools.register import MindFormerModuleType, MindFormerRegister
    from mindformers.tools.register.template import ConfigTemplate

    raw = yaml.safe_load(Path(path).read_text())
    problems: list[str] = []
    from distilled.kd import KD_ARCH, uses_kd

    kd = uses_kd(raw)
    if kd:  # registers KDLlamaForCausalLM and KDPackedDataLoader with MindFormerRegister
        import distilled.kd.mindformers_kd  # noqa: F401
    try:
        ConfigTemplate.apply_template(copy.deepcopy(raw))
    except (KeyError, ValueError, TypeError) as exc:
        problems.append(f"MindFormers ConfigTemplate: {exc}")

    def node(dotted: str) -> Any:
        cur = raw
        for part in dotted.split("."):
            cur = cur.get(part) if isinstance(cur, dict) else None
        return cur

    def accepted(cls: Any) -> tuple[set[str], bool]:
        names, var_kw = set(), False
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None:
                continue
            for p in inspect.signature(init).parameters.values():
                if p.kind == p.VAR_KEYWORD:
                    var_kw = True
                elif p.name != "self":
                    names.add(p.name)
            if not any(p.kind == p.VAR_KEYWORD for p in inspect.signature(init).parameters.values()):
                break
        return names, var_kw

    for dotted, kind in _REGISTRY_TYPES:
        block = node(dotted)
        if not isinstance(block, dict) or "type" not in block:
            problems.append(f"{dotted}.type: missing")
            continue
        module_type = getattr(MindFormerModuleType, kind)
        if not MindFormerRegister.is_exist(module_type, block["type"]):
            problems.append(f"{dotted}.type: {block['type']!r} is not a registered MindFormers {kind}")
    for i, cb in enumerate(raw.get("callbacks") or []):
        if not MindFormerRegister.is_exist(MindFormerModuleType.CALLBACK, cb.get("type")):
            problems.append(f"callbacks[{i}].type: {cb.get('type')!r} is not a registered callback")
            continue
        names, _ = accepted(MindFormerRegister.get_cls(MindFormerModuleType.CALLBACK, cb["type"]))
        for k in cb:
            if k != "type" and k not in names:
                problems.append(f"callbacks[{i}].{k}: not an argument of {cb['type']}")
    for dotted, kind in (("optimizer", "OPTIMIZER"), ("lr_schedule", "LR")):
        block = node(dotted) or {}
        if not MindFormerRegister.is_exist(getattr(MindFormerModuleType, kind), block.get("type")):
            continue
        names, var_kw = accepted(MindFormerRegister.get_cls(getattr(MindFormerModuleType, kind), block["type"]))
        if not var_kw:
            for k in block:
                if k not in ("type", "learning_rate") and k not in names:
                    problems.append(f"{dotted}.{k}: not an argument of {block['type']}")
    mc = node("model.model_config") or {}
    from mindformers import LlamaConfig
    from mindformers.models.configuration_utils import PretrainedConfig

    llama_names = set(inspect.signature(LlamaConfig.__init__).parameters)
    pretrained_names = set(re.findall(r"kwargs\.pop\(\"(\w+)\"", inspect.getsource(PretrainedConfig.__init__)))
    pretrained_names |= {"tie_word_embeddings", "type"}
    for k in mc:
        if kd and k in ("kd_alpha", "kd_temperature", "kd_top_k") and (node("model.arch") or {}).get("type") == KD_ARCH:
            continue  # read by KDLlamaForCausalLM (distilled/kd/mindformers_kd.py)
        if k not in llama_names and k not in pretrained_names:
            problems.append(f"model.model_config.{k}: not a LlamaConfig argument (MindFormers would ignore it)")
    dl = node("train_dataset.data_loader") or {}
    if dl.get("type") in ("CommonDataLoader", "HFDataLoader"):
        import dataclasses

        import datasets
        from mindformers.dataset.dataloader.hf_dataloader import HFDataLoaderConfig

        fields = {f.name for f in dataclasses.fields(HFDataLoaderConfig)} | {
            "type", "load_func", "handler", "packing", "adaptor_config", "size", "dataset_state_dir",
            "save_step", "resume_step", "batch_size", "streaming"}
        fn = getattr(datasets, str(dl.get("load_func", "load_dataset")), None)
        if fn is None:
            problems.append(f"train_dataset.data_loader.load_func: datasets has no {dl.get('load_func')!r}")
        else:
            load_args = set(inspect.signature(fn).parameters)
            for k in dl:
                if k not in fields and k not in load_args:
                    problems.append(f"train_dataset.data_loader.{k}: neither an HFDataLoader option nor an "
                                    f"argument of datasets.{dl.get('load_func', 'load_dataset')}")
    return problems


def _global_step(cb: Any) -> int:
    """The optimizer's step counter: continues across a resume (MindFormers restarts
    ``cur_step_num`` at 1 after resuming and keeps the offset in a config copy we cannot see)."""
    net = cb.get("train_network") if hasattr(cb, "get") else None
    opt = getattr(net, "optimizer", None) or (cb.get("optimizer") if hasattr(cb, "get") else None)
    gs = getattr(opt, "global_step", None)
    if gs is not None:
        try:
            import numpy as np

            return int(np.asarray(gs.asnumpy()).reshape(-1)[0])
        except Exception:  # noqa: BLE001 - fall back to MindSpore's own counter
            pass
    return int(cb.cur_step_num)


def make_loss_callback(output_dir: str, rank: int, tokens_per_step: int):
    """A MindSpore callback writing one JSON line per step (see module docstring).

    Why: MFLossMonitor only logs human-readable text; the demo, the bench and the tests need the
    loss curve, the global norm (identical on all data-parallel ranks when they are in sync) and
    tokens/s without parsing logs.
    """
    from mindspore.train.callback import Callback

    from distilled.io_utils import JsonlAppender

    class LossJsonlMonitor(Callback):
        def __init__(self) -> None:
            super().__init__()
            os.makedirs(output_dir, exist_ok=True)
            self.paths = [os.path.join(output_dir, f"loss_rank_{rank}.jsonl")]
            if rank == 0:
                self.paths.append(os.path.join(output_dir, "loss.jsonl"))
            self.writers = [JsonlAppender(p) for p in self.paths]
            self.t0 = time.perf_counter()

        def on_train_step_begin(self, run_context: Any) -> None:
            self.t0 = time.perf_counter()
            self.c0 = time.process_time()

        def on_train_step_end(self, run_context: Any) -> None:
            import resource

            import numpy as np

            cb = run_context.original_args()
            dt = time.perf_counter() - self.t0
            cpu = time.process_time() - getattr(self, "c0", time.process_time())
            out = cb.net_outputs
            vals = list(out) if isinstance(out, (tuple, list)) else [out]

            def num(x: Any) -> Any:
                if x is None:
                    return None
                a = np.asarray(x.asnumpy() if hasattr(x, "asnumpy") else x)
                return float(a.mean()) if a.dtype != np.bool_ else bool(a.any())

            rec = {
                "step": _global_step(cb),
                "epoch": int(cb.cur_epoch_num),
                "loss": num(vals[0]),
                "overflow": num(vals[1]) if len(vals) > 1 else None,
                "lr": num(vals[3]) if len(vals) > 3 else None,
                "global_norm": num(vals[4]) if len(vals) > 4 else None,
                "step_time_s": round(dt, 6),
                "cpu_time_s": round(cpu, 6),  # this process, all threads: robust on a shared machine
                "tokens": tokens_per_step,
                "tokens_per_s": tokens_per_step / dt if dt > 0 else None,
                "rank": rank,
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "time": time.time(),
            }
            for w in self.writers:
                w.write(rec)

        def on_train_end(self, run_context: Any) -> None:
            for w in self.writers:
                w.close()

    return LossJsonlMonitor()


def register_project_handlers() -> None:
    """Make this project's data handlers visible to MindFormers' HFDataLoader (it looks them up as
    attributes of ``mindformers.dataset.handler`` only). ``handlers`` ships beside ``distilled``:
    failing to import it is an error, not a silent "not found"."""
    import handlers

    handlers.register_with_mindformers()


SHIM_FUNCTIONS = {
    "packed_mask": "apply_packed_mask_shim",
    "global_token_mean_data_parallel": "shim_global_token_mean_data_parallel",
    "grad_accumulation_data_parallel": "shim_grad_accumulation_data_parallel",
}


def shims_for(config: Any, no_packed_shim: bool = False, no_global_token_mean: bool = False) -> list[str]:
    """Which :mod:`distilled.train.mindformers_compat` shims this YAML needs, in the order they apply.

    ``"cpu"`` (all of ``apply_cpu_shims``) only on CPU; ``packed_mask`` only for packed data on
    the non-flash path (the only path that adds the 0/1 mask to the scores; flash attention and
    the compressed EOD mask already mask per document); ``global_token_mean_data_parallel`` with
    the per-token keys (inert on one rank and in semi/auto parallel);
    ``grad_accumulation_data_parallel`` with GA > 1 (MF 1.9 resets GA to 1 outside semi/auto
    parallel; the shim defers to MF there).
    """
    names = []
    if str(_get(config, "context.device_target", "Ascend")) == "CPU":
        names.append("cpu")
    packed = bool(_get(config, "train_dataset.data_loader.create_attention_mask", False))
    if packed and not _get(config, "model.model_config.use_flash_attention", False) and not no_packed_shim:
        names.append("packed_mask")
    if per_token_loss_enabled(config) and not no_global_token_mean:
        names.append("global_token_mean_data_parallel")
    if int(_get(config, "runner_config.gradient_accumulation_steps", 1) or 1) > 1:
        names.append("grad_accumulation_data_parallel")
    return names


def run_scheduler(argv: list[str] | None = None) -> int:
    """The msrun scheduler process: host the cluster's meta server, nothing else.

    Why: msrun starts the training script once more as the scheduler (``MS_ROLE=MS_SCHED``), and
    MindFormers' own script then imports MindFormers (about 9 s of CPU here), reads the YAML and
    builds the whole context only to reach ``mindspore.communication.init()``, which, for the
    scheduler, runs the meta server until the workers are done. Going straight there (with the
    YAML's ``context.device_target``, as MindFormers would set it) saved about 5 s per 2-worker
    launch on this 2-core machine (43 s -> 38 s for the LoRA msrun test) and keeps the scheduler
    small; the workers are untouched.
    """
    import mindspore as ms
    import yaml
    from mindspore.communication import init

    args, _ = build_arg_parser().parse_known_args(argv)
    with open(args.config, encoding="utf-8") as f:
        raw = yaml.safe_load(f) or {}
    target = args.device_target or (raw.get("context") or {}).get("device_target", "Ascend")
    ms.set_context(device_target=target)
    init()
    return 0


def run(argv: list[str] | None = None) -> int:
    """Entry of ``run_mindformer.py``: parse, adapt, check, shim, train. Returns an exit code."""
    os.environ.setdefault("GLOG_v", "3")
    if os.environ.get("MS_ROLE") == "MS_SCHED":
        return run_scheduler(argv)
    try:
        config, args = load_config(argv)
        world = world_size_from_env()
        rank = rank_from_env()
        notes = adapt_to_world(config, world)
        device = str(_get(config, "context.device_target", "Ascend"))
        facts = {} if args.skip_checks else validate_config(config, world)
    except FinetuneConfigError as exc:
        print(f"run_mindformer.py: config error: {exc}", file=sys.stderr)
        return 2

    from distilled.train import mindformers_compat as compat

    applied = []
    for name in shims_for(config, no_packed_shim=args.no_packed_shim, no_global_token_mean=args.no_global_token_mean):
        if name == "cpu":
            applied += compat.apply_cpu_shims()
        else:
            getattr(compat, SHIM_FUNCTIONS[name])()
            applied.append(name)
    register_project_handlers()
    from distilled.kd import uses_kd

    if uses_kd(config):  # logits distillation: registers KDLlamaForCausalLM / KDPackedDataLoader
        import distilled.kd.mindformers_kd  # noqa: F401
        applied.append("kd_model_and_loader")
    if rank == 0:
        for n in notes:
            print(f"run_mindformer.py: {n}", flush=True)
        print(f"run_mindformer.py: shims {applied or 'none'}; project handlers registered; "
              f"data {facts or 'not checked'}", flush=True)

    from mindformers.core.context import build_context
    from mindformers.trainer import Trainer
    from mindformers.utils.file_utils import set_output_path

    set_output_path(config.output_dir)
    build_context(config)
    seq = int(_get(config, "model.model_config.seq_length", 0))
    bs = int(_get(config, "runner_config.batch_size", 1))
    gas = int(_get(config, "runner_config.gradient_accumulation_steps", 1) or 1)
    cb = make_loss_callback(config.output_dir, rank, seq * bs * gas)
    trainer = Trainer(config, callbacks=[cb])
    t0 = time.perf_counter()
    if config.run_mode in ("train", "finetune"):
        trainer.train()
    elif config.run_mode == "eval":
        trainer.evaluate(eval_checkpoint=config.load_checkpoint)
    else:
        trainer.predict(predict_checkpoint=config.load_checkpoint, input_data=config.get("input_data"),
                        batch_size=config.get("predict_batch_size"))
    if rank == 0 and config.run_mode in ("train", "finetune"):
        summary = summarize_loss(os.path.join(config.output_dir, "loss.jsonl"))
        summary["wall_s"] = round(time.perf_counter() - t0, 1)
        print("run_mindformer.py: done " + json.dumps(summary), flush=True)
    return 0


def read_loss(path: str | os.PathLike) -> list[dict]:
    """Records of a loss JSONL (complete lines only)."""
    from distilled.io_utils import BadLine, iter_jsonl

    return [r for _, r in iter_jsonl(path) if not isinstance(r, BadLine)] if os.path.exists(path) else []


def summarize_loss(path: str | os.PathLike, skip_first: int = 1) -> dict:
    """First/last loss and median tokens/s (the first ``skip_first`` steps hold compilation)."""
    import statistics

    recs = read_loss(path)
    if not recs:
        return {"steps": 0}
    tps = [r["tokens_per_s"] for r in recs[skip_first:] if r.get("tokens_per_s")] or \
          [r["tokens_per_s"] for r in recs if r.get("tokens_per_s")]
    return {"steps": len(recs), "first_loss": recs[0]["loss"], "last_loss": recs[-1]["loss"],
            "median_tokens_per_s": round(statistics.median(tps), 1) if tps else None}


if __name__ == "__main__":  # old command line `python -m distilled.train.mindformers_run --workers 1 2 ...`: the bench lives in bench/
    import runpy

    sys.argv = [str(REPO / "bench" / "train.py"), "--scaling", *sys.argv[1:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
