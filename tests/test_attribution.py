"""The product's question end to end: a source with random labels shows up as the worst slice, dominates
the hard examples, and removing it is visible per slice in `verifily compare`; reports render."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import assert_user_error, run_cli, train, write_config

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CLS = {"training": {"num_epochs": 12, "batch_size": 16, "gradient_accumulation_steps": 1, "learning_rate": 3e-3,
                    "max_seq_length": 32, "save_steps": 1000, "eval_steps": 1000},
       "lora": {"enabled": False}, "eval": {"bootstrap_samples": 500, "hard_examples": 25}}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, models, prefect_api):
    """Run A trains on every source; run B on the same data without the ai_contaminated train rows."""
    from verifily_train.fixtures.data import write_splits

    root = tmp_path_factory.mktemp("attribution")
    splits = write_splits(root / "data", "classification", {"train": 240, "test": 120}, seed=5)
    clean = root / "data" / "train-clean.jsonl"
    clean.write_text("".join(line + "\n" for line in splits["train"].read_text().splitlines()
                             if json.loads(line)["tags"]["source"] != "ai_contaminated"))
    runs = []
    for name, train_file in (("with", splits["train"]), ("without", clean)):
        folder = root / name
        folder.mkdir()
        write_config(folder, "classification", models["bert"], {"train": train_file, "test": splits["test"]}, **CLS)
        result, run = train(folder, prefect_api)
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append((result, run))
    return root, runs


def test_noisy_source_is_the_worst_slice_and_dominates_hard_examples(two_runs):
    _, [(result, run), _] = two_runs
    values = json.loads((run / "slices.json").read_text())["slices"]["source"]["values"]
    accuracy = {v["value"]: v["metrics"]["accuracy"] for v in values}
    assert min(accuracy, key=accuracy.get) == "ai_contaminated"
    assert all("accuracy" in v["ci95"] for v in values)
    headline = json.loads((run / "run.json").read_text())["hard_examples_headline"]
    assert "source:ai_contaminated" in headline and "of the test set" in headline
    assert "hard examples: " in result.stdout and "source:ai_contaminated" in result.stdout


def test_compare_shows_each_slice_delta_with_a_paired_interval(two_runs):
    root, [(_, with_run), (_, without_run)] = two_runs
    result = run_cli("compare", str(with_run), str(without_run), "--json", cwd=root)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["paired"]["shared_examples"] == 120
    human = data["slices"]["source"]["human"]
    low, high = human["deltas"]["accuracy"]["ci95"]
    assert low <= human["deltas"]["accuracy"]["delta"] <= high
    assert "flips" in human
    train_diff = data["dataset_diff"]["splits"]["train"]
    removed = train_diff["by_tag"]["source"]["ai_contaminated"]["removed"]
    assert train_diff["removed"] == removed > 0 and train_diff["added"] == 0
    assert data["dataset_diff"]["splits"]["test"]["added"] == data["dataset_diff"]["splits"]["test"]["removed"] == 0
    assert any(d["key"] == "data_paths.train" for d in data["config_diff"])
    assert data["overall"]["accuracy"]["a"] == data["paired"]["deltas"]["accuracy"]["a"]  # A on the shared rows
    assert data["fdr"]["method"] == "benjamini-hochberg" and data["fdr"]["cells"] > 0
    assert human["deltas"]["accuracy"]["p_adjusted"] >= human["deltas"]["accuracy"]["p"]
    text = run_cli("compare", str(with_run), str(without_run), "--markdown", cwd=root).stdout
    assert "| accuracy |" in text and "Correlation, not causation. For causal attribution: verifily attribute RUN --by <tag>." in text
    assert f"Benjamini–Hochberg at q=0.10 over {data['fdr']['cells']} slice × metric cells" in text


def test_comparing_runs_of_different_tasks_is_a_clear_error(two_runs, tmp_path, models, sft_splits, prefect_api):
    root, [(_, cls_run), _] = two_runs
    write_config(tmp_path, "sft", models["llama"], sft_splits, training={"max_steps": 2})
    result, sft_run = train(tmp_path, prefect_api)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_user_error(run_cli("compare", str(cls_run), str(sft_run), cwd=root), "only runs of the same task compare")


def _screenshot_is_not_blank(page: Path, out: Path) -> None:
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run",
                    f"--user-data-dir={out.parent / ('chrome-' + out.stem)}", f"--screenshot={out}",
                    "--window-size=1200,1400", "--virtual-time-budget=5000", page.resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)
    import matplotlib.image

    pixels = matplotlib.image.imread(out)
    non_white = (pixels[..., :3] < 0.9).any(axis=-1).mean()
    assert non_white > 0.02, f"screenshot looks blank ({non_white:.3%} non-white pixels)"


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_run_and_compare_reports_render_in_headless_chromium(two_runs, tmp_path):
    root, [(_, with_run), (_, without_run)] = two_runs
    report = with_run / "report.html"
    text = report.read_text()
    assert "data:image/png;base64," in text and "http://" not in text and "https://" not in text
    assert "Confusion matrix" in text and "Hard examples" in text
    _screenshot_is_not_blank(report, tmp_path / "run.png")
    compare_html = tmp_path / "compare.html"
    result = run_cli("compare", str(with_run), str(without_run), "--html", str(compare_html), cwd=root)
    assert result.returncode == 0, result.stderr
    _screenshot_is_not_blank(compare_html, tmp_path / "compare.png")
