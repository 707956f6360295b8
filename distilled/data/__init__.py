"""Stage 2, traces to packed Arrow: row formats, chat encoding and label masks, the Qwen2.5 tokenizer, BFD packing, `distill preprocess`/`merge` and decontamination."""
