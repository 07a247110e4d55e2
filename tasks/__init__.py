"""Prefect tasks: one per pipeline stage, each wrapping one ``verifily_train.pipeline.stages`` function.

Installed as ``verifily_train.tasks`` (see pyproject's package-dir), never as a top-level ``tasks``.
"""
