"""Stage 2, verified traces to packed Arrow.

* ``formats``       -- row formats to messages (OpenR1, messages, stratos, magpie, CoT): ``FORMATS``, ``FormatConfig``
* ``chat``          -- chat encoding and label masks equal to ``apply_chat_template``; ``TemplateError``
* ``tokenizer``     -- ``distill tokenizer``: the Qwen2.5 BPE built offline, ``load_tokenizer``
* ``packing``       -- vectorised best-fit-decreasing packing: ``pack_table``
* ``preprocess``    -- ``distill preprocess`` / ``merge``: ``PreprocessConfig``, ``MergeConfig``, ``preprocess``, ``merge``
* ``decontaminate`` -- ``distill decontaminate``: open-r1's 8-gram rule, ``filter_rows``
"""
