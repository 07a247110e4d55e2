"""Verifily Train: fine-tune HuggingFace models on versioned, tagged datasets.

This package is the library. It never imports Prefect; ``verifily_train.tasks`` and
``verifily_train.flows`` (the repository's top-level ``tasks/`` and ``flows/``) wrap it.
"""

__version__ = "0.1.0"
