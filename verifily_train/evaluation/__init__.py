"""Evaluation: per-example scores, task metrics, tag slices and hard examples."""
