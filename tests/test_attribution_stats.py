"""Attribution verdicts: the value's rows are one draw against random subsets, arms are paired by row order,
tests are corrected, and the verdict is read on a declared target."""

from __future__ import annotations

import random

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from verifily_train.attribution import FULL, analyze, control_arm
from verifily_train.attribution.stats import adjust, claim_verdicts, one_draw_test, rank_test
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


def test_one_draw_test_counts_the_subset_spread_and_states_its_resolution():
    rng = np.random.default_rng(3)
    noise = list(rng.normal(0, 0.01, 8))
    # the value's removal is stable over seeds (small noise) but random subsets spread widely: a shift of one
    # subset spread is what any random subset could do, so it is no evidence against "one random draw"
    spread = list(rng.normal(0, 0.1, 8))
    within = [-0.1 + e for e in noise]
    cell = one_draw_test([w - r for w, r in zip(within, spread)], within, spread, family=2)
    assert cell["p"] > 0.05 and cell["subset_sd"] > 0.05
    assert cell["mde"] > 0.1 and cell["ci95"][0] < cell["mean"] < cell["ci95"][1]
    # the same shift against random subsets that barely move the target: far outside their spread
    tight = list(rng.normal(0, 0.01, 8))
    sharp = one_draw_test([w - r for w, r in zip(within, tight)], within, tight, family=2)
    assert sharp["p"] < 0.001 and sharp["subset_sd"] < 0.02 and sharp["mde"] < 0.1
    # deterministic (seeded pivots), and no test below three seeds
    assert one_draw_test(within, within, tight) == one_draw_test(within, within, tight)
    assert one_draw_test([0.1, 0.2], [0.1, 0.2], [0.0, 0.1])["p"] is None


def test_one_draw_test_holds_its_level_where_the_retired_seed_t_did_not():
    """A fast guard of bench/one_draw_sim.py: a coin-flip tag (the value's rows ARE one random subset) in the
    converged regime, where seed noise is nil and the retired one-sample t over seeds called placebos."""
    from bench.one_draw_sim import judge, trial

    rng = np.random.default_rng(11)
    for ratio in (0.0, 1.0):
        calls = [judge(trial(rng, ratio, 8, [60, 60], 120)) for _ in range(150)]
        new, old = sum(c[0] for c in calls), sum(c[1] for c in calls)
        assert new <= 15, (ratio, new)  # 10%: the simulation's own rate is 1-3% (docs/attribution.md)
        if ratio == 0.0:
            assert old >= 60, old  # the retired test: about 59% of calls at 8 seeds


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


def test_a_value_worse_than_random_subsets_hurts_and_seed_spread_alone_does_not():
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


def test_the_rank_p_is_distribution_free_and_a_hurts_says_its_p_is_the_normal_models():
    # exchangeable draws from a heavy-tailed (lognormal) distribution: P(rank p <= 0.1) stays at or below 0.1
    rng = np.random.default_rng(3)
    draws = rng.lognormal(0.0, 1.5, size=(4000, 17))
    helps = np.array([rank_test(d[0], d[1:])["helps_p"] for d in draws])  # loss: "helps" is above the controls
    for level in (1 / 17, 3 / 17, 9 / 17):
        assert np.mean(helps <= level) <= level + 0.015
    assert np.mean(helps <= 1 / 17) >= 1 / 17 - 0.015  # exact: the floor at 16 runs is reached that often
    assert rank_test(5.0, [0.0, 1.0, 2.0]) == {"rank_p": 0.25, "as_extreme": 0, "runs": 3, "floor": 0.25,
                                                "helps_p": 0.25}
    assert rank_test(1.0, [0.0, 1.0, 2.0])["rank_p"] == 0.75
    assert rank_test(5.0, [0.0, 1.0, 2.0], sign=1.0)["helps_p"] == 1.0  # higher is better: above is not "helps"
    # a "hurts" whose p (normal model) is below what 5 control runs can give distribution-free says so
    control = [0.02, -0.03, 0.01, 0.0, 0.03]
    bad = [c - 0.3 for c in control]
    result = analyze("sft", "source", _tables({FULL: [0.0] * 5, "a": bad, control_arm(20): control}), _plan("a"),
                     bootstrap_samples=0)
    entry = result["values"]["a"]
    cell = entry["slices"][entry["verdict_slice"]]["loss"]
    assert entry["verdict"] == "hurts" and cell["rank_p"] == pytest.approx(1 / 6) and cell["control_runs"] == 5
    assert "distribution-free: beyond all its 5 random-subset runs, rank p 0.167" in entry["why"]
    assert "that p is the normal model's, on the light side" in entry["why"]


