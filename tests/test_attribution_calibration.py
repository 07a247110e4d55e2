"""A fast guard of the calibration benchmark (bench/attribution.py): real trials at fixed seeds, both directions."""

from __future__ import annotations


def test_coin_flip_tags_are_called_no_measurable_effect(models, tmp_path):
    from bench.attribution import run_trial

    trial = run_trial("placebo-coin", 0, 3, str(models["bert"]), str(tmp_path))
    for value, entry in trial["values"].items():
        assert entry["verdict"].startswith("no measurable effect"), (value, entry)
        assert entry["mde"] > 0 and entry["removed_rows"] > 40  # half the rows removed, and no verdict


def test_a_source_with_random_labels_is_called_hurts(models, tmp_path):
    from bench.attribution import run_trial

    trial = run_trial("power-0.35", 0, 3, str(models["bert"]), str(tmp_path))
    assert trial["values"]["scraped"]["verdict"] == "hurts", trial["values"]["scraped"]
    assert trial["values"]["synthetic"]["verdict"] != "hurts", trial["values"]["synthetic"]
