"""`verifily compare` of two run groups: seed-level tests of "did the change move the metric?".

Runs are hand-built from prediction tables (no training) whose per-run metric varies by seed as a trained
run's does: a shared per-seed shift on every row plus row noise. A/A groups must stay unstarred at the
rate BH promises (P(any star) <= q); a uniform and a one-slice improvement must be starred where they are.
The real pipeline's figures are in bench/aa.py (docs/evaluation.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from conftest import assert_user_error, run_cli
from verifily_train.artifacts.groups import (compare_groups, render_group_comparison, render_group_markdown,
                                             resolve_side, write_group)
from verifily_train.errors import RunError
from verifily_train.evaluation.replicates import group_cells, seed_test
from verifily_train.evaluation.significance import mark_discoveries
from verifily_train.fixtures.runs import seal_run

SOURCES = ("human", "scraped", "synthetic")


def _frame(n: int, rng: np.random.Generator, seed_shift: float, gain: dict) -> pd.DataFrame:
    """An SFT prediction table: per-row loss = base (fixed per row) x the seed's shift x the slice gain."""
    base = np.random.default_rng(0).gamma(4.0, 0.5, n)  # the rows' difficulty: the same test rows in every run
    source = np.array([SOURCES[i % 3] for i in range(n)])
    factor = np.array([gain.get(s, 1.0) for s in source]) * (1.0 + seed_shift)
    n_tokens = np.full(n, 8)
    return pd.DataFrame({"example_id": [f"test:{i + 1}" for i in range(n)], "row_hash": [f"h{i}" for i in range(n)],
                         "tag.source": source, "loss_sum": n_tokens * base * factor * rng.normal(1.0, 0.02, n),
                         "n_tokens": n_tokens})


def _run(folder: Path, run_id: str, seed: int, frame: pd.DataFrame, lr: float = 0.001) -> Path:
    path = folder / run_id
    path.mkdir(parents=True)
    frame.to_parquet(path / "predictions.parquet", index=False)
    record = {"run_id": run_id, "status": "completed", "metrics": {},
              "job": {"task": "sft", "dataset_version": {"ref": "data@v1"}, "device": "cpu",
                      "config": {"seed": seed, "training": {"learning_rate": lr}}}}
    (path / "run.json").write_text(json.dumps(record))
    seal_run(path)
    return path


def _group(folder: Path, name: str, seeds, gain: dict, rng, lr: float = 0.001, seed_sd: float = 0.03):
    runs = [_run(folder, f"run_{name}{s}", s, _frame(120, rng, rng.normal(0, seed_sd), gain), lr) for s in seeds]
    return runs


def test_seed_test_is_welchs_t():
    a, b = [1.0, 1.2, 0.9, 1.1], [0.8, 1.0, 0.85, 0.9]
    welch = seed_test(a, b, alpha_mde=0.05)
    assert welch["p"] == pytest.approx(stats.ttest_ind(b, a, equal_var=False).pvalue)
    assert welch["ci95"][0] < welch["delta"] < welch["ci95"][1] and welch["mde"] > abs(welch["ci95"][1] - welch["delta"])
    # no spread on either side: no t, the exact relabelling test (3 + 3 runs: 20 relabellings, p >= 0.1)
    flat = seed_test([1.0, 1.0, 1.0], [2.0, 2.0, 2.0], alpha_mde=0.05)
    assert flat["p"] == pytest.approx(0.1) and "relabelling" in flat["test"]


def test_aa_groups_star_anything_at_most_q_of_the_time():
    """A fast guard on the yardstick: P(any star in a call) over simulated A/A calls with correlated cells
    (one seed shift moves every cell), 3 runs a side, Welch, BH at q=0.10 over 8 cells."""
    rng = np.random.default_rng(3)
    calls, any_star = 600, 0
    for _ in range(calls):
        cells = []
        for side in range(2):
            shift = rng.normal(0, 1.0, size=(3, 1))
            cells.append(shift + rng.normal(0, 0.5, size=(3, 8)))
        tested = [group_cells({"m": list(cells[0][:, c])}, {"m": list(cells[1][:, c])}, 0.10, 8)["m"]
                  for c in range(8)]
        any_star += mark_discoveries(tested, 0.10) > 0
    rate = any_star / calls
    assert rate <= 0.10 + 2 * np.sqrt(0.1 * 0.9 / calls), rate


def test_a_uniform_improvement_is_starred_overall_and_on_every_slice(tmp_path):
    rng = np.random.default_rng(5)
    a = _group(tmp_path, "a", [1, 2, 3], {}, rng)
    b = _group(tmp_path, "b", [1, 2, 3], {s: 0.8 for s in SOURCES}, rng)
    result = compare_groups({"group_id": None, "runs": a, "seeds": [1, 2, 3]},
                            {"group_id": None, "runs": b, "seeds": [1, 2, 3]})
    assert result["design"].startswith("Welch t over runs; both sides trained the same seeds")
    assert result["overall"]["loss"]["significant"]
    assert all(e["deltas"]["loss"]["significant"] for e in result["slices"]["source"].values())
    text = render_group_comparison(result)
    assert text.startswith("Question: did the change from A to B move each metric")
    assert "95% CI over seeds" in text and "detectable" in text


