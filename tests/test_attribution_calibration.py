"""Fast guards of the calibration benchmark (bench/attribution.py): one real trial of each experiment at the
CLI's defaults (8 seeds, 2 controls per size and seed, the whole test split as the target, Holm), on the tiny
BERT fixture.

Each trial is deterministic (its data, seeds and random subsets come from its name), so these are regression
guards of the measured behaviour, not new measurements: the rates with their intervals are in
docs/attribution.md. The trials named here are ones the benchmark ran; the placebo and shifted ones are
typical (no trial of either was called wrongly), the power one is one of the trials where the harmful
source was found (half of them at 8 seeds in this noisy regime, docs/attribution.md says why).
The converged regime is guarded by the simulation in test_attribution_stats.py and by one of its real
placebo trials replayed there (a value arm noisier than its controls).
"""

from __future__ import annotations

import pytest

from verifily_train.attribution.stats import DEFAULT_SEEDS

pytestmark = pytest.mark.slow


def test_a_coin_flip_tag_gets_no_verdict_at_the_defaults(models, tmp_path):
    from bench.attribution import run_trial

    trial = run_trial("noisy", "placebo-coin", 0, DEFAULT_SEEDS, str(models["bert"]), str(tmp_path))
    for value, entry in trial["values"].items():
        assert entry["verdict"].startswith("no measurable effect"), (value, entry)
        assert entry["mde"] > 0 and entry["removed_rows"] > 40  # half the rows removed, and no verdict


def test_clean_sources_that_differ_are_not_called_hurts_on_the_whole_test_split(models, tmp_path):
    from bench.attribution import run_trial

    trial = run_trial("noisy", "shifted", 3, DEFAULT_SEEDS, str(models["bert"]), str(tmp_path))
    for value, entry in trial["values"].items():
        # each source alone covers its own kind of test rows: removing it is worse than removing random rows
        assert entry["verdict"] != "hurts", (value, entry)
        assert entry["effect"] > 0 and entry["effect_on_own_rows"] > entry["effect"], (value, entry)


def test_a_source_with_random_labels_is_called_hurts_at_the_defaults(models, tmp_path):
    from bench.attribution import run_trial

    trial = run_trial("noisy", "power", 29, DEFAULT_SEEDS, str(models["bert"]), str(tmp_path))
    scraped, human = trial["values"]["scraped"], trial["values"]["human"]
    assert scraped["removed_rows"] >= 100 and scraped["verdict"] == "hurts", scraped
    assert human["verdict"] != "hurts", human
