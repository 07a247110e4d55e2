"""`verifily compare` stars only what survives one Benjamini–Hochberg correction over every slice x metric
cell, computes A, B and B - A on the same shared rows, and says what else makes two runs less comparable.

The runs here are built directly from prediction tables (no training): a placebo (A and B exchangeable
noise) must star little or nothing, a planted difference in one slice must be starred.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import assert_user_error, run_cli
from verifily_train.artifacts.comparability import comparability_caveats, run_facts
from verifily_train.artifacts.compare import SEED_NOTE, compare_runs, legend, render_comparison
from verifily_train.fixtures.runs import seal_run
from verifily_train.errors import ConfigError
from verifily_train.evaluation.significance import benjamini_hochberg, mcnemar_exact_p, paired_permutation_pvalues

SOURCES = ("human", "scraped", "synthetic", "forum")


def _sft_frame(n: int, rng: np.random.Generator, hashes=None) -> pd.DataFrame:
    n_tokens = rng.integers(4, 12, n)
    return pd.DataFrame({
        "example_id": [f"test:{i + 1}" for i in range(n)],
        "row_hash": hashes if hashes is not None else [f"h{i}" for i in range(n)],
        "tag.source": [SOURCES[i % len(SOURCES)] for i in range(n)],
        "tag.length": ["long" if i % 3 == 0 else "short" for i in range(n)],
        "loss_sum": n_tokens * rng.gamma(4.0, 0.5, n), "n_tokens": n_tokens,
        "exact_match": (rng.random(n) < 0.4).astype(float), "token_f1": rng.beta(2, 2, n),
        "format_ok": (rng.random(n) < 0.8).astype(float),
    })


def _cls_frame(n: int, accuracy, rng: np.random.Generator) -> pd.DataFrame:
    label = rng.integers(0, 3, n)
    right = rng.random(n) < accuracy
    pred = np.where(right, label, (label + rng.integers(1, 3, n)) % 3)
    return pd.DataFrame({"example_id": [f"test:{i + 1}" for i in range(n)], "row_hash": [f"h{i}" for i in range(n)],
                         "tag.source": [SOURCES[i % len(SOURCES)] for i in range(n)],
                         "label_id": label, "pred_id": pred, "correct": pred == label})


def _write_run(folder: Path, run_id: str, task: str, predictions: pd.DataFrame, **record) -> Path:
    folder.mkdir(parents=True)
    predictions.to_parquet(folder / "predictions.parquet", index=False)
    if task == "classification":
        (folder / "adapter").mkdir()
        (folder / "adapter/labels.json").write_text(json.dumps({"labels": ["a", "b", "c"]}))
    base = {"run_id": run_id, "status": "completed", "metrics": {"train_loss": 1.0},
            "job": {"task": task, "dataset_version": {"ref": "data@v1"}, "config": {"seed": 0}, "device": "cpu"},
            "precision": "fp32", "quantization": "none", "model_identity": "sha256:" + "ab" * 32}
    base.update(record)
    (folder / "run.json").write_text(json.dumps(base))
    seal_run(folder)  # compare verifies a Run before reading it
    return folder


def _placebo_pair(tmp_path: Path, seed: int, n: int = 400):
    """A and B: the same per-row distribution, drawn independently (an A/A comparison)."""
    rng = np.random.default_rng(seed)
    a = _write_run(tmp_path / f"a{seed}", f"run_a{seed}", "sft", _sft_frame(n, rng))
    b = _write_run(tmp_path / f"b{seed}", f"run_b{seed}", "sft", _sft_frame(n, rng))
    return a, b


def test_exchangeable_runs_get_few_or_no_stars_after_bh(tmp_path):
    flagged, cells = 0, 0
    for seed in range(4):
        a, b = _placebo_pair(tmp_path, seed)
        result = compare_runs(a, b, bootstrap_samples=200, permutations=999)
        flagged += result["fdr"]["discoveries"]
        cells += result["fdr"]["cells"]
    # 4 comparisons x 28 cells of pure noise (7 groups x exact_match, format, loss, token_f1; perplexity
    # shares loss's test): BH at q=0.10 bounds P(any star) by 0.10 per comparison
    assert cells == 4 * 28
    assert flagged <= 2, f"{flagged} of {cells} placebo cells starred"


def test_a_planted_difference_in_one_slice_is_starred_and_the_rest_is_not(tmp_path):
    rng = np.random.default_rng(11)
    frame_a = _cls_frame(800, 0.7, rng)
    frame_b = frame_a.copy()
    # on a third of the rows B's prediction is redrawn at A's accuracy: flips both ways, no direction
    noise = rng.random(len(frame_b)) < 0.3
    label = frame_b.loc[noise, "label_id"].to_numpy()
    right = rng.random(len(label)) < 0.7
    frame_b.loc[noise, "pred_id"] = np.where(right, label, (label + rng.integers(1, 3, len(label))) % 3)
    forum = (frame_b["tag.source"] == "forum").to_numpy()
    frame_b.loc[forum, "pred_id"] = frame_b.loc[forum, "label_id"]  # B gets every forum row right
    frame_b["correct"] = frame_b["pred_id"] == frame_b["label_id"]
    a = _write_run(tmp_path / "a", "run_a", "classification", frame_a)
    b = _write_run(tmp_path / "b", "run_b", "classification", frame_b)
    result = compare_runs(a, b, bootstrap_samples=200, permutations=999)
    forum_cell = result["slices"]["source"]["forum"]["deltas"]["accuracy"]
    assert forum_cell["delta"] > 0.2 and forum_cell["significant"] and forum_cell["p_adjusted"] <= 0.10
    others = [result["slices"]["source"][s]["deltas"]["accuracy"] for s in SOURCES if s != "forum"]
    assert not any(c["significant"] for c in others)
    text = render_comparison(result)
    forum_line = next(line for line in text.splitlines() if line.strip().startswith("forum"))
    assert forum_line.split()[2] == "accuracy" and "] *" in forum_line  # value, n, metric, A, B, B - A [CI] *
    assert f"Benjamini–Hochberg at q=0.10 over {result['fdr']['cells']} slice × metric cells" in text


def test_star_needs_the_bh_adjusted_p_not_an_interval_that_excludes_zero():
    p = [0.001, 0.02, 0.03, 0.04, 0.5]
    from scipy import stats

    assert benjamini_hochberg(p) == pytest.approx(list(stats.false_discovery_control(p, method="bh")))
    # 0.04 alone would "exclude zero" at 95%; over 20 cells BH adjusts it to 0.8
    assert benjamini_hochberg([0.04] + [0.9] * 19)[0] == pytest.approx(0.8)


def test_a_01_metric_is_tested_exactly_by_mcnemar():
    a = np.array([1, 1, 1, 1, 1, 1, 0, 0, 0, 0], float)
    b = np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 1], float)  # 6 rows right->wrong, 1 wrong->right
    from scipy import stats

    assert mcnemar_exact_p(a, b) == pytest.approx(stats.binomtest(1, 7, 0.5).pvalue)
    assert mcnemar_exact_p(a, a) == 1.0


def test_the_swap_test_is_exact_on_a_small_slice():
    """Ten rows: every one of the 2**10 swaps is enumerated (Wilcoxon-free, for the mean of token F1)."""
    rng = np.random.default_rng(3)
    fa, fb = _sft_frame(10, rng), _sft_frame(10, rng)
    fb["token_f1"] = fa["token_f1"] + 0.1 + 0.01 * np.arange(10)  # B higher on every row
    p = paired_permutation_pvalues("sft", fa, fb, [], 9999, seed=0)
    assert p["token_f1"] == pytest.approx(2 / 2 ** 10)  # only "no swap" and "swap all" reach |delta|


def test_a_and_b_columns_are_on_the_shared_rows_when_test_sets_differ(tmp_path):
    rng = np.random.default_rng(5)
    frame_a = _sft_frame(120, rng)
    frame_b = _sft_frame(100, rng, hashes=[f"h{i}" for i in range(40, 140)])  # rows 40..119 are shared
    a = _write_run(tmp_path / "a", "run_a", "sft", frame_a, metrics={"loss": 9.0, "train_loss": 1.0})
    b = _write_run(tmp_path / "b", "run_b", "sft", frame_b, metrics={"loss": 1.0, "train_loss": 0.5})
    result = compare_runs(a, b, bootstrap_samples=100, permutations=199)
    assert (result["paired"]["shared_examples"], result["paired"]["rows_a"], result["paired"]["rows_b"]) == (80, 120, 100)
    shared_a = frame_a[frame_a["row_hash"].isin({f"h{i}" for i in range(40, 120)})]
    loss_a = shared_a["loss_sum"].sum() / shared_a["n_tokens"].sum()
    assert result["overall"]["loss"]["a"] == pytest.approx(loss_a)  # not run.json's whole-run 9.0
    assert result["overall"]["loss"]["delta"] == pytest.approx(result["overall"]["loss"]["b"] - loss_a)
    assert result["run_level"]["train_loss"]["delta"] == pytest.approx(-0.5)
    text = render_comparison(result)
    assert "paired on 80 shared test rows (A evaluated 120, B 100" in text


def test_compare_prints_one_caveat_per_difference_that_weakens_the_comparison(tmp_path):
    rng = np.random.default_rng(7)
    frame = _sft_frame(40, rng)
    a = _write_run(tmp_path / "a", "run_a", "sft", frame, precision="bf16",
                   reproducibility={"components": {"tokenizer_identity": "sha256:" + "11" * 32,
                                                   "tool_version": "0.4.0", "device_kind": "cuda",
                                                   "gpu_name": "NVIDIA H100"}})
    b = _write_run(tmp_path / "b", "run_b", "sft", frame, precision="fp32", model_identity="sha256:" + "cd" * 32,
                   reproducibility={"components": {"tokenizer_identity": "sha256:" + "22" * 32,
                                                   "tool_version": "0.5.0", "device_kind": "cpu"}})
    result = compare_runs(a, b, bootstrap_samples=50, permutations=99)
    fields = [c["field"] for c in result["comparability"]]
    assert fields == ["precision", "model", "tokenizer", "tool_version", "device"]
    text = render_comparison(result)
    assert "caveat: precision differs (A bf16, B fp32): generation may differ on identical weights" in text
    assert "caveat: base model identity differs (A sha256:abababababab, B sha256:cdcdcdcdcdcd)" in text
    assert "caveat: tokenizer identity differs" in text and "caveat: device kind differs (A cuda, B cpu)" in text
    assert result["fdr"]["discoveries"] == 0  # identical predictions: nothing to star


def test_an_old_run_json_without_identities_is_named_not_guessed(tmp_path):
    rng = np.random.default_rng(8)
    frame = _sft_frame(20, rng)
    old = {"run_id": "old", "job": {"task": "sft", "dataset_version": {"ref": "v1"}, "config": {}}}
    facts = run_facts(tmp_path, old)
    assert facts["precision"] is None and facts["tokenizer"] is None
    lines = [c["line"] for c in comparability_caveats(facts, facts)]
    assert lines == ["note: A does not record its precision, base model identity, tokenizer identity, "
                     "verifily-train version, device kind; B does not record its precision, base model identity, "
                     "tokenizer identity, verifily-train version, device kind: not checked"]
    a = _write_run(tmp_path / "a", "run_a", "sft", frame)
    assert compare_runs(a, a, bootstrap_samples=0, permutations=99)["comparability"][0]["field"] == "unrecorded"


def test_fdr_q_comes_from_the_flag_then_the_runs_config(tmp_path):
    a, b = _placebo_pair(tmp_path, 0, n=40)
    assert compare_runs(a, b, bootstrap_samples=0, permutations=99)["fdr"]["q"] == 0.10
    assert compare_runs(a, b, bootstrap_samples=0, permutations=99, fdr_q=0.05)["fdr"]["q"] == 0.05
    with pytest.raises(ConfigError, match="--fdr-q: must be a number between 0 and 1"):
        compare_runs(a, b, fdr_q=1.0)
    result = run_cli("compare", str(a), str(b), "--fdr-q", "0", cwd=tmp_path)
    assert_user_error(result, "--fdr-q: must be a number between 0 and 1 (exclusive); got 0.0")
    shown = run_cli("compare", str(a), str(b), "--fdr-q", "0.2", "--permutations", "99", "--json", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["fdr"]["q"] == 0.2


def test_eval_fdr_q_outside_zero_one_is_a_config_error(tmp_path):
    from verifily_train.config import load_config

    config = tmp_path / "train.yaml"
    config.write_text("task: sft\nbase_model: org/model\ndata_paths:\n  train: data/train.jsonl\n")
    with pytest.raises(ConfigError, match=r"eval\.fdr_q: must be between 0 and 1 \(exclusive\); got 1\.5"):
        load_config(config, ["eval.fdr_q=1.5"])


def test_perplexity_shares_the_loss_test_and_counts_once(tmp_path):
    rng = np.random.default_rng(12)
    frame_a = _sft_frame(200, rng)
    frame_b = frame_a.copy()
    human = (frame_b["tag.source"] == "human").to_numpy()
    frame_b.loc[human, "loss_sum"] *= 0.5  # B halves the loss of every human row
    a = _write_run(tmp_path / "a", "run_a", "sft", frame_a)
    b = _write_run(tmp_path / "b", "run_b", "sft", frame_b)
    result = compare_runs(a, b, bootstrap_samples=100, permutations=999)
    human_cells = result["slices"]["source"]["human"]["deltas"]
    assert human_cells["loss"]["significant"] and human_cells["perplexity"]["significant"]
    assert human_cells["perplexity"]["same_test_as"] == "loss"
    assert human_cells["perplexity"]["p_adjusted"] == human_cells["loss"]["p_adjusted"]
    assert result["fdr"]["cells"] == 7 * 4  # 7 groups x (exact_match, format_compliance, loss, token_f1)
    assert not result["slices"]["source"]["forum"]["deltas"]["loss"]["significant"]


def test_a_uniform_improvement_over_every_slice_is_starred(tmp_path):
    """The review's case: B halves the loss of every row. The row-level test answers "do these two models
    differ on these rows?", so the overall cell and every slice are starred (no between-slice spread hides it)."""
    rng = np.random.default_rng(21)
    frame_a = _sft_frame(300, rng)
    frame_b = frame_a.copy()
    frame_b["loss_sum"] = frame_b["loss_sum"] * 0.5 * rng.normal(1.0, 0.05, len(frame_b))
    a = _write_run(tmp_path / "a", "run_a", "sft", frame_a)
    b = _write_run(tmp_path / "b", "run_b", "sft", frame_b)
    result = compare_runs(a, b, bootstrap_samples=100, permutations=999)
    loss_cells = [result["paired"]["deltas"]["loss"]] + [e["deltas"]["loss"] for values in result["slices"].values()
                                                         for e in values.values()]
    assert all(c["significant"] for c in loss_cells)
    text = render_comparison(result)
    assert text.startswith("Question: do these two models (A and B) differ on these test rows?")
    assert "two runs that differ only in their seed differ like this too" in text
    assert "verifily train --seeds 5" in text