def test_a_one_slice_improvement_is_starred_there_and_nowhere_else(tmp_path):
    rng = np.random.default_rng(6)
    a = _group(tmp_path, "a", [1, 2, 3], {}, rng)
    b = _group(tmp_path, "b", [4, 5, 6], {"scraped": 0.75}, rng)
    result = compare_groups({"group_id": None, "runs": a, "seeds": [1, 2, 3]},
                            {"group_id": None, "runs": b, "seeds": [4, 5, 6]})
    assert result["design"] == "Welch t over runs (disjoint seeds)"
    source = result["slices"]["source"]
    assert source["scraped"]["deltas"]["loss"]["significant"]
    assert not source["human"]["deltas"]["loss"]["significant"]
    assert not source["synthetic"]["deltas"]["loss"]["significant"]
    markdown = render_group_markdown(result)
    assert "```" in markdown and "| source=scraped (n=40) | loss |" in markdown


def test_a_group_record_is_verified_and_compared_by_id_from_the_cli(tmp_path):
    rng = np.random.default_rng(7)
    runs_dir = tmp_path / "runs"
    a = _group(runs_dir, "a", [1, 2, 3], {}, rng)
    b = _group(runs_dir, "b", [1, 2, 3], {s: 0.8 for s in SOURCES}, rng, lr=0.002)
    ga = write_group(runs_dir, {"task": "sft", "seed": 1}, [{"run_id": r.name, "path": r, "seed": i + 1}
                                                           for i, r in enumerate(a)])
    gb = write_group(runs_dir, {"task": "sft", "seed": 1}, [{"run_id": r.name, "path": r, "seed": i + 1}
                                                           for i, r in enumerate(b)])
    verified = run_cli("runs", "verify", ga["group_id"], "--runs-dir", str(runs_dir), cwd=tmp_path)
    assert verified.returncode == 0 and verified.stdout.startswith("ok "), verified.stderr
    out = run_cli("compare", ga["group_id"], gb["group_id"], "--runs-dir", str(runs_dir), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert f"A: {ga['group_id']} (3 runs, seeds 1, 2, 3" in out.stdout
    assert "training.learning_rate: 0.001 -> 0.002" in out.stdout
    listed = run_cli("compare", "--a", ",".join(str(r) for r in a), "--b", ",".join(str(r) for r in b), cwd=tmp_path)
    assert listed.returncode == 0 and "design: Welch t over runs; both sides" in listed.stdout
    html = tmp_path / "groups.html"
    run_cli("compare", ga["group_id"], gb["group_id"], "--runs-dir", str(runs_dir), "--html", str(html), cwd=tmp_path)
    assert "data:image/png;base64," in html.read_text()
    # one run a side is not a group; a group against a run is refused; a tampered member is caught
    assert_user_error(run_cli("compare", "--a", str(a[0]), "--b", str(b[0]), cwd=tmp_path), "--a", "at least 2 runs")
    assert_user_error(run_cli("compare", ga["group_id"], str(b[0]), "--runs-dir", str(runs_dir), cwd=tmp_path),
                      "not a group with a run")
    import verifily_train as vt

    cells = vt.compare_groups(ga["path"], [str(r) for r in b]).cells  # the Python API: a group and a run list
    assert {"key", "value", "metric", "delta", "ci_low", "ci_high", "p_adjusted", "significant"} <= set(cells.columns)
    assert bool(cells.query("key == 'overall' and metric == 'loss'")["significant"].iloc[0])
    target = a[1] / "predictions.parquet"
    target.chmod(0o644)
    target.write_bytes(target.read_bytes() + b"x")
    with pytest.raises(RunError, match="refuses"):
        resolve_side([ga["group_id"]], runs_dir, "A")



def test_train_seeds_writes_a_group_and_compare_tests_a_change_end_to_end(tmp_path, models, cls_splits, prefect_api):
    """`verifily train --seeds 3` twice (a config change between), then `verifily compare` of the two groups."""
    from conftest import cli_env, write_config

    write_config(tmp_path, "classification", models["bert"], cls_splits, lora={"enabled": False},
                 training={"num_epochs": 1, "max_seq_length": 32},
                 eval={"hard_examples": 3, "bootstrap_samples": 0})
    env = cli_env({"PREFECT_API_URL": prefect_api})
    first = run_cli("train", "-c", "train.yaml", "--seeds", "3", cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    second = run_cli("train", "-c", "train.yaml", "--seeds", "3", "training.num_epochs=3", cwd=tmp_path, env=env)
    assert second.returncode == 0, second.stderr[-2000:]
    groups = [line.split()[2].rstrip(":") for out in (first, second) for line in out.stdout.splitlines()
              if line.startswith("Run group ")]
    assert len(groups) == 2 and all(g.startswith("group_") for g in groups)
    assert first.stdout.count("\nRun run_") == 3
    record = json.loads((tmp_path / "runs" / groups[0] / "group.json").read_text())
    assert record["seeds"] == [42, 43, 44] and len(record["members"]) == 3
    out = run_cli("compare", *groups, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    assert "design: Welch t over runs; both sides" in out.stdout and "training.num_epochs: 1 -> 3" in out.stdout
    assert "accuracy" in out.stdout and "95% CI over seeds" in out.stdout
