"""Stage 4, checkpoint to report.

* ``runner``          -- ``distill eval`` / ``eval compare``: ``EvalConfig``, resume, report with reference rows
* ``tasks``           -- MATH-500, AIME24/25, GPQA-Diamond and task files; the one scoring rule (``SCORING_RULE``)
* ``engines``         -- generation engines: transformers, vLLM, any OpenAI-compatible server; budget forcing
* ``metrics``         -- pass@1, pass@k, cons@n and their standard errors
* ``lighteval_tasks`` -- the lighteval task file scoring exactly as ``distill eval`` (runs in ``.venv-eval``)
"""
