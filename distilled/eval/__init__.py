"""Stage 4, checkpoint to report: benchmark tasks, generation engines, metrics, reports and the lighteval task file."""