def test_a_gain_on_two_of_three_sources_is_starred_there_only(tmp_path):
    rng = np.random.default_rng(22)
    frame_a = _sft_frame(300, rng)
    frame_b = frame_a.copy()
    gained = frame_b["tag.source"].isin(["human", "scraped"]).to_numpy()
    frame_b.loc[gained, "loss_sum"] *= 0.7
    a = _write_run(tmp_path / "a", "run_a", "sft", frame_a)
    b = _write_run(tmp_path / "b", "run_b", "sft", frame_b)
    result = compare_runs(a, b, bootstrap_samples=100, permutations=999)
    source = result["slices"]["source"]
    assert source["human"]["deltas"]["loss"]["significant"] and source["scraped"]["deltas"]["loss"]["significant"]
    assert not source["synthetic"]["deltas"]["loss"]["significant"]
    assert not source["forum"]["deltas"]["loss"]["significant"]


def test_the_terminal_table_has_a_b_and_delta_headers_and_short_lines(tmp_path):
    """The new user's complaint: no A / B / B - A headers and ~200-character lines. Slices print one metric per
    line under a header row; only the legend's prose lines may run long."""
    a, b = _placebo_pair(tmp_path, 3, n=60)
    result = compare_runs(a, b, bootstrap_samples=50, permutations=99)
    lines = render_comparison(result).splitlines()
    assert lines[0].startswith("Question: do these two models (A and B) differ on these test rows?")
    header = next(line for line in lines if line.split()[:1] == ["metric"])
    assert header.split() == ["metric", "A", "B", "B", "-", "A", "[95%", "CI]"]
    assert [line.split()[:4] for line in lines if line.split()[:1] == ["value"]] == [
        ["value", "n", "metric", "A"]] * 2  # one header per slice key (length, source)
    prose = {result["caveat"], legend(result["fdr"]), SEED_NOTE} | {c["line"] for c in result["comparability"]}
    assert max(len(line) for line in lines if line not in prose) <= 120
    human = lines.index(next(line for line in lines if line.strip().startswith("human")))
    cells = [line.split() for line in lines[human:human + 5]]
    assert [c[0] for c in cells[1:]] == ["format_compliance", "loss", "perplexity", "token_f1"]
    flips = result["slices"]["source"]["human"]["flips"]
    assert cells[0][:3] == ["human", "15", "exact_match"]
    assert cells[0][-5:] == [str(flips["wrong_to_right"]), "up", "/", str(flips["right_to_wrong"]), "down"]
    markdown = render_comparison(result, markdown=True)
    assert "| value | n | metric | A | B | B - A [95% CI] | flips |" in markdown
