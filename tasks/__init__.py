"""Prefect tasks over the pipeline's stages: one task factory (``stage_task``), the fingerprint and the Run writer.

Installed as ``verifily_train.tasks`` (see pyproject's package-dir), never as a top-level ``tasks``.
"""
