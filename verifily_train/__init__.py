"""Verifily Train: fine-tune HuggingFace models on versioned, tagged datasets.

This package is the library. It never imports Prefect; ``verifily_train.tasks`` and
``verifily_train.flows`` (the repository's top-level ``tasks/`` and ``flows/``) wrap it.
The Python API (``verifily_train.api``: ``train``, ``load_run``, ``compare``, ``attribute``) is re-exported
here, imported on first use: ``import verifily_train`` stays cheap and imports no Prefect (docs/python.md).
"""

__version__ = "0.1.0"

API = ("train", "load_run", "compare", "compare_groups", "attribute", "Run", "RunGroup", "Comparison", "GroupComparison",
       "Attribution", "VerifilyError")
__all__ = ["__version__", *API]


def __getattr__(name: str):
    if name in API:  # the one upward import tests/layering.py allows, and only here, inside a function
        from verifily_train import api

        return getattr(api, name)
    raise AttributeError(f"module 'verifily_train' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(API))
