"""Causal attribution by retraining: remove a tag value's train rows (and as many random rows), retrain
over seeds, and test whether that value's rows are worse or better than average rows (docs/attribution.md)."""

from verifily_train.attribution.analysis import FULL, VERDICTS, analyze, control_arm, per_example, per_example_frame
from verifily_train.attribution.derive import (derive_random, derive_without, derived_version_name,
                                               train_tag_counts)
from verifily_train.attribution.render import render, render_html

__all__ = ["FULL", "VERDICTS", "analyze", "control_arm", "derive_random", "derive_without", "derived_version_name",
           "per_example", "per_example_frame", "render", "render_html", "train_tag_counts"]