def test_a_helps_needs_the_distribution_free_rank_p_and_a_hurts_does_not():
    # the same effect on either side, 5 seeds x 1 control: the normal model rejects both; the rank p (floor 2/6)
    # cannot certify the "helps" side, where random subsets' effects are heavy-tailed
    control = [0.02, -0.03, 0.01, 0.0, 0.03]
    tables = _tables({FULL: [0.0] * 5, "bad": [c - 0.3 for c in control], "good": [c + 0.3 for c in control],
                      control_arm(20): control})
    result = analyze("sft", "source", tables, _plan("bad", "good"), bootstrap_samples=0)
    bad, good = result["values"]["bad"], result["values"]["good"]
    assert bad["verdict"] == "hurts" and good["verdict"] == "not certified at this budget", good["why"]
    assert good["why"].startswith("not certified on ") and "under a normal model" in good["why"]
    assert "beyond all its 5 random-subset runs" in good["why"] and "79 control runs per size" in good["why"]
    assert "--controls 16" in good["why"] and "rank p" in result["method"]
    # with enough control runs (here 80 per size: 16 controls x 5 seeds) the rank p certifies a "helps" too
    many = {FULL: [0.0] * 5, "good": [c + 0.3 for c in control]}
    plan = _plan("good")
    names = [control_arm(20, k) for k in range(16)]
    for k, name in enumerate(names):
        many[name] = [c + 0.001 * k for c in control]
    plan["good"].update(controls=names)
    entry = analyze("sft", "source", _tables(many), plan, bootstrap_samples=0)["values"]["good"]
    assert entry["verdict"] == "helps", entry["why"]


def test_claims_leave_out_a_helps_no_rank_p_could_certify_tarone():
    def value(p, harmful, runs, effect):
        return {"p": p, "harmful": harmful, "removal_effect": effect, "random": [0.01 * k for k in range(runs)],
                "sign": -1.0}

    # 16 runs per size: the floor 1/17 is above 0.05 / 1, so no "helps" enters; the family is two "hurts" claims
    # and a harmful value's one-sided p (0.03 / 2) passes at 0.05 / 2, where the two-sided Holm p (0.06) did not
    out = claim_verdicts([value(0.03, True, 16, -1.0), value(1e-6, False, 16, 5.0)])
    assert [o["verdict"] for o in out] == ["hurts", None] and out[0]["family"] == 2
    assert out[0]["p_adjusted"] == pytest.approx(0.03) and not out[1]["helps_testable"]
    assert out[1]["p_adjusted"] == pytest.approx(1 / 17)  # an untestable "helps" shows its rank p, unadjusted
    # 80 runs: both "helps" claims are testable (1/81 <= 0.05 / 4) and the family is four claims
    out = claim_verdicts([value(0.03, True, 80, -1.0), value(1e-6, False, 80, 5.0)])
    assert out[1]["verdict"] == "helps" and out[1]["helps_testable"] and out[0]["family"] == 4
    assert out[1]["p_adjusted"] == pytest.approx(4 / 81)
    assert out[0]["verdict"] == "hurts" and out[0]["p_adjusted"] == pytest.approx(4 / 81)  # Holm: monotone
    # under the null the rank claim is exact: exchangeable heavy-tailed draws, many runs, any false "helps"
    rng = np.random.default_rng(5)
    false = 0
    for _ in range(2000):
        draws = rng.lognormal(0.0, 1.5, 81)
        false += claim_verdicts([value(0.5, False, 0, draws[0]) | {"random": list(draws[1:])}])[0]["verdict"] == "helps"
    assert false / 2000 <= 0.05 + 0.012


def test_default_values_are_those_present_in_the_train_rows_and_absent_ones_are_named():
    from verifily_train.errors import VerifilyError
    from verifily_train.attribution.plan import choose_values as _values

    record = {"job": {"dataset_version": {"tag_schema": {"source": {"values": ["human", "synthetic", "web"]}}}}}
    chosen, notes = _values(record, "source", None, {"human": 30, "web": 12})
    assert chosen == ["human", "web"]
    assert len(notes) == 1 and "source=synthetic" in notes[0] and "absent" in notes[0]
    assert _values(record, "source", ["web"], {"human": 30, "web": 12}) == (["web"], [])
    with pytest.raises(VerifilyError, match="no train rows have source=synthetic"):
        _values(record, "source", ["synthetic"], {"human": 30, "web": 12})
    with pytest.raises(VerifilyError, match="--by"):
        _values(record, "coin", None, {})


