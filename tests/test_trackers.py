"""training.report_to: [mlflow] against a real MLflow store (SQLite, in-process): what a run logs, read back."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli, train, write_config

mlflow = pytest.importorskip("mlflow")  # the dev extra installs it


def test_a_run_logs_its_identity_loss_curve_and_slice_metrics_to_mlflow(tmp_path, models, sft_splits, prefect_api,
                                                                       monkeypatch):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "verifily-tests")
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is relative to the working folder
    write_config(tmp_path, "sft", models["llama"], sft_splits, eval={"slice_by_tags": ["source"]},
                 training={"report_to": ["mlflow"]})
    result, run = train(tmp_path, prefect_api)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "did not take the Run's results" not in result.stderr
    record = json.loads((run / "run.json").read_text())

    client = mlflow.tracking.MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("verifily-tests")
    [logged] = client.search_runs([experiment.experiment_id])
    assert logged.info.run_name == record["run_id"] and logged.info.status == "FINISHED"
    tags, params, metrics = logged.data.tags, logged.data.params, logged.data.metrics
    assert tags["verifily.run_id"] == record["run_id"]
    assert tags["verifily.dataset_content_hash"] == record["job"]["dataset_version"]["content_hash"]
    assert tags["verifily.reproducibility_hash"] == record["reproducibility_hash"]
    assert tags["verifily.train_cached"] == "false"
    assert params["config.lora.r"] == "16" and params["config.training.num_epochs"] == "2"
    assert "learning_rate" in params  # the Trainer's own params, in the same MLflow run
    curve = client.get_metric_history(logged.info.run_id, "loss")  # logged by the Trainer, step by step
    assert len(curve) >= 3 and [m.step for m in curve] == sorted(m.step for m in curve)
    assert metrics["final/loss"] == pytest.approx(record["metrics"]["loss"])
    slices = json.loads((run / "slices.json").read_text())["slices"]["source"]["values"]
    human = next(e for e in slices if e["value"] == "human")
    assert metrics["slice/source:human/loss"] == pytest.approx(human["metrics"]["loss"])
    assert metrics["slice/source:human/n"] == human["n"]
    artifacts = {a.path for a in client.list_artifacts(logged.info.run_id)}
    assert {"run.json", "report.html", "config.yaml"} <= artifacts

    # a Run whose Trainer did not run here (a replay: every stage cached) gets its loss curve from trainer_log.jsonl
    from verifily_train.artifacts.trackers import MlflowTracking
    from verifily_train.cli.summary import summary_from_run
    from verifily_train.config import load_config

    tracking = MlflowTracking(load_config(run / "config.yaml"), "run_replayed")
    assert tracking.completed(dict(summary_from_run(str(run)), run_id="run_replayed")) == []
    replayed = client.get_run(tracking.mlflow_run_id)
    assert replayed.info.run_name == "run_replayed" and replayed.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(replayed.info.run_id, "loss")] == \
        [(m.step, m.value) for m in curve]

    # compare and attribute, when asked, log to the same experiment, nested under the Run's MLflow run
    compared = run_cli("compare", str(run), str(run), "--report-to", "mlflow", cwd=tmp_path)
    assert compared.returncode == 0 and "logged to MLflow run" in compared.stderr, compared.stderr[-2000:]
    [cmp_run] = client.search_runs([experiment.experiment_id], filter_string="tags.`verifily.kind` = 'compare'")
    assert cmp_run.data.tags["mlflow.parentRunId"] == logged.info.run_id
    assert cmp_run.data.metrics["delta/loss"] == 0.0 and cmp_run.data.metrics["significant/loss"] == 0.0
    assert "delta/slice/source:human/loss" in cmp_run.data.metrics
    assert {"comparison.json", "comparison.txt"} <= {a.path for a in client.list_artifacts(cmp_run.info.run_id)}

    from verifily_train.artifacts.trackers import log_attribution

    verdict = {"primary_metric": "loss", "by": "source", "values": {"human": {
        "removed_rows": 16, "verdict": "hurts", "verdict_slice": "overall", "p_adjusted": 0.01, "why": "...",
        "slices": {"overall": {"loss": {"effect": 0.25, "ci95": [0.1, 0.4], "mde": 0.08}}}}}}
    attributed = client.get_run(log_attribution(verdict, record["run_id"]))
    assert attributed.data.tags["mlflow.parentRunId"] == logged.info.run_id
    assert attributed.data.tags["verdict/source:human"] == "hurts"
    assert attributed.data.metrics == {"effect/source:human": 0.25, "p_adjusted/source:human": 0.01,
                                       "mde/source:human": 0.08}


def test_a_tracker_name_not_known_is_refused_with_its_position(tmp_path, models, sft_splits):
    from verifily_train.config import load_with_problems

    _, problems = load_with_problems({"task": "sft", "base_model": str(models["llama"]),
                                      "data_paths": {k: str(v) for k, v in sft_splits.items()}},
                                     ["training.report_to=[mlflow, neptune]"])
    assert [p.key for p in problems] == ["training.report_to[1]"] and "neptune" in str(problems[0])


def test_an_mlflow_store_that_cannot_be_reached_is_one_line_before_any_stage(monkeypatch, models, sft_splits):
    from verifily_train.artifacts.trackers import start_tracking
    from verifily_train.config import load_config
    from verifily_train.errors import EnvironmentProblem
    from verifily_train.procs import free_port

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    cfg = load_config({"task": "sft", "base_model": str(models["llama"]), "training": {"report_to": "mlflow"},
                       "data_paths": {k: str(v) for k, v in sft_splits.items()}})
    with pytest.raises(EnvironmentProblem, match="training.report_to: MLflow .* refused a new run"):
        start_tracking(cfg, "run_20261207_000000_abcdef")
