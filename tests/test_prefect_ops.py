"""Prefect operations end to end: `verifily stack up` (server, pools, deployments, workers on 127.0.0.1),
`prefect deployment run train/sft`, the self-host and managed pools, the retraining trigger on a new
dataset version, the retrain/watch deployment, artifacts through the API, the UI in headless Chromium,
and `verifily stack down` stopping everything it started."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


from conftest import REPO, _free_port, assert_user_error, cli_env, run_cli, write_config

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
STAGES = ["fingerprint", "validate-manifest", "tokenize", "train-lora", "evaluate", "evaluate-baseline",
          "slice-by-tags", "mine-hard-examples", "write-artifact"]


def _prefect(*args: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prefect", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


class Api:
    """The Prefect REST API through Prefect's own sync client."""

    def __init__(self, url: str):
        from prefect.settings import PREFECT_API_URL, temporary_settings

        self._settings = temporary_settings(updates={PREFECT_API_URL: url})

    def __enter__(self):
        from prefect.client.orchestration import get_client

        self._settings.__enter__()
        self.client = get_client(sync_client=True).__enter__()
        return self

    def __exit__(self, *exc):
        self.client.__exit__(*exc)
        self._settings.__exit__(*exc)

    def flow_runs(self, deployment: str) -> list:
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

        dep = self.client.read_deployment_by_name(deployment)
        return self.client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))

    def task_runs(self, flow_run_id) -> dict:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        runs = self.client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        return {r.name.rsplit("-", 1)[0]: r.state.name for r in runs}

    def artifacts(self, flow_run_id) -> dict:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        found = self.client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
        return {a.key: a for a in found}

    def artifacts_without_flow_run(self, since) -> dict:
        """Artifacts no flow run owns (a replayed Run's) created since ``since``, by key (the newest of each)."""
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        found = self.client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(is_null_=True)))
        newest = {}
        for a in sorted((a for a in found if a.created >= since), key=lambda a: a.created):
            newest[a.key] = a
        return newest

    def logs(self, flow_run_id) -> str:
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

        logs = self.client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        return "\n".join(log.message for log in logs)

    def set_defaults(self, deployment: str, **parameters) -> None:
        from prefect.client.schemas.actions import DeploymentUpdate

        dep = self.client.read_deployment_by_name(deployment)
        self.client.update_deployment(dep.id, DeploymentUpdate(parameters={**dep.parameters, **parameters}))


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _chromium(url: str, out: Path, *mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--disable-component-update", "--disable-sync", "--no-first-run",
                           f"--user-data-dir={out.parent / ('chrome-' + out.stem)}", *mode,
                           "--window-size=1400,1000", "--virtual-time-budget=20000", url],
                          capture_output=True, text=True, timeout=180, check=True)


def test_stack_refuses_beyond_loopback_without_auth(tmp_path):
    env = cli_env()
    env.pop("PREFECT_SERVER_API_AUTH_STRING", None)
    assert_user_error(run_cli("stack", "up", "--host", "0.0.0.0", "--project", str(REPO), cwd=tmp_path, env=env),
                      "--host", "PREFECT_SERVER_API_AUTH_STRING")
    assert_user_error(run_cli("stack", "up", "--project", str(tmp_path), cwd=tmp_path, env=env), "prefect.yaml")
    assert not (Path(env["VERIFILY_HOME"]) / "stack" / "state.json").exists()
    env.pop("PREFECT_API_URL", None)
    (tmp_path / "train.yaml").write_text("task: sft\nbase_model: some/model\ndataset_version: ds_x@v1\n")
    assert_user_error(run_cli("train", "-c", "train.yaml", "--mode", "self_host", cwd=tmp_path, env=env),
                      "--mode", "PREFECT_API_URL")