def _shifted_tables(n_seeds=8, n_rows=60):
    """Value "a" is clean but covers its own kind of test rows: removing it raises loss on its rows a lot and
    lowers it a little on the others (the model specialises); random removal moves every row a little."""
    rng = np.random.default_rng(5)
    tags = np.array(["a", "b", "c"] * (n_rows // 3))
    base = rng.normal(1.0, 0.3, n_rows)
    own = (tags == "a").astype(float)

    def arm(per_row_shift, noise=0.01):
        return [pd.DataFrame({"tag.source": tags, "loss": base + per_row_shift + rng.normal(0, noise) +
                              rng.normal(0, 0.005, n_rows)}, index=[f"r{i}" for i in range(n_rows)])
                for _ in range(n_seeds)]

    return {FULL: arm(0.0), "a": arm(0.6 * own - 0.05 * (1 - own)), control_arm(20): arm(0.03)}


def test_the_verdict_is_read_on_the_declared_target_and_other_slices_are_descriptive():
    tables = _shifted_tables()
    plan = _plan("a")
    whole = analyze("sft", "source", tables, plan, target="test", bootstrap_samples=0)
    entry = whole["values"]["a"]
    assert whole["target"]["words"] == "the test split (60 rows)" and entry["verdict_slice"] == "overall"
    # on the whole test split a clean source that covers rows no other source does is not "hurts"; its "helps"
    # is on the heavy-tailed side, which 8 control runs cannot certify distribution-free
    assert entry["verdict"] == "not certified at this budget", entry["why"]
    assert entry["why"].startswith("not certified on the test split (60 rows): removing its 20 rows raised loss by")
    assert "more than removing 20 random rows" in entry["why"] and "x the spread of random subsets" in entry["why"]
    # the rows without "a" are a slice the arms change unequally: there the same clean source looks harmful,
    # which is why that slice is descriptive unless a user names it as the target
    rest = entry["slices"]["source!=a"]["loss"]
    assert rest["effect"] < 0
    chosen = analyze("sft", "source", tables, plan, target="slice:source!=a", bootstrap_samples=0)
    assert chosen["values"]["a"]["verdict_slice"] == "source!=a"
    assert chosen["target"]["words"] == "test rows with source!=a (40 rows)"
    assert "conditional on these 40 target rows" in chosen["conditional"]


def test_a_target_the_run_cannot_score_is_one_line_naming_the_flag():
    from verifily_train.attribution.target import check_target, default_target
    from verifily_train.errors import ConfigError

    record = {"evaluation": {"split": "test"}, "metrics": {"loss": 1.0}}
    assert default_target(record) == "test"
    assert default_target({"evaluation": {"split": "test"}, "metrics": {"gold_token_f1": 0.5}}) == "gold"
    assert default_target({"evaluation": {"split": "val"}, "metrics": {}}) == "val"
    tags = {"source": {"human", "web"}}
    assert check_target("slice:source=web", record, tags) == "slice:source=web"
    for target, fragment in (("val", "evaluated on the test split"), ("gold", "no gold set"),
                             ("slice:source=martian", "source=martian"), ("slice:lang=de", "'lang'"),
                             ("train", "must be test, val, gold")):
        with pytest.raises(ConfigError, match="--target") as err:
            check_target(target, record, tags)
        assert fragment in str(err.value), (target, str(err.value))


def test_a_value_arm_noisier_than_its_controls_does_not_shrink_the_null_to_the_seed_t():
    """A converged-regime placebo call (bench/attribution.py, trial 5 of the converged placebo): the coin
    value's own arm spread more over seeds than its 16 controls, so var(y) - var(x) < 0 and, without the
    floor, the null was var(d) / seeds, the seed-only t: a false "helps" at p 0.027 after Holm."""
    x = [-0.002, 0.091, 0.317, 0.187, 0.08, 0.199, 0.034, 0.062]
    y = [-0.008, -0.043, 0.016, 0.028, -0.002, 0.003, 0.012, 0.044, 0.0, 0.015, 0.022, 0.164, -0.014, -0.042,
         -0.011, 0.018]
    per_seed = [sum(y[2 * i:2 * i + 2]) / 2 for i in range(8)]
    diffs = [a - b for a, b in zip(x, per_seed)]
    collapsed = one_draw_test(diffs, x, y, family=2, floor=0.0)
    kept = one_draw_test(diffs, x, y, family=2)
    assert collapsed["subset_sd"] == 0.0 and collapsed["p"] * 2 < 0.05  # what the test did before the floor
    assert kept["subset_sd"] > 0.0 and kept["p"] * 2 > 0.05  # Holm over the two coin values: no verdict
