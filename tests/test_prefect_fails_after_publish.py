"""``verifily train`` when Prefect's API fails after the Run is published: the Run is reported complete (its id is
chosen by the CLI, so it is found on disk), with one warning; before publication the failure is one error line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import cli_env, printed_run, run_cli, write_config

pytestmark = pytest.mark.slow  # each trains through the CLI

# Prefect's API fails at one point of an in-process `verifily train` (the server itself stays up).
DRIVER = '''
import sys

import httpx
from prefect import flow_engine

from verifily_train.cli.main import main
from verifily_train.flows.report import PrefectPublisher


def refuse(*args, **kwargs):
    raise httpx.ConnectError("All connection attempts failed")


where = sys.argv[1]
if where == "artifacts":  # inside the flow, once the Run is written: its Prefect artifacts
    PrefectPublisher.run_artifacts = refuse
elif where == "final_state":  # after the flow returned its summary: the flow run's final state
    succeed = flow_engine.FlowRunEngine.handle_success

    def succeed_then_refuse(self, result):
        succeed(self, result)
        refuse()

    flow_engine.FlowRunEngine.handle_success = succeed_then_refuse
else:  # before any Run exists: as the flow run starts
    flow_engine.FlowRunEngine.call_flow_fn = refuse
sys.exit(main(["train", "-c", "train.yaml", "--flow"]))
'''


def _train_with_prefect_failing(tmp_path, prefect_api, where: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", DRIVER, where], cwd=tmp_path, capture_output=True, text=True,
                          env=cli_env({"PREFECT_API_URL": prefect_api}), timeout=600)


@pytest.mark.parametrize("where", ["artifacts", "final_state"])
def test_a_run_published_before_prefects_api_fails_is_reported_complete(tmp_path, models, sft_splits, prefect_api,
                                                                         where):
    write_config(tmp_path, "sft", models["llama"], sft_splits, training={"max_steps": 2, "save_steps": 1000},
                 eval={"bootstrap_samples": 50})
    result = _train_with_prefect_failing(tmp_path, prefect_api, where)
    assert result.returncode == 0, result.stderr[-3000:]  # Prefect's flow-run logger shows the exception
    assert ("warning: the Run is complete, but Prefect's server could not record it (All connection attempts "
            "failed)") in result.stderr
    run = printed_run(result, tmp_path)
    assert run is not None and [p.name for p in (tmp_path / "runs").glob("run_*")] == [run.name]
    assert run_cli("runs", "verify", str(run), cwd=tmp_path).returncode == 0


def test_prefects_api_failing_before_the_run_is_published_is_one_error_line(tmp_path, models, sft_splits,
                                                                            prefect_api):
    write_config(tmp_path, "sft", models["llama"], sft_splits, training={"max_steps": 2, "save_steps": 1000})
    result = _train_with_prefect_failing(tmp_path, prefect_api, "fingerprint")
    assert result.returncode == 2, result.stderr[-3000:]
    assert ("error: PREFECT_API_URL: Prefect's server stopped answering (All connection attempts failed). Finished "
            "stages are cached: start it and re-run") in result.stderr
    assert not list(tmp_path.glob("runs/run_*"))
