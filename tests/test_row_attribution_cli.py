"""`verifily attribute RUN --rows` and `verifily dataset derive` end to end on tiny runs, through the CLI:
the parquet and the report section, a second call all cache hits, sharded = unsharded, derived versions
without exactly the flagged rows, user errors in one line; --verify's verdict on synthetic seeds."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import assert_user_error, cli_env, run_cli

TRAINING = {"num_epochs": 2, "batch_size": 8, "gradient_accumulation_steps": 1, "learning_rate": 5e-3,
            "max_seq_length": 48, "save_steps": 1000, "eval_steps": 1000, "logging_steps": 5}


def _train_in_process(folder: Path, task: str, model: Path, sizes: dict) -> Path:
    """A real Run from the pipeline runner without Prefect (the CLI calls below are what is tested)."""
    from verifily_train.config import load_config
    from verifily_train.fixtures.data import write_splits
    from verifily_train.pipeline.fingerprint import fingerprint_stage
    from verifily_train.pipeline.runner import CacheSettings, compute_stage, run_pipeline

    splits = write_splits(folder / "data", task, sizes, seed=4)
    (folder / "train.yaml").write_text(yaml.safe_dump({
        "task": task, "base_model": str(model), "data_paths": {k: str(v) for k, v in splits.items()},
        "training": TRAINING, "eval": {"bootstrap_samples": 0, "hard_examples": 2},
        "cache": {"dir": str(folder / "cache")}, "output": {"dir": str(folder / "runs")}}))
    cfg = load_config(str(folder / "train.yaml"))
    cache = CacheSettings.for_config(cfg)
    fp = fingerprint_stage(cfg, Path(cache.root))
    summary = run_pipeline(cfg, fp, folder / "runs", cache, lambda stage, ctx: compute_stage(stage, ctx, cache))
    return Path(summary["path"])


@pytest.fixture(scope="module")
def cls_run(models, tmp_path_factory):
    return _train_in_process(tmp_path_factory.mktemp("rows-cls"), "classification", models["bert"],
                             {"train": 40, "val": 8, "test": 16})


@pytest.fixture(scope="module")
def sft_run(models, tmp_path_factory):
    return _train_in_process(tmp_path_factory.mktemp("rows-sft"), "sft", models["llama"],
                             {"train": 24, "val": 6, "test": 12})


@pytest.fixture
def cli(prefect_api, monkeypatch, capsys):
    """``verifily ARGS`` in this process (the flow reports to the session's Prefect server); exit code and output."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from verifily_train.cli.main import main

    monkeypatch.setenv("PREFECT_API_URL", prefect_api)

    def call(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        with temporary_settings(updates={PREFECT_API_URL: prefect_api}):
            code = main(list(args))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(list(args), code, out, err)

    return call


def _json(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def _prefect_records(api_url: str):
    """Names of the flow runs' task runs, and the rows of every ``row-attribution`` table artifact."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        with get_client(sync_client=True) as client:
            names = {r.name for r in client.read_task_runs()}
            artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["row-attribution"])))
    return names, [json.loads(a.data) if isinstance(a.data, str) else a.data for a in artifacts]


def test_rows_on_classification_scores_every_row_caches_shards_and_derives(cls_run, cli, prefect_api):
    args = ["attribute", str(cls_run), "--rows", "--projection-dim", "64", "--methods", "all", "--json"]
    first = _json(cli(*args))
    folder = Path(first["path"])
    table = pd.read_parquet(folder / "row_attribution.parquet")
    method = first["default_method"]
    assert len(table) == first["train_rows"] == 40 and method == "loss" and "could not fit" in first["meaning"]
    for column in ("example_id", "split", "file", "line", "tags", "score_tracin", "rank_tracin", "score_loss",
                   "rank_label_issue"):
        assert column in table.columns, column
    assert sorted(table[f"rank_{method}"]) == list(range(1, 41)) and set(table["file"]) == {"train.jsonl"}
    assert first["most_harmful"][0]["rank"] == 1 and first["most_helpful"][0]["rank"] == 40
    assert {v["value"] for v in first["by_tag"]["source"]} == {"human", "synthetic", "ai_contaminated"}
    assert sum(v["sum"] for v in first["by_tag"]["source"]) == pytest.approx(table[f"score_{method}"].sum())
    # point values: a bootstrap over rows of one trained model carries no training variance
    assert not any(k.endswith("ci95") for v in first["by_tag"]["source"] for k in v)
    # two labelled families: suspect rows (no target; label issues in-sample) and attribution (on the test loss)
    suspect, attribution = first["families"]["suspect rows"], first["families"]["attribution"]
    assert suspect["default"] == "loss" and suspect["target"] is None and suspect["label_issue"] == "in-sample"
    assert attribution["default"] == "tracin" and attribution["target"] == "test"
    assert set(attribution["methods"]) == {"tracin", "tracin_adam"}
    assert attribution["most_harmful"][0]["rank"] == 1 and "score_tracin_adam" in table
    assert not any(s["cache_hit"] for s in first["stages"].values()) and first["checkpoints"] == 4
    assert first["cost"]["ratio"] == pytest.approx(first["cost"]["seconds"] / first["cost"]["train_stage_seconds"],
                                                   rel=1e-2)
    html = (folder / "report.html").read_text()
    assert "id='row-attribution'" in html and "Most suspect rows" in html and "Most harmful to the target" in html and first["most_harmful"][0]["text"] in html
    # immutable: checksummed, read-only, its integrity root in the ledger as a Run's is
    from verifily_train.artifacts.run import verify_run

    assert not (folder / "attribution.json").stat().st_mode & 0o222 and verify_run(folder) == 3

    again = cli(*args[:-1])  # the table printer this time
    assert again.returncode == 0, again.stderr
    assert "stages: 3 of 3 cache hits" in again.stdout and "most harmful to the target" in again.stdout
    assert "x the run's own train stage" in again.stdout and "by source" in again.stdout
    assert "== SUSPECT ROWS: ranked by loss" in again.stdout and "most suspect rows" in again.stdout
    assert "== ATTRIBUTION on the test loss (16 test rows): ranked by tracin" in again.stdout
    assert "most helpful to the target" in again.stdout and "no interval" in again.stdout
    html = (folder / "report.html").read_text()
    assert "Suspect rows (no target)" in html and "Attribution on the test loss" in html

    sharded = _json(cli(*args, "--shards", "2"))
    assert [k for k in sharded["stages_now"] if k.startswith("row_shard")] == ["row_shard[0]", "row_shard[1]"]
    assert sharded["stages_now"]["row_target"]["cache_hit"]  # the target is shared: only the shards re-ran
    # the scores are bitwise those of one pass, so the merged table and the folder are the same
    assert sharded["path"] == first["path"] and sharded["reused"]
    shard_runs, tables = _prefect_records(prefect_api)
    assert {"row-gradient-shard-1-of-2", "row-gradient-shard-2-of-2"} <= shard_runs
    assert any(row["row"] == first["most_harmful"][0]["example_id"] and row["direction"] == "harmful"
               for table_rows in tables for row in table_rows)

    derived = cli("dataset", "derive", str(cls_run), "--drop-top", "5")
    assert derived.returncode == 0, derived.stderr
    ref = derived.stdout.split()[1]
    from verifily_train.dataset.store import resolve

    child = resolve(ref)
    manifest = json.loads(Path(child.manifest_path).read_text())
    top5 = set(table.sort_values(f"rank_{method}")["row_hash"].head(5))
    rule = manifest["derived_from"]["rule"]["drop_train_rows"]
    assert set(rule["row_hashes"]) == top5 and rule["method"] == method and rule["top"] == 5
    from verifily_train.model.tokenize import row_hash

    kept = [row_hash(json.loads(line)) for f in child.split_files("train")
            for line in Path(f.abs_path).read_text().splitlines() if line.strip()]
    assert len(kept) == 35 and not top5 & set(kept) and set(kept) | top5 == set(table["row_hash"])
    assert cli("dataset", "derive", str(cls_run), "--drop-top", "5").stdout.split()[1] == ref  # reused


def test_rows_user_errors_are_one_line_and_write_nothing(cls_run, cli, tmp_path):
    out = tmp_path / "attr"
    # the first through a real subprocess, as a user sees it
    assert_user_error(run_cli("attribute", str(cls_run), "--rows", "--target", "train", "--out", str(out),
                              cwd=tmp_path, env=cli_env()), "--target", "test, val, slice")
    assert_user_error(cli("attribute", str(cls_run), "--rows", "--target", "slice:source=martian", "--out", str(out)),
                      "--target", "source=martian")
    assert_user_error(cli("attribute", str(cls_run), "--rows", "--shards", "0"), "--shards")
    assert_user_error(cli("attribute", str(cls_run), "--rows", "--methods", "loss,vibes"), "--methods", "vibes")
    assert_user_error(cli("attribute", str(cls_run), "--rows", "--verify", "40", "--seeds", "2"), "--verify", "40")
    assert_user_error(cli("attribute", str(cls_run), "--rows", "--verify", "3", "--seeds", "1"), "--verify", "--seeds")
    # --verify ranks with val by default; ranking TracIn on the test rows it is confirmed on is refused
    assert_user_error(cli("attribute", str(cls_run), "--rows", "--verify", "3", "--seeds", "3", "--select", "test"),
                      "--select", "16 rows are both", "--same-rows")
    assert_user_error(cli("attribute", str(cls_run), "--rows", "--select", "val"), "--select", "with --verify")
    assert_user_error(cli("dataset", "derive", str(cls_run), "--drop-top", "3", "--attribution", str(tmp_path)),
                      "--attribution")
    (tmp_path / "rows.txt").write_text("train:1\nnot-a-row\n")
    assert_user_error(cli("dataset", "derive", str(cls_run), "--drop-rows", str(tmp_path / "rows.txt")),
                      "rows.txt:2", "not-a-row")
    assert not out.exists()


def test_rows_without_snapshots_refuses_more_checkpoints(cls_run, tmp_path, cli):
    import shutil

    # a copy of the Run whose cache lost the train entry's snapshots (pruned, or attribution_snapshots: 0)
    run, cache = tmp_path / "runs" / cls_run.name, tmp_path / "cache"
    shutil.copytree(cls_run, run)
    shutil.copytree(cls_run.parent.parent / "cache", cache, ignore=shutil.ignore_patterns("attribution_snapshots"))
    from verifily_train.fsio import make_writable

    make_writable(run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump(dict(cfg, cache={**cfg["cache"], "dir": str(cache)})))
    from verifily_train.checksums import write_checksums

    write_checksums(run)  # the copy is re-checksummed (a Run that fails its checksums is refused first)
    assert_user_error(cli("attribute", str(run), "--rows", "--checkpoints", "3"), "--checkpoints", "no adapter snapshots")
    assert not (tmp_path / "attributions").exists()


def test_rows_on_sft_targets_a_slice_and_derives_named_rows(sft_run, cli):
    result = _json(cli("attribute", str(sft_run), "--rows", "--target", "slice:source=human", "--projection-dim", "32",
                       "--methods", "all", "--json"))
    folder = Path(result["path"])
    table = pd.read_parquet(folder / "row_attribution.parquet")
    assert len(table) == 24 and result["target"] == "slice:source=human" and "label_issue" not in result["methods"]
    assert 0 < result["target_rows"] < 12 and "slice-source=human" in folder.name
    assert np.isfinite(table["score_tracin"]).all() and "Most helpful to the target" in (folder / "report.html").read_text()
    chosen = [table["example_id"][0], table["row_hash"][3]]
    rows_file = folder.parent / "drop.txt"
    rows_file.write_text("# two rows\n" + "\n".join(chosen) + "\n")
    derived = cli("dataset", "derive", str(sft_run), "--drop-rows", str(rows_file))
    assert derived.returncode == 0, derived.stderr
    assert "22 train rows kept, 2 removed" in derived.stdout


def test_verify_verdict_from_seed_level_test_on_synthetic_seeds():
    """Removing the flagged rows lowers the loss at every seed -> confirmed; no difference -> not shown."""
    from verifily_train.attribution import FULL, control_arm
    from verifily_train.attribution.row_verify import ARM, analyze_verification, target_frame

    rng = np.random.default_rng(0)
    n_rows, seeds = 30, 4
    hashes = [f"h{i}" for i in range(n_rows)]
    tags = ["human" if i % 2 else "scraped" for i in range(n_rows)]

    def frame(loss):
        return pd.DataFrame({"loss": loss, "accuracy": (loss < 1).astype(float), "tag.source": tags},
                            index=pd.Index(hashes, name="row_hash"))

    def tables(shift):
        base = [rng.normal(1.0, 0.2, n_rows) + rng.normal(0, 0.02) for _ in range(seeds)]
        return {FULL: [frame(b) for b in base],
                ARM: [frame(b - shift + rng.normal(0, 0.01, n_rows)) for b in base],
                control_arm(5): [frame(b + rng.normal(0, 0.01, n_rows)) for b in base]}

    confirmed = analyze_verification("sft", tables(0.1), 5, 25, "ds@v1-without-top", bootstrap_samples=0)
    assert confirmed["verdict"] == "hurts" and confirmed["confirmed"] and confirmed["effect"] < -0.05
    assert len(confirmed["per_seed"]) == seeds and confirmed["p_adjusted"] <= 0.05
    assert confirmed["summary"].startswith("confirmed") and "top 5 rows removed" in confirmed["method"]
    null = analyze_verification("sft", tables(0.0), 5, 25, "ds@v1-without-top", bootstrap_samples=0)
    assert not null["confirmed"] and null["summary"].startswith("not shown") and null["mde"] > 0
    sliced = analyze_verification("sft", tables(0.1), 5, 25, "x", target="slice:source=human", bootstrap_samples=0)
    assert sliced["test_rows"] == 15 and len(target_frame(frame(np.ones(n_rows)), "slice:source=human")) == 15
    others = target_frame(frame(np.ones(n_rows)), "slice:source!=human")
    assert len(others) == 15 and set(others["tag.source"]) == {"scraped"}
    assert len(target_frame(frame(np.ones(n_rows)), "slice:lang!=en")) == n_rows  # untagged rows are not "en"


def test_random_control_of_a_data_paths_run_is_a_store_version(cls_run):
    """--verify's size-matched control (derive_random) on a run trained from data_paths, whose "version" is
    its content hash: the derived name starts with "v", not with "sha256:" (which no version name may)."""
    from verifily_train.attribution import derive_random
    from verifily_train.config import load_config
    from verifily_train.dataset.store import load_for_config

    cfg = load_config(str(cls_run / "config.yaml"))
    dv = load_for_config(cfg.dataset_version, cfg.data_paths, cfg.task)
    control = derive_random(dv, 3, 7)
    assert control["ref"].split("@")[1] == "v-without-random-3-seed7" and control["removed_rows"] == 3
    assert derive_random(dv, 3, 7)["content_hash"] == control["content_hash"]  # the same draw, reused
    # a second control of the same seed (attribute --controls 2) is another draw, another version; its rule says so
    second = derive_random(dv, 3, 7, draw=1)
    assert second["ref"].split("@")[1] == "v-without-random-3-seed7-draw1"
    assert second["content_hash"] != control["content_hash"]
    assert derive_random(dv, 3, 7, draw=1)["content_hash"] == second["content_hash"]
