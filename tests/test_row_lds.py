"""The LDS benchmark's pieces (bench/row_lds.py): seeded half-subsets, the linear prediction, the score itself."""

from __future__ import annotations

import numpy as np

from bench.row_lds import half_subsets, lds, predicted_effect


def test_half_subsets_are_seeded_and_keep_exactly_half():
    masks = half_subsets(41, 6, seed=3)
    assert masks.shape == (6, 41) and (masks.sum(axis=1) == 20).all()
    assert (half_subsets(41, 6, seed=3) == masks).all() and not (half_subsets(41, 6, seed=4) == masks).all()
    assert (half_subsets(41, 8, seed=3)[:6] == masks).all()  # more subsets extend the list, never redraw it


def test_lds_is_high_for_a_predictor_that_tracks_retraining_and_near_zero_for_noise():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=60)
    masks = half_subsets(60, 50, seed=0)
    predicted = predicted_effect(scores, masks)
    assert np.allclose(predicted, [scores[m].sum() for m in masks])
    good = lds(predicted, predicted + rng.normal(0, 0.1 * predicted.std(), 50), bootstrap=200)
    assert good["lds"] > 0.9 and good["ci95"][0] <= good["lds"] <= good["ci95"][1] and good["subsets"] == 50
    noise = lds(predicted, rng.normal(size=50), bootstrap=200)
    assert noise["ci95"][0] < 0 < noise["ci95"][1]


def test_paired_difference_and_pooling_over_parents():
    from bench.row_lds import lds_difference, pooled

    rng = np.random.default_rng(1)
    parents = []
    for _ in range(3):
        measured = rng.normal(size=60)
        good, noise = measured + rng.normal(0, 0.3, 60), rng.normal(size=60)
        parents.append({"measured_loss": measured.tolist(), "predicted": {"good": good, "tracin": noise},
                        "methods": {"good": lds(good, measured, bootstrap=50), "tracin": lds(noise, measured, bootstrap=50)}})
    diff = lds_difference(parents[0]["predicted"]["good"], parents[0]["predicted"]["tracin"], parents[0]["measured_loss"],
                          bootstrap=200)
    assert diff["ci95"][0] > 0 and diff["difference"] > 0.5
    summary = pooled(parents, "good", bootstrap=100)
    assert summary["ci95"][0] > 0.7 and summary["minus_tracin_ci95"][0] > 0.4 and len(summary["per_parent"]) == 3
    assert summary["over_parents_t95"][0] < summary["lds"] < summary["over_parents_t95"][1]
    assert pooled(parents, "tracin", bootstrap=50)["minus_tracin"] == 0.0