def test_deployments_trigger_watch_and_ui_end_to_end(models, tmp_path, verifily_home):
    from verifily_train.fixtures.data import write_splits

    v1 = write_splits(tmp_path / "v1", "sft", {"train": 32, "val": 8, "test": 16}, seed=3)
    v2 = write_splits(tmp_path / "v2", "sft", {"train": 40, "val": 8, "test": 16}, seed=4)
    quiet = write_splits(tmp_path / "quiet", "sft", {"train": 24, "val": 8, "test": 12}, seed=5)
    config = write_config(tmp_path, "sft", models["llama"], training={"max_steps": 3, "save_steps": 100,
                                                                       "eval_steps": 100},
                          eval={"bootstrap_samples": 50, "max_new_tokens": 8})
    env = cli_env({"PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false", "PREFECT_WORKER_QUERY_SECONDS": "1"})
    env.pop("PREFECT_API_URL", None)

    def create(ref: str, splits: dict) -> subprocess.CompletedProcess:
        dataset_id, version = ref.split("@")
        result = run_cli("dataset", "create", "--id", dataset_id, "--version", version, "--task", "sft",
                         "--train", str(splits["train"]), "--val", str(splits["val"]), "--test", str(splits["test"]),
                         cwd=tmp_path, env=env)
        assert result.returncode == 0, result.stderr
        return result

    # versions that exist before any server: no event, only the watcher can find them
    assert "event" not in create("ds_ops@v1", v1).stdout
    create("ds_quiet@v1", quiet)

    port = _free_port()
    up = run_cli("stack", "up", "--port", str(port), "--project", str(REPO), "--workers", "local,managed,self-host",
                 cwd=tmp_path, env=env, timeout=240)
    state_file = verifily_home / "stack" / "state.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {"processes": {}}
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        url = f"http://127.0.0.1:{port}"
        assert f"Prefect UI: {url}" in up.stdout and state["host"] == "127.0.0.1"
        api_env = dict(env, PREFECT_API_URL=f"{url}/api")
        with Api(f"{url}/api") as api:
            pools = {p.name: p.type for p in api.client.read_work_pools()}
            assert pools == {"local": "process", "managed": "process", "self-host": "process"}
            names = {f"{api.client.read_flow(d.flow_id).name}/{d.name}" for d in api.client.read_deployments()}
            assert names == {"train/sft", "train/classification", "train/self-host", "train/managed", "retrain/watch",
                             "attribute/by-tag", "attribute-rows/rows"}
            # the team's training config for retraining: a tiny model instead of the embedded SmolLM2
            for deployment in ("train/sft", "retrain/watch"):
                api.set_defaults(deployment, config=str(config), overrides=[])

            # 1. prefect deployment run train/sft on a fixture dataset
            ran = _prefect("deployment", "run", "train/sft", "-p", "dataset=ds_ops@v1", "--watch",
                           "--watch-interval", "1", env=api_env)
            assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
            [first] = api.flow_runs("train/sft")
            assert first.state.name == "Completed" and first.name.startswith("sft-ds_ops@v1-"), first.name
            runs = list((verifily_home / "runs").glob("run_*"))
            assert len(runs) == 1
            record = json.loads((runs[0] / "run.json").read_text())
            assert record["status"] == "completed" and record["job"]["dataset_version"]["ref"] == "ds_ops@v1"
            listed = run_cli("runs", "list", cwd=tmp_path, env=env)  # no runs/ here: $VERIFILY_HOME/runs
            assert runs[0].name in listed.stdout
            assert run_cli("runs", "verify", runs[0].name, cwd=tmp_path, env=env).returncode == 0
            assert list(api.task_runs(first.id)) and set(api.task_runs(first.id)) == set(STAGES)
            arts = api.artifacts(first.id)
            assert set(arts) == {"metrics", "slices", "hard-examples", "run", "loss-curve", "training-progress"}, set(arts)
            assert {row["metric"] for row in json.loads(arts["metrics"].data)} >= {"loss", "perplexity"}
            assert {row["value"] for row in json.loads(arts["slices"].data)} >= {"human", "synthetic"}
            assert record["reproducibility_hash"] in arts["run"].data and str(runs[0]) in arts["run"].data
            assert "Hard examples" in arts["hard-examples"].data and float(arts["training-progress"].data) == 100.0

            # 2. verifily train --mode self_host: submitted to the self-host pool, followed, all stages cached
            sub = run_cli("train", "--mode", "self_host", "-c", str(config), "--dataset", "ds_ops@v1",
                          cwd=tmp_path, env=env)
            assert sub.returncode == 0, sub.stdout[-3000:] + sub.stderr[-3000:]
            assert "work pool 'self-host'" in sub.stdout and "state: Completed" in sub.stdout
            [hosted] = api.flow_runs("train/self-host")
            states = api.task_runs(hosted.id)
            assert all(states[s] == "Cached" for s in STAGES[1:-1]), states
            assert states["fingerprint"] == states["write-artifact"] == "Completed"

            # 3. the managed pool: the run ends with the message and trains nothing
            managed = _prefect("deployment", "run", "train/managed", "-p", "dataset=ds_ops@v1", "--watch",
                               "--watch-interval", "1", env=api_env)
            assert managed.returncode == 0, managed.stdout[-2000:]
            [m] = api.flow_runs("train/managed")
            assert "Managed mode coming soon" in api.logs(m.id) and not api.task_runs(m.id)
            assert len(list((verifily_home / "runs").glob("run_*"))) == 2

            # 4. a new dataset version starts a training run by itself (event -> trigger), compared with v1's run
            created = create("ds_ops@v2", v2)
            assert "event verifily.dataset.version.created sent" in created.stdout, created.stdout

            def triggered():
                found = [r for r in api.flow_runs("train/sft") if r.parameters.get("dataset") == "ds_ops@v2"]
                return found if found and found[0].state.is_final() else None

            [second] = _wait_for(triggered, 300, "the run triggered by ds_ops@v2")
            assert second.state.name == "Completed", api.logs(second.id)[-2000:]
            assert second.parameters["once"] is True and second.name.startswith("sft-ds_ops@v2-")
            comparison = api.artifacts(second.id)["comparison"].data
            v1_runs = [p.name for p in (verifily_home / "runs").glob("run_*")]  # by hand and self-host, both v1
            assert "Compared with the previous version's run" in comparison and "(ds_ops@v1)" in comparison
            assert any(name in comparison for name in v1_runs), comparison

            # 4b. the same job from the CLI is a replay (no flow run) and publishes what that flow run published
            from datetime import datetime, timezone

            since = datetime.now(timezone.utc)
            replayed = run_cli("train", "-c", str(config), "--dataset", "ds_ops@v2", cwd=tmp_path, env=api_env)
            assert replayed.returncode == 0 and "replayed:" in replayed.stdout, replayed.stdout[-2000:]
            flow_arts, replay_arts = api.artifacts(second.id), api.artifacts_without_flow_run(since)
            progress = {"training-progress"}  # the flow's live training bar: a replay trains nothing
            assert set(replay_arts) - progress == set(flow_arts) - progress, (set(replay_arts), set(flow_arts))
            for key in ("metrics", "slices", "hard-examples", "loss-curve"):
                assert replay_arts[key].data == flow_arts[key].data, key
            assert "Compared with the previous version's run" in replay_arts["comparison"].data
            assert "(ds_ops@v1)" in replay_arts["comparison"].data
            assert len(list((verifily_home / "runs").glob("run_*"))) == 3  # the replay wrote to ./runs

            # 5. retrain/watch trains what no one trained (ds_quiet@v1) and never a version trained before
            watch = _prefect("deployment", "run", "retrain/watch", "--watch", "--watch-interval", "1", env=api_env)
            assert watch.returncode == 0, watch.stdout[-3000:]
            [w] = api.flow_runs("retrain/watch")
            assert "1 version(s) to train: ds_quiet@v1" in api.logs(w.id)
            done = [json.loads((p / "run.json").read_text())["job"]["dataset_version"]["ref"]
                    for p in (verifily_home / "runs").glob("run_*")]
            assert sorted(done) == ["ds_ops@v1", "ds_ops@v1", "ds_ops@v2", "ds_quiet@v1"], done
            again = _prefect("deployment", "run", "retrain/watch", "--watch", "--watch-interval", "1", env=api_env)
            assert again.returncode == 0
            assert len(list((verifily_home / "runs").glob("run_*"))) == 4  # nothing trained twice

            # 7. replicates through the deployment: a run group per version; v2's is compared with v1's at the seed level
            for ref in ("ds_ops@v1", "ds_ops@v2"):
                group_run = _prefect("deployment", "run", "train/sft", "-p", f"dataset={ref}", "-p",
                                     'overrides=["training.replicates=2"]', "--watch", "--watch-interval", "1",
                                     env=api_env)
                assert group_run.returncode == 0, group_run.stdout[-3000:] + group_run.stderr[-3000:]
            groups = sorted((verifily_home / "runs").glob("group_*"))
            assert len(groups) == 2 and all((g / "group.json").is_file() for g in groups)
            [v2_group] = [r for r in api.flow_runs("train/sft") if r.parameters.get("dataset") == "ds_ops@v2"
                          and r.parameters.get("overrides") == ["training.replicates=2"]]
            group_comparison = api.artifacts(v2_group.id)["comparison"].data
            assert "did the change from A to B move each metric" in group_comparison, group_comparison[:500]
            assert "95% interval over seeds" in group_comparison
            compared = run_cli("compare", groups[0].name, groups[1].name, cwd=tmp_path, env=env)
            assert compared.returncode == 0 and "Welch t over runs" in compared.stdout, compared.stderr

        # 6. the flow run's page in the UI lists every stage
        if CHROMIUM:
            page = f"{url}/runs/flow-run/{first.id}"
            dom = _chromium(page, tmp_path / "dom.html", "--dump-dom").stdout
            for stage in ("train-lora", "validate-manifest", "mine-hard-examples"):
                assert stage in dom, f"{stage} not on the flow run page"
            shot = tmp_path / "flow-run.png"
            _chromium(page, shot, f"--screenshot={shot}")
            import matplotlib.image

            pixels = matplotlib.image.imread(shot)
            assert (pixels[..., :3] < 0.9).any(axis=-1).mean() > 0.02, "screenshot looks blank"
            keep = os.environ.get("VERIFILY_SCREENSHOT_DIR")
            if keep:
                shutil.copy(shot, Path(keep) / "flow-run.png")
    finally:
        down = run_cli("stack", "down", cwd=tmp_path, env=env)
    assert down.returncode == 0, down.stderr
    assert not state_file.exists()
    for name, proc in state["processes"].items():
        assert not Path(f"/proc/{proc['pid']}").exists() or \
            Path(f"/proc/{proc['pid']}/stat").read_text().split()[2] == "Z", f"{name} still running"
