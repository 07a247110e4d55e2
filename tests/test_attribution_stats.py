"""Attribution verdicts: the seed is the unit of evidence, arms are paired by row order, tests are corrected."""

from __future__ import annotations

import random

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from verifily_train.attribution import FULL, analyze, control_arm
from verifily_train.attribution.stats import adjust, seed_test
from verifily_train.training.batching import keyed_order, length_grouped_order, row_keys


def test_removing_rows_keeps_the_other_rows_in_the_full_arms_order():
    keys = row_keys([f"h{i}" for i in range(200)])
    full = [keys[i] for i in keyed_order(keys, seed=7)]
    kept = [k for k in keys if random.Random(k).random() > 0.3]
    assert [keys_i for keys_i in (kept[i] for i in keyed_order(kept, seed=7))] == [k for k in full if k in set(kept)]
    # the file order of the rows does not matter, the seed does
    shuffled = random.Random(0).sample(keys, len(keys))
    assert [shuffled[i] for i in keyed_order(shuffled, seed=7)] == full
    assert [keys[i] for i in keyed_order(keys, seed=8)] != full


def test_duplicate_rows_keep_distinct_keys_and_length_grouping_uses_the_keyed_shuffle():
    assert row_keys(["a", "b", "a"]) == ["a#0", "b#0", "a#1"]
    keys = row_keys([f"h{i}" for i in range(40)])
    lengths = [5 + i % 7 for i in range(40)]
    order = length_grouped_order(lengths, 4, seed=3, keys=keys)
    assert sorted(order) == list(range(40))
    assert order == length_grouped_order(lengths, 4, seed=3, keys=keys)


def test_seed_test_matches_scipy_t_test_and_states_its_resolution():
    diffs = [-0.31, -0.12, -0.25, -0.4, -0.2]
    out = seed_test(diffs, alpha=0.05, family=2)
    ref = stats.ttest_1samp(diffs, 0.0)
    assert out["p"] == pytest.approx(ref.pvalue)
    ci = ref.confidence_interval(0.95)
    assert out["ci95"] == pytest.approx([ci.low, ci.high])
    se = np.std(diffs, ddof=1) / np.sqrt(5)
    assert out["mde"] == pytest.approx((stats.t.ppf(1 - 0.0125, 4) + stats.t.ppf(0.8, 4)) * se)
    assert seed_test([0.1])["p"] is None  # one seed: no training variance, no test


def test_holm_and_benjamini_hochberg_adjust_as_defined():
    p = [0.01, 0.04, 0.03, 0.5, None]
    holm = adjust(p, "holm")
    assert holm[:4] == pytest.approx([0.04, 0.09, 0.09, 0.5]) and holm[4] is None
    bh = adjust(p, "bh")
    assert bh[:4] == pytest.approx(list(stats.false_discovery_control([0.01, 0.04, 0.03, 0.5])))


def _frames(rng, base, tags, loss_shift=0.0, noise=0.1):
    n_rows = len(base)
    index = [f"r{i}" for i in range(n_rows)]
    return pd.DataFrame({"tag.source": tags, "loss": base + loss_shift + rng.normal(0, noise, n_rows),
                         "accuracy": (rng.random(n_rows) > 0.5).astype(float)}, index=index)


def _tables(seed_shifts, n_seeds=5, n_rows=60):
    """Per-example tables: ``seed_shifts[arm]`` is each seed's mean shift of that arm's loss."""
    rng = np.random.default_rng(0)
    tags = np.array(["a", "b", "c"] * (n_rows // 3))
    base = rng.normal(1.0, 0.3, n_rows)  # the same test rows in every arm
    return {arm: [_frames(rng, base, tags, shift[s]) for s in range(n_seeds)] for arm, shift in seed_shifts.items()}


def _plan(*values, rows=20):
    return {v: {"removed_rows": rows, "kept_rows": 40, "derived_dataset": f"ds@v1-without-source-{v}",
                "control": control_arm(rows)} for v in values}


def test_less_data_is_not_read_as_bad_data():
    # removing either value shifts loss exactly as much as removing as many random rows: no verdict
    shift = [0.05, 0.06, 0.04, 0.05, 0.07]
    tables = _tables({FULL: [0.0] * 5, "a": shift, "b": shift, control_arm(20): shift})
    result = analyze("sft", "source", tables, _plan("a", "b"), bootstrap_samples=0)
    for value in ("a", "b"):
        entry = result["values"][value]
        cell = entry["slices"][entry["verdict_slice"]]["loss"]
        assert cell["removal_effect"] > 0.03 and entry["verdict"].startswith("no measurable effect"), entry["why"]
        assert cell["mde"] is not None and "smallest effect detectable" in entry["why"]
    assert "Holm" in result["method"] and "2 value(s)" in result["method"]


def test_a_value_worse_than_average_rows_hurts_and_the_seed_test_decides():
    control = [0.02, -0.03, 0.01, 0.0, 0.03]
    bad = [c - 0.3 + d for c, d in zip(control, [0.01, -0.02, 0.0, 0.02, -0.01])]
    tables = _tables({FULL: [0.0] * 5, "a": bad, "b": control, control_arm(20): control})
    result = analyze("sft", "source", tables, _plan("a", "b"), bootstrap_samples=200)
    assert result["values"]["a"]["verdict"] == "hurts"
    assert result["values"]["b"]["verdict"].startswith("no measurable effect")
    assert result["values"]["a"]["p_adjusted"] <= 0.05
    # a consistent sign and a row bootstrap that excludes zero are not enough without seed-level evidence
    noisy = [-0.3, 0.4, -0.2, 0.25, -0.4]
    tables = _tables({FULL: [0.0] * 5, "a": noisy, control_arm(20): [0.0] * 5})
    entry = analyze("sft", "source", tables, _plan("a"), bootstrap_samples=200)["values"]["a"]
    assert entry["verdict"].startswith("no measurable effect"), entry["why"]


def test_default_values_are_those_present_in_the_train_rows_and_absent_ones_are_named():
    from verifily_train.errors import VerifilyError
    from flows.attribute import _values

    record = {"job": {"dataset_version": {"tag_schema": {"source": {"values": ["human", "synthetic", "web"]}}}}}
    chosen, notes = _values(record, "source", None, {"human": 30, "web": 12})
    assert chosen == ["human", "web"]
    assert len(notes) == 1 and "source=synthetic" in notes[0] and "absent" in notes[0]
    assert _values(record, "source", ["web"], {"human": 30, "web": 12}) == (["web"], [])
    with pytest.raises(VerifilyError, match="no train rows have source=synthetic"):
        _values(record, "source", ["synthetic"], {"human": 30, "web": 12})
    with pytest.raises(VerifilyError, match="--by"):
        _values(record, "coin", None, {})
