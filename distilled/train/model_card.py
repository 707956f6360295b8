"""What ``distill convert mf-to-hf`` / ``merge-lora`` write beside the weights for the HF ecosystem:
``generation_config.json`` and a model card (``README.md``).

Why ``generation_config.json``: transformers' ``generate()`` and vLLM stop at the ids listed there.
open-r1 found distilled models that never stop when only ``<|endoftext|>`` is listed: the chat
turns end with ``<|im_end|>``, which is the token the student was trained to emit (the trained
span includes it). So ``<|im_end|>`` goes first in ``eos_token_id``, with ``<|endoftext|>`` kept.

Why a model card: an export without one says nothing about how it was made. The card names the
base model, the recipe and its source, the data, the training settings read from the YAML that
trained it and, when an eval run is given, its results table next to the recipe's published
numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"


def _special_ids(hf_cfg: dict, tokenizer_dir: str | Path | None) -> tuple[int, int | None]:
    """(<|im_end|> id, <|endoftext|> id) from the tokenizer when given (a trimmed tokenizer moves
    them), else from the model config (Qwen2.5: 151645, 151643)."""
    if tokenizer_dir is not None and (Path(tokenizer_dir) / "tokenizer.json").is_file():
        from distilled.data.tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer_dir)
        im_end, eot = tok.convert_tokens_to_ids([IM_END, ENDOFTEXT])
        unk = tok.unk_token_id
        if im_end is not None and im_end != unk:
            return int(im_end), (int(eot) if eot is not None and eot != unk else None)
    eos = hf_cfg.get("eos_token_id", 151645)
    eos = eos[0] if isinstance(eos, list) else eos
    bos = hf_cfg.get("bos_token_id")
    return int(eos), (int(bos) if bos is not None else None)


def generation_config(hf_cfg: dict, tokenizer_dir: str | Path | None = None,
                      existing: dict | None = None) -> dict:
    """The ``generation_config.json`` content: ``existing`` (e.g. the base model's) with
    ``<|im_end|>`` first in ``eos_token_id``, and the R1 sampling defaults (T 0.6, top_p 0.95)."""
    im_end, eot = _special_ids(hf_cfg, tokenizer_dir)
    out = dict(existing or {})
    old = out.get("eos_token_id")
    old = old if isinstance(old, list) else ([] if old is None else [old])
    eos = [im_end] + [e for e in ([eot] if eot is not None else []) + old if e != im_end]
    out["eos_token_id"] = list(dict.fromkeys(eos))
    if eot is not None:
        out.setdefault("bos_token_id", eot)
        out.setdefault("pad_token_id", eot)
    out.update(do_sample=True, temperature=0.6, top_p=0.95)
    out.pop("top_k", None)
    out.pop("repetition_penalty", None)
    out.setdefault("transformers_version", _transformers_version())
    return out


def _transformers_version() -> str:
    try:
        import transformers

        return transformers.__version__
    except ImportError:  # pragma: no cover - transformers is a dependency
        return "unknown"


def _results_table(eval_run: str | Path, reference: dict[str, float] | None) -> str:
    from distilled.eval.runner import _load_results
    from distilled.plots import md_table

    res = _load_results(str(eval_run))
    rows = []
    for task, m in res["tasks"].items():
        if "pass@1" not in m:
            continue
        pub = (reference or {}).get(task)
        rows.append([task, f"{m['pass@1']:.1f} ± {m.get('pass@1_stderr', 0.0):.1f}", m.get("n", "-"),
                     m.get("problems", "-"), "-" if pub is None else f"{pub:g}"])
    s = res.get("settings", {})
    head = (f"Measured with `distill eval` (engine {res.get('engine')}, temperature {s.get('temperature')}, "
            f"top_p {s.get('top_p')}, max new tokens {s.get('max_tokens')}, n {s.get('n')}"
            + (f", preset {s['preset']}" if s.get("preset") else "") + f", prompt {res.get('prompt_version')}).\n\n")
    return head + md_table(["task", "pass@1 (%) ± s.e.", "samples/problem", "problems", "published (%)"], rows)


def model_card(hf_cfg: dict, gen_cfg: dict, train_yaml: str | Path | None = None,
               recipe_name: str | None = None, base_model: str | None = None, data: str | None = None,
               eval_run: str | Path | None = None) -> str:
    """The README.md text. Anything not known is said to be unknown, never guessed."""
    from distilled import recipes
    from distilled.plots import md_table

    rec = None
    if recipe_name:
        rec = recipes.get(recipe_name)
    elif train_yaml is not None:
        rec = recipes.for_config(train_yaml)
    twin = rec is not None and train_yaml is not None and Path(train_yaml).name == Path(rec.twin).name
    base = base_model or (rec.student if rec and not twin else None)
    data = data or (rec.data if rec and not twin else None)
    raw = None
    if train_yaml is not None and Path(train_yaml).suffix in (".yaml", ".yml"):
        import yaml

        raw = yaml.safe_load(Path(train_yaml).read_text())
    front = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             "tags: [distilled, reasoning, mindspore, mindformers]"]
    if base:
        front.append(f"base_model: {base}")
    if data and rec and not twin:
        front.append(f"datasets: [{rec.data.split(' ')[0]}]")
    front.append("---")
    title = (f"Tiny CPU twin of recipe `{rec.name}`" if twin else rec.title) if rec else "Distilled Qwen2 student"
    lines = ["\n".join(front), "", f"# {title}", ""]
    lines.append(f"Fine-tuned from **{base or 'unknown base model (pass --base-model)'}** with MindSpore "
                 "Transformers (MindFormers 1.9) by `distilled`"
                 + (f", recipe `{rec.name}` ({rec.source})" if rec else "")
                 + (f", trained with its tiny CPU twin `{Path(rec.twin).name}` (a test run, not the recipe)."
                    if twin else "."))
    lines += ["", "## Data", "", data or "Not recorded (pass --data).", ""]
    lines += ["## Training settings", ""]
    if raw is not None:
        settings = recipes.training_settings(raw)
        lines.append(md_table(["setting", "value"], [[k, v] for k, v in settings.items()]))
        lines.append(f"\nFrom `{Path(train_yaml).name}` (as the YAML sets them; `run_mindformer.py` lowers "
                     "data_parallel to the number of workers actually started).")
    else:
        lines.append("Not recorded: the export was made with an HF config, not the training YAML.")
    lines += ["", "## Generation", ""]
    lines.append(f"`generation_config.json` stops at `eos_token_id` {gen_cfg['eos_token_id']} "
                 f"(`{IM_END}` first: the end of every trained assistant turn) and samples with temperature "
                 f"{gen_cfg.get('temperature')}, top_p {gen_cfg.get('top_p')}. Architecture "
                 f"{hf_cfg.get('architectures', ['?'])[0]}, {hf_cfg.get('num_hidden_layers')} layers, hidden "
                 f"{hf_cfg.get('hidden_size')}, RoPE theta {hf_cfg.get('rope_theta')}, tied embeddings "
                 f"{hf_cfg.get('tie_word_embeddings')}.")
    lines += ["", "## Evaluation", ""]
    if eval_run is not None:
        lines.append(_results_table(eval_run, rec.expected if rec else None))
    else:
        lines.append("Not evaluated with this export (pass --eval-run DIR of a `distill eval` run).")
    if rec and rec.expected:
        pub = ", ".join(f"{t} {v:g}" for t, v in rec.expected.items())
        lines.append(f"\nPublished for this recipe: {pub} ({rec.expected_source}).")
    if rec:
        lines += ["", "## Reproduce", "", "```bash"] + list(recipes.commands(rec).values()) + ["```"]
    return "\n".join(lines) + "\n"


def write_export_extras(out_dir: Path, hf_cfg: dict, train_yaml: str | Path | None = None,
                        tokenizer_dir: str | Path | None = None, recipe_name: str | None = None,
                        base_model: str | None = None, data: str | None = None,
                        eval_run: str | Path | None = None) -> dict:
    """Write ``generation_config.json`` and ``README.md`` into ``out_dir`` (the export's staging
    directory: the caller moves it into place atomically). Returns the generation config."""
    out_dir = Path(out_dir)
    existing = None
    gc_path = out_dir / "generation_config.json"
    if gc_path.is_file():  # copied from the tokenizer / base model folder
        existing = json.loads(gc_path.read_text())
    gen = generation_config(hf_cfg, tokenizer_dir, existing)
    gc_path.write_text(json.dumps(gen, indent=2) + "\n")
    card = model_card(hf_cfg, gen, train_yaml, recipe_name, base_model, data, eval_run)
    (out_dir / "README.md").write_text(card)
    return gen
