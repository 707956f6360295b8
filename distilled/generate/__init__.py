"""Stage 1, teacher to traces: the OpenAI-compatible client, `distill generate`, the stand-in teacher server, synthetic problems and `distill reject` (rejection sampling)."""
