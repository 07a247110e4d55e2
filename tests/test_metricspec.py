"""The metric table (config/metricspec.py) is the one place metrics are named: every consumer reads it."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from verifily_train.attribution import analysis
from verifily_train.cli.summary import print_summary
from verifily_train.config import metricspec, schema
from verifily_train.config.metricspec import KINDS, ROW_MEAN, MetricSpec
from verifily_train.evaluation import bootstrap, metrics, significance, text_metrics
from verifily_train.evaluation.metrics import metrics_for_frame
from verifily_train.evaluation.predict import wants_generation
from verifily_train.evaluation.slices import slice_metrics_by_tag

BREVITY = MetricSpec("brevity", ("sft",), ROW_MEAN, column="brevity", generation=True, attributed=True)


def _sft_frame(n: int = 40, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"example_id": [f"test:{i}" for i in range(n)], "row_hash": [f"h{i}" for i in range(n)],
                          "loss_sum": rng.random(n) * 10, "n_tokens": rng.integers(1, 9, n),
                          "exact_match": (rng.random(n) < 0.4).astype(float), "token_f1": rng.random(n),
                          "brevity": (rng.random(n) < 0.5).astype(float),
                          "tag.source": rng.choice(["web", "human"], n)})
    frame["loss"] = frame["loss_sum"] / frame["n_tokens"]
    return frame


def test_config_names_and_defaults_are_the_tables():
    for task in schema.TASKS:
        names = tuple(spec.name for spec in metricspec.METRICS if task in spec.tasks)
        assert schema.KNOWN_EVAL_METRICS[task] == names
        assert schema.DEFAULT_EVAL_METRICS[task] == list(names)
    assert {name for spec in metricspec.METRICS for name in spec.tasks} == set(schema.TASKS)


def test_every_kind_and_generation_column_has_its_implementation():
    assert {spec.kind for spec in metricspec.METRICS} <= set(KINDS)
    assert set(metrics.POINT) == set(KINDS) == set(bootstrap.STATISTIC)
    assert {spec.column for spec in metricspec.generation_metrics()} == set(text_metrics.ROW_SCORERS)
    assert all(metricspec.metric(spec.function_of) for spec in metricspec.METRICS if spec.function_of)


def test_consumers_derive_directions_and_shared_tests_from_the_table():
    assert significance.SAME_TEST_AS == {"perplexity": "loss"}
    assert analysis.LOWER_IS_BETTER == {"loss", "perplexity"}
    assert not metricspec.lower_is_better("gold_token_f1")  # a gold-set score: higher is better
    shown = metrics_for_frame("sft", _sft_frame(), [])
    assert [name for name in shown if metricspec.metric(name)] == ["loss", "perplexity", "exact_match", "token_f1"]


def test_a_metric_added_to_the_table_reaches_evaluation_slices_tests_attribution_and_summary(monkeypatch):
    monkeypatch.setattr(metricspec, "METRICS", metricspec.METRICS + (BREVITY,))
    monkeypatch.setitem(text_metrics.ROW_SCORERS, "brevity",
                        text_metrics.RowScorer(lambda prediction, reference, fmt: float(len(prediction) <= 3)))
    frame, other = _sft_frame(seed=0), _sft_frame(seed=1)

    assert text_metrics.score_texts(["ok", "too long"], ["a", "b"], None)["brevity"] == [1.0, 0.0]
    assert wants_generation(SimpleNamespace(eval=SimpleNamespace(metrics=["loss", "brevity"])))
    overall = metrics_for_frame("sft", frame, [])
    assert overall["brevity"] == pytest.approx(frame["brevity"].mean())
    assert "brevity" in bootstrap.bootstrap_intervals("sft", frame, [], 100, seed=0)
    assert "brevity" in significance.paired_permutation_pvalues("sft", frame, other, [], 200, seed=0)
    sliced = slice_metrics_by_tag("sft", frame, [], ["source"], overall, bootstrap_samples=100)
    for entry in sliced["slices"]["source"]["values"]:
        assert {"brevity"} <= set(entry["metrics"]) & set(entry["delta"]) & set(entry["ci95"])
    assert "brevity" in analysis.per_example_frame(frame, "sft").columns

    out = io.StringIO()
    print_summary({"run_id": "r", "path": "/nonexistent/run", "slices": json.loads(json.dumps(sliced)),
                   "hard_examples": {}, "record": {"metrics": overall, "duration_seconds": 1.0, "precision": "fp32",
                                                   "job": {"device": "cpu"}, "evaluation": {"note": "test split"},
                                                   "reproducibility_hash": "x"}}, out=out)
    text = out.getvalue()
    assert f"brevity={overall['brevity']:.4f}" in text
    assert "brevity" in next(line for line in text.splitlines() if line.strip().startswith("value"))


def test_run_tables_show_the_tables_metrics_in_order_and_lead_with_its_lead_metric():
    from verifily_train.artifacts.tables import SHOWN_METRICS, slice_table

    assert SHOWN_METRICS[:len(metricspec.METRICS)] == metricspec.all_names()
    assert metricspec.lead_metric(["token_f1", "exact_match", "perplexity", "loss"]) == "loss"
    assert metricspec.lead_metric(["macro_f1", "accuracy"]) == "accuracy"
    assert metricspec.lead_metric(["token_f1", "exact_match"]) == "exact_match"
    assert metricspec.lead_metric(["token_f1", "format_compliance", "examples"]) is None
    entry = {"value": "web", "n": 3, "metrics": {"token_f1": 0.5, "loss": 1.25}, "ci95": {"loss": [1.0, 1.5]},
             "delta": {"loss": 0.25}, "low_confidence": False}
    summary = {"slices": {"slices": {"source": {"values": [entry]}}}, "record": {}}
    assert slice_table(summary) == [{"tag": "source", "value": "web", "n": 3, "metric": "loss", "score": 1.25,
                                     "ci95_low": 1.0, "ci95_high": 1.5, "delta_vs_overall": 0.25, "low_n": False}]
