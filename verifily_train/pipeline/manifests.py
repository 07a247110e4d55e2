"""Script-facing views of a fingerprint (benchmarks and tests); the pipeline reads ``pipeline/contract.py`` itself."""

from __future__ import annotations

from verifily_train.model.loading import ModelSpec
from verifily_train.pipeline.contract import Fingerprint


def model_spec(fp: Fingerprint) -> ModelSpec:
    """The fingerprint's model as a ``ModelSpec``."""
    return fp.model_spec
