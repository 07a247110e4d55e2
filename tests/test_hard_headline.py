"""Hard-example lift: shares over all test rows, an exact test per tag value with one BH correction,
minimum support, and a headline that names a real concentration or says there is none."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from scipy import stats

from verifily_train.evaluation.hard import MIN_HARD_SUPPORT, UNTAGGED, mine_hard_examples


def _frame(sources, hard_positions):
    """A classification frame: one row per source (None = untagged); rows in ``hard_positions`` are wrong."""
    hard = set(hard_positions)
    rows = []
    for i, source in enumerate(sources):
        wrong = i in hard
        tags = {} if source is None else {"source": source}
        rows.append({"example_id": f"test:{i + 1:04d}", "split": "test", "line": i + 1, "tags": json.dumps(tags),
                     "tag.source": source, "text": f"t{i}", "reference": "a", "label_id": 0,
                     "pred_id": 1 if wrong else 0, "label": "a", "predicted": "b" if wrong else "a",
                     # wrong rows ranked first, in order of position, so the top n are exactly the wrong rows
                     "prob_true": 0.01 + i * 1e-5 if wrong else 0.9, "prob_predicted": 0.9})
    return pd.DataFrame(rows)


def _row(result, value, key="source"):
    return next(r for r in result["lift"][key] if r["value"] == value)


def test_one_rare_hard_row_never_headlines_over_the_source_holding_the_hard_examples():
    # 1000 test rows: one "rare", 600 "web", 399 "forum"; the 30 hard rows are the rare one and 29 web rows
    sources = ["rare"] + ["web"] * 600 + ["forum"] * 399
    hard = [0] + list(range(1, 30))  # the rare row and 29 web rows: 30 hard, web 97%
    result = mine_hard_examples("classification", _frame(sources, hard), 30, ["source"])
    rare, web = _row(result, "rare"), _row(result, "web")
    assert rare["lift"] == pytest.approx(1000 / 30)  # the capped lift 1/test_share that used to win
    assert web["hard_share"] == pytest.approx(29 / 30) and web["test_share"] == pytest.approx(0.6)
    assert rare["hard_count"] < MIN_HARD_SUPPORT
    assert "source:rare" not in result["headline"]
    assert result["headline"].startswith("97% of hard examples come from source:web, 60% of the test set (1.6x")
    assert web["significant"] and web["p_value"] == pytest.approx(stats.hypergeom.sf(28, 1000, 600, 30))


def test_shares_count_untagged_rows_as_their_own_value():
    # 40 rows: 10 "a" (25%), 10 "b", 20 untagged; the 4 hard rows are 2 "a" and 2 untagged
    sources = ["a"] * 10 + ["b"] * 10 + [None] * 20
    result = mine_hard_examples("classification", _frame(sources, [0, 1, 20, 21]), 4, ["source"])
    a, b, untagged = _row(result, "a"), _row(result, "b"), _row(result, UNTAGGED)
    assert a["test_share"] == pytest.approx(0.25) and a["test_count"] == 10
    assert untagged["test_share"] == pytest.approx(0.5) and untagged["hard_count"] == 2
    assert b["hard_count"] == 0 and b["p_value"] == pytest.approx(1.0)
    assert sum(r["test_share"] for r in result["lift"]["source"]) == pytest.approx(1.0)
    assert sum(r["hard_share"] for r in result["lift"]["source"]) == pytest.approx(1.0)


def test_untagged_rows_never_headline_even_when_they_are_all_the_hard_examples():
    sources = ["a"] * 50 + [None] * 10
    result = mine_hard_examples("classification", _frame(sources, range(50, 60)), 10, ["source"])
    assert _row(result, UNTAGGED)["significant"]
    assert result["headline"] == "no tag value is over-represented among the 10 hardest examples (Benjamini–Hochberg, FDR 0.10)"


def test_hard_examples_in_proportion_to_the_test_set_give_no_headline():
    # 200 rows, 4 sources of 50; the 20 hard rows are 5 from each: every lift is 1.0
    sources = [s for s in ("a", "b", "c", "d") for _ in range(50)]
    hard = [base + i for base in (0, 50, 100, 150) for i in range(5)]
    result = mine_hard_examples("classification", _frame(sources, hard), 20, ["source"])
    assert all(r["lift"] == pytest.approx(1.0) and not r["significant"] for r in result["lift"]["source"])
    assert result["headline"] == "no tag value is over-represented among the 20 hardest examples (Benjamini–Hochberg, FDR 0.10)"


def test_a_planted_over_represented_source_headlines_with_its_test_and_correction():
    # 160 rows, 25 "contaminated" (15.6%); 25 hard rows, 16 of them contaminated (64%): lift 4.1
    sources = ["contaminated"] * 25 + ["human"] * 135
    hard = list(range(16)) + list(range(25, 34))
    result = mine_hard_examples("classification", _frame(sources, hard), 25, ["source"])
    row = _row(result, "contaminated")
    p = stats.hypergeom.sf(15, 160, 25, 25)
    assert row["p_value"] == pytest.approx(p) and row["significant"] and row["q_value"] <= 0.10
    assert result["lift"]["source"][0]["value"] == "contaminated"
    assert result["headline"] == (f"64% of hard examples come from source:contaminated, 16% of the test set "
                                  f"(4.1x, hypergeometric p={p:.2g}; Benjamini–Hochberg, FDR 0.10)")


def test_the_correction_runs_over_every_value_of_every_key():
    sources = ["contaminated"] * 25 + ["human"] * 135
    frame = _frame(sources, list(range(16)) + list(range(25, 34)))
    frame["tag.lang"] = ["en", "fr"] * 80
    frame["tags"] = [json.dumps(dict(json.loads(t), lang=l)) for t, l in zip(frame["tags"], frame["tag.lang"])]
    result = mine_hard_examples("classification", frame, 25, ["source", "lang"])
    tested = [r for rows in result["lift"].values() for r in rows]
    assert len(tested) == 4
    adjusted = stats.false_discovery_control([r["p_value"] for r in tested], method="bh")
    assert [r["q_value"] for r in tested] == pytest.approx(list(adjusted))


def test_a_stricter_q_can_silence_a_borderline_value():
    sources = ["contaminated"] * 25 + ["human"] * 135
    hard = list(range(8)) + list(range(25, 42))  # 8 of 25 hard vs 16% expected: modest
    result = mine_hard_examples("classification", _frame(sources, hard), 25, ["source"], q=1e-6)
    assert not _row(result, "contaminated")["significant"]
    assert result["headline"].startswith("no tag value is over-represented") and result["headline"].endswith("(Benjamini–Hochberg, FDR 1.0e-06)")


def test_headline_calibration_guard_placebo_rarely_names_a_value_and_a_planted_one_is_found():
    """A fixed-seed slice of bench/hard_headline.py: 200 trials of each."""
    from bench.hard_headline import run

    result = run(200, 1.0, seed=0)
    assert result["placebo_headline_rate"]["rate"] <= 0.10  # BH's bound (measured 4.8% over 2000 trials)
    assert result["planted_named"]["rate"] >= 0.80 and result["planted_other_value_named"]["k"] <= 2


def test_an_exactly_answered_sft_row_is_never_a_hard_example():
    """More hard examples asked for than rows answered imperfectly: the list stops there, and the lift still
    compares with every evaluated row (#39: a perfectly answered row was listed among the hard examples)."""
    rows = []
    for i in range(12):
        exact = i % 3 == 0  # rows 0, 3, 6, 9 answered exactly, with the lowest losses of all
        rows.append({"example_id": f"test:{i + 1:04d}", "split": "test", "line": i + 1,
                     "tags": json.dumps({"source": "human" if i < 6 else "synthetic"}),
                     "tag.source": "human" if i < 6 else "synthetic", "text": f"q{i}", "reference": f"a{i}",
                     "prediction": f"a{i}" if exact else "wrong", "loss": 0.001 if exact else 1.0 + i,
                     "token_f1": 1.0 if exact else 0.1 * (i % 3), "exact_match": 1.0 if exact else 0.0})
    result = mine_hard_examples("sft", pd.DataFrame(rows), n=10, tag_keys=["source"])
    listed = [e["example_id"] for e in result["examples"]]
    assert len(listed) == 8 and all(e["exact_match"] == 0.0 for e in result["examples"])
    assert not {"test:0001", "test:0004", "test:0007", "test:0010"} & set(listed)
    assert sum(r["test_count"] for r in result["lift"]["source"]) == 12
    assert sum(r["hard_count"] for r in result["lift"]["source"]) == 8
