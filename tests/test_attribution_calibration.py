"""A fast guard of the calibration benchmark (bench/attribution.py): a real placebo trial at fixed seeds.

The other direction (a source with random labels is called hurts) is guarded end to end by
tests/test_causal_attribution.py."""

from __future__ import annotations


def test_coin_flip_tags_are_called_no_measurable_effect(models, tmp_path):
    from bench.attribution import run_trial

    trial = run_trial("placebo-coin", 0, 3, str(models["bert"]), str(tmp_path))
    for value, entry in trial["values"].items():
        assert entry["verdict"].startswith("no measurable effect"), (value, entry)
        assert entry["mde"] > 0 and entry["removed_rows"] > 40  # half the rows removed, and no verdict

