"""Stage 3, packed Arrow to checkpoint.

* ``loop``               -- ``distill train`` / ``python -m distilled.train``: ``settings_from_yaml``, ``run_train``
* ``backends``           -- ``get_backend("torch" | "mindspore")``; ``backends.base``: ``PackedBatch``, ``TrainSettings``
* ``mindformers_run``    -- ``run_mindformer.py``'s logic: pre-flight checks, ``shims_for``, ``yaml_problems``
* ``mindformers_compat`` -- the named MindFormers 1.9 shims (imports MindSpore: only MindSpore paths import it)
* ``hf_mf_names``        -- the one HF <-> MindFormers table (config keys, parameter names, LoRA)
* ``convert``            -- ``distill convert``: hf-to-mf, mf-to-hf (+ ``model_card``), merge-lora
* ``parity``             -- ``distill parity``: the same run on both backends, per-tensor bounds, packing check
* ``tiny_model``         -- tiny Qwen2.5-shaped students for CPU runs and tests
"""
