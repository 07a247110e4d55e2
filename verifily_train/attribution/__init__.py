"""Causal attribution by retraining: remove a tag value's train rows (and as many random rows), retrain
over seeds, and test on a declared target whether that value's rows, one draw, are worse or better than
random rows (docs/attribution.md).

The names below are re-exported lazily (PEP 562): ``verifily --help`` reads ``attribution.stats.DEFAULT_SEEDS``
without loading the dataset store and the analysis.
"""

import importlib

_EXPORTS = {
    "FULL": "analysis", "VERDICTS": "analysis", "analyze": "analysis", "control_arm": "analysis",
    "control_arms": "analysis",
    "per_example": "analysis", "per_example_frame": "analysis", "target_score": "analysis",
    "derive_random": "derive", "derive_without": "derive", "derived_version_name": "derive",
    "train_tag_counts": "derive", "render": "render", "render_html": "render",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
    for export, where in _EXPORTS.items():  # bound once: a submodule's import binds its own name over ours
        if where == _EXPORTS[name]:
            globals()[export] = getattr(module, export)
    return globals()[name]
