"""Metrics against hand-computed values, the bootstrap against a known distribution, slices, hard examples."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from verifily_train.evaluation import bootstrap, text_metrics
from verifily_train.evaluation.hard import mine_hard_examples
from verifily_train.evaluation.metrics import classification_metrics, classification_report, sft_metrics
from verifily_train.evaluation.slices import slice_metrics_by_tag


def test_normalized_exact_match():
    assert text_metrics.exact_match("The Cold.", "cold") == 1.0
    assert text_metrics.exact_match("  cold  ", "Cold!") == 1.0
    assert text_metrics.exact_match("cold day", "cold") == 0.0
    assert text_metrics.normalize_answer("An  Apple, the PIE!") == "apple pie"


def test_token_f1_by_hand():
    # prediction tokens: red blue green; reference: red red blue -> common = {red:1, blue:1} = 2
    # precision 2/3, recall 2/3 -> F1 = 2/3
    assert text_metrics.token_f1("red blue green", "red red blue") == pytest.approx(2 / 3)
    assert text_metrics.token_f1("cat", "dog") == 0.0
    assert text_metrics.token_f1("", "") == 1.0
    assert text_metrics.token_f1("", "dog") == 0.0


def test_format_compliance_auto_json_and_regex():
    refs = ['{"a": 1}'] * 9 + ["plain"]
    assert text_metrics.resolve_format("auto", refs) == "json"  # 90% parse
    assert text_metrics.resolve_format("auto", refs[:8] + ["x", "y"]) is None  # 80%: off
    assert text_metrics.format_ok('{"b": [1, 2]}', "json") == 1.0
    assert text_metrics.format_ok("{b: 1}", "json") == 0.0
    assert text_metrics.format_ok("ID-123", "regex:ID-\\d+") == 1.0
    assert text_metrics.format_ok("ID-12x", "regex:ID-\\d+") == 0.0
    assert text_metrics.check_format_setting("regex:(") is not None


def test_sft_loss_is_token_weighted_and_perplexity_is_its_exp():
    m = sft_metrics(np.array([2.0, 6.0]), np.array([1, 3]))  # (2 + 6) / 4 tokens
    assert m["loss"] == pytest.approx(2.0) and m["perplexity"] == pytest.approx(math.exp(2.0))


def test_classification_metrics_by_hand():
    true = [0, 0, 1, 1, 2, 2]
    pred = [0, 1, 1, 1, 2, 0]
    m = classification_metrics(true, pred, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    # per class F1: a: p=1/2 r=1/2 -> .5 ; b: p=2/3 r=1 -> .8 ; c: p=1 r=1/2 -> 2/3
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    report = classification_report(true, pred, ["a", "b", "c"])
    assert report["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert report["per_class"]["b"] == {"precision": pytest.approx(2 / 3), "recall": 1.0, "f1": pytest.approx(0.8),
                                        "support": 2}


def test_bootstrap_interval_matches_the_known_sampling_distribution():
    # mean of n Bernoulli(0.3) draws: standard error sqrt(p(1-p)/n); the 95% interval is about +-1.96 SE
    rng = np.random.default_rng(0)
    n = 4000
    values = (rng.random(n) < 0.3).astype(float)
    frame = pd.DataFrame({"label_id": np.zeros(n, int), "pred_id": (1 - values).astype(int)})
    low, high = bootstrap.bootstrap_intervals("classification", frame, ["x", "y"], 2000, seed=1)["accuracy"]
    se = math.sqrt(values.mean() * (1 - values.mean()) / n)
    assert (high - low) == pytest.approx(2 * 1.96 * se, rel=0.1)
    assert low < values.mean() < high


def test_bootstrap_is_seeded_and_one_vectorized_pass_per_metric(monkeypatch):
    """Same seed, same intervals; and the cost does not grow with Python work per resample: each metric's
    statistic is evaluated once, over all 1000 resamples at once (a 1000 x n index matrix), from one draw."""
    n = 10_000
    frame = pd.DataFrame({"loss_sum": np.random.default_rng(1).random(n) * 10, "n_tokens": np.full(n, 5)})
    calls, draws = [], []
    real_statistics, real_indices = bootstrap.statistics_for, bootstrap.resample_indices

    def counted_statistics(*args):
        def counted(name, stat):
            return lambda idx: calls.append((name, idx.shape)) or stat(idx)
        return {name: counted(name, stat) for name, stat in real_statistics(*args).items()}

    monkeypatch.setattr(bootstrap, "statistics_for", counted_statistics)
    monkeypatch.setattr(bootstrap, "resample_indices", lambda *a: draws.append(a) or real_indices(*a))
    first = bootstrap.bootstrap_intervals("sft", frame, [], 1000, seed=7)
    assert sorted(calls) == [("loss", (1000, n)), ("perplexity", (1000, n))]
    assert draws == [(n, 1000, 7)]
    assert first == bootstrap.bootstrap_intervals("sft", frame, [], 1000, seed=7)


def test_vectorized_macro_f1_matches_sklearn_on_each_resample():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(3)
    true, pred = rng.integers(0, 3, 200), rng.integers(0, 3, 200)
    idx = bootstrap.resample_indices(200, 5, seed=0)
    fast = bootstrap.macro_f1_stat(true, pred, 3)(idx)
    for b in range(5):
        expected = f1_score(true[idx[b]], pred[idx[b]], labels=[0, 1, 2], average="macro", zero_division=0)
        assert fast[b] == pytest.approx(expected)


def test_paired_delta_interval_detects_a_real_improvement():
    n = 500
    rng = np.random.default_rng(5)
    a_correct = rng.random(n) < 0.6
    b_correct = a_correct | (rng.random(n) < 0.3)  # B fixes some of A's mistakes, never breaks one
    a = pd.DataFrame({"label_id": np.zeros(n, int), "pred_id": (~a_correct).astype(int)})
    b = pd.DataFrame({"label_id": np.zeros(n, int), "pred_id": (~b_correct).astype(int)})
    out = bootstrap.paired_delta_intervals("classification", a, b, ["x", "y"], 1000, seed=0)
    assert out["accuracy"]["delta"] > 0 and out["accuracy"]["excludes_zero"]
    same = bootstrap.paired_delta_intervals("classification", a, a, ["x", "y"], 1000, seed=0)
    assert same["accuracy"]["delta"] == 0 and not same["accuracy"]["excludes_zero"]


def _cls_frame():
    rows = []
    for i in range(60):
        source = "noisy" if i % 4 == 0 else "human"
        correct = source == "human" or i % 8 == 0
        rows.append({"example_id": f"test:{i + 1}", "split": "test", "line": i + 1,
                     "tags": json.dumps({"source": source}), "tag.source": source, "text": f"t{i}",
                     "reference": "a", "label_id": 0, "pred_id": 0 if correct else 1, "label": "a",
                     "predicted": "a" if correct else "b", "prob_true": 0.9 if correct else 0.2,
                     "prob_predicted": 0.9 if correct else 0.8})
    return pd.DataFrame(rows)


def test_slices_flag_low_confidence_and_carry_intervals():
    frame = _cls_frame()
    overall = classification_metrics(frame["label_id"], frame["pred_id"], ["a", "b"])
    out = slice_metrics_by_tag("classification", frame, ["a", "b"], ["source"], overall, bootstrap_samples=200)
    values = {v["value"]: v for v in out["slices"]["source"]["values"]}
    assert values["noisy"]["n"] == 15 and values["noisy"]["low_confidence"]
    assert values["human"]["n"] == 45 and not values["human"]["low_confidence"]
    assert values["noisy"]["metrics"]["accuracy"] == pytest.approx(8 / 15)
    assert values["noisy"]["delta"]["accuracy"] == pytest.approx(8 / 15 - 53 / 60)
    low, high = values["noisy"]["ci95"]["accuracy"]
    assert low <= 8 / 15 <= high and "accuracy" in out["overall"]["ci95"]


def test_hard_examples_rank_and_headline_the_over_represented_source():
    result = mine_hard_examples("classification", _cls_frame(), 7, ["source"])
    assert [e["tags"]["source"] for e in result["examples"]] == ["noisy"] * 7
    assert result["headline"] == ("100% of hard examples come from source:noisy, 25% of the test set "
                                  "(4.0x, hypergeometric p=1.7e-05; Benjamini–Hochberg, FDR 0.10)")
    assert result["lift"]["source"][0]["value"] == "noisy"


def test_sft_hard_examples_rank_by_token_f1_then_loss():
    frame = pd.DataFrame({"example_id": ["a", "b", "c"], "split": "test", "line": [1, 2, 3], "tags": "{}",
                          "text": "x", "reference": "y", "loss": [1.0, 3.0, 2.0], "token_f1": [0.0, 0.5, 0.0],
                          "exact_match": [0.0, 0.0, 0.0], "prediction": "z"})
    ranked = [e["example_id"] for e in mine_hard_examples("sft", frame, 3, [])["examples"]]
    assert ranked == ["c", "a", "b"]
