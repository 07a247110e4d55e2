"""What the Prefect UI shows of a `train` flow run (issue 39): the stage summaries and final metrics in its
logs, a loss-curve table artifact, and a task graph that is the stage chain, not every manifest edge."""

from __future__ import annotations

import json

import pytest

from conftest import train, write_config

pytestmark = pytest.mark.slow

CHAIN = ["fingerprint", "validate-manifest", "tokenize", "train-lora", "evaluate", "evaluate-baseline",
         "slice-by-tags", "mine-hard-examples", "write-artifact"]


def _flow_run_of(client, run_name: str):
    """The `train` flow run whose logs name the Run ``run_name``."""
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, LogFilter, LogFilterFlowRunId

    for flow_run in client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["train"]))):
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])))
        if any(run_name in log.message for log in logs):
            return flow_run, [log.message for log in sorted(logs, key=lambda log: log.timestamp)]
    raise AssertionError(f"no train flow run logged {run_name}")


def test_the_flow_run_logs_stages_and_metrics_shows_a_loss_curve_and_a_chain_of_tasks(tmp_path, models, sft_splits,
                                                                                       prefect_api):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter,
                                                FlowRunFilterId)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    write_config(tmp_path, "sft", models["llama"], sft_splits, eval={"slice_by_tags": ["source", "difficulty"]})
    result, run = train(tmp_path, prefect_api, "--flow")
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((run / "run.json").read_text())
    with temporary_settings(updates={PREFECT_API_URL: prefect_api}), get_client(sync_client=True) as client:
        flow_run, logs = _flow_run_of(client, run.name)
        text = "\n".join(logs)
        # one line per stage, in order, then the final metrics, the slices and the Run
        starts = [next(i for i, m in enumerate(logs) if m.startswith(f"{stage}: ")) for stage in
                  ("validate", "tokenize", "train", "evaluate", "baseline", "slice", "hard_examples")]
        assert starts == sorted(starts), logs
        assert f"train_loss {record['metrics']['train_loss']:.4g} after {record['metrics']['train_steps']} steps" in text
        assert f"final metrics: loss {round(record['metrics']['loss'], 4):.4g} [" in text, text
        assert "loss by source: " in text and "loss by difficulty: " in text
        assert text.index("loss by source") < text.index("loss by difficulty")  # the config's order
        assert f"run {run.name}: {run}" in text

        artifacts = {a.key: a for a in client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id])))}
        curve = json.loads(artifacts["loss-curve"].data)
        logged = [json.loads(line) for line in (run / "trainer_log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in curve if r["loss"] is not None] == [e["step"] for e in logged if "loss" in e]
        assert [r["loss"] for r in curve if r["loss"] is not None] == [round(e["loss"], 4) for e in logged if "loss" in e]
        assert any(r["eval_loss"] is not None for r in curve)  # FAST scores the val split every 4 steps

        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
        by_id = {t.id: t for t in tasks}
        assert sorted(t.name.rsplit("-", 1)[0] for t in tasks) == sorted(CHAIN)
        upstream = {}
        for t in tasks:
            inputs = {i.id for values in t.task_inputs.values() for i in values if getattr(i, "input_type", "") == "task_run"}
            upstream[t.name.rsplit("-", 1)[0]] = sorted(by_id[i].name.rsplit("-", 1)[0] for i in inputs)
        assert upstream == {name: ([CHAIN[i - 1]] if i else []) for i, name in enumerate(CHAIN)}, upstream
