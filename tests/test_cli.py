"""The CLI: exit codes, one-line user errors, fast start-up without heavy imports, help everywhere."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import assert_user_error, run_cli
from verifily_train.cli.runtime import TemporaryServer, preload_while_server_boots
from verifily_train.errors import VerifilyError


def test_import_library_does_not_import_prefect():
    code = "import verifily_train, verifily_train.pipeline.runner, verifily_train.dataset, sys; print('prefect' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.parametrize("argv", [["--help"], ["dataset", "list"], ["config", "show", "--help"]])
def test_light_commands_import_no_torch_transformers_or_prefect(argv, tmp_path):
    code = ("import sys, verifily_train.cli.main as m\n"
            "try:\n    m.main(%r)\nexcept SystemExit:\n    pass\n"
            "print('HEAVY', sorted(k for k in ('torch', 'transformers', 'prefect') if k in sys.modules))" % argv)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("argv", [[], ["train"], ["compare"], ["config"], ["config", "show"], ["dataset"],
                                  ["dataset", "create"], ["dataset", "list"], ["dataset", "show"],
                                  ["dataset", "verify"], ["runs"], ["runs", "list"], ["runs", "show"],
                                  ["runs", "verify"]])
def test_every_level_has_help(argv, tmp_path):
    result = run_cli(*argv, "--help", cwd=tmp_path)
    assert result.returncode == 0 and "usage: verifily" in result.stdout


def test_bad_config_fails_before_heavy_imports_with_every_cheap_problem(tmp_path):
    (tmp_path / "train.yaml").write_text("task: sft\nbase_model: org/m\ndata_paths: {train: t.jsonl}\nlora:\n  r: 0\n")
    result = run_cli("train", "-c", "train.yaml", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == ["error: train.yaml: lora.r: must be >= 1; got 0",
                     f"error: {tmp_path / 't.jsonl'}: data_paths.train: file not found"]
    assert not (tmp_path / "runs").exists()


def test_one_bad_config_value_is_one_line(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"instruction": "a", "output": "b", "tags": {"source": "human"}}\n')
    (tmp_path / "train.yaml").write_text("task: sft\nbase_model: org/m\ndata_paths: {train: t.jsonl}\nlora:\n  r: 0\n")
    assert_user_error(run_cli("train", "-c", "train.yaml", cwd=tmp_path), "train.yaml: lora.r: must be >= 1; got 0")


def test_unknown_override_on_the_command_line(tmp_path):
    (tmp_path / "train.yaml").write_text("task: sft\nbase_model: org/m\ndata_paths: {train: t.jsonl}\n")
    result = run_cli("config", "show", "-c", "train.yaml", "training.num_epoch=1", cwd=tmp_path)
    assert_user_error(result, "training.num_epoch", "did you mean training.num_epochs?")


def test_config_show_prints_resolved_config_and_hash(tmp_path):
    (tmp_path / "train.yaml").write_text("task: sft\nbase_model: org/m\ndata_paths: {train: t.jsonl}\n")
    result = run_cli("config", "show", "-c", "train.yaml", "lora.r=8", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "  r: 8" in result.stdout and "num_epochs: 3" in result.stdout
    assert result.stdout.strip().splitlines()[-1].startswith("# config_hash: ")


def test_dataset_create_list_show_verify(tmp_path, sft_splits):
    result = run_cli("dataset", "create", "--id", "ds_x", "--version", "v1", "--task", "sft",
                     "--train", str(sft_splits["train"]), "--test", str(sft_splits["test"]), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "created ds_x@v1" in result.stdout
    listing = run_cli("dataset", "list", cwd=tmp_path)
    assert "ds_x@v1" in listing.stdout
    shown = json.loads(run_cli("dataset", "show", "ds_x@v1", cwd=tmp_path).stdout)
    assert shown["num_rows"] == 88 and shown["tags"] == ["difficulty", "length_bucket", "source"]
    verified = run_cli("dataset", "verify", "ds_x@latest", cwd=tmp_path)
    assert verified.returncode == 0 and verified.stdout.startswith("ok ds_x@v1")
    again = run_cli("dataset", "create", "--id", "ds_x", "--version", "v1", "--task", "sft",
                    "--train", str(sft_splits["train"]), cwd=tmp_path)
    assert_user_error(again, "ds_x@v1 already exists")


def test_dataset_verify_names_the_tampered_file(tmp_path, sft_splits, verifily_home):
    run_cli("dataset", "create", "--id", "ds_x", "--version", "v1", "--task", "sft",
            "--train", str(sft_splits["train"]), cwd=tmp_path)
    target = verifily_home / "datasets/ds_x/v1/train.jsonl"
    target.chmod(0o644)
    target.write_bytes(target.read_bytes().replace(b"human", b"humaN", 1))
    result = run_cli("dataset", "verify", "ds_x@v1", cwd=tmp_path)
    assert_user_error(result, "files[0].sha256: does not match train.jsonl")


def test_missing_dataset_ref_is_a_user_error(tmp_path):
    assert_user_error(run_cli("dataset", "show", "ds_nope@v1", cwd=tmp_path), "ds_nope@v1", "not found")


def test_managed_mode_prints_coming_soon_and_trains_nothing(tmp_path):
    (tmp_path / "train.yaml").write_text("task: sft\nbase_model: org/m\ndata_paths: {train: t.jsonl}\n")
    result = run_cli("train", "-c", "train.yaml", "--mode", "managed", cwd=tmp_path)
    assert result.returncode == 0 and "Managed mode coming soon" in result.stdout
    assert not (tmp_path / "runs").exists()


def test_runs_verify_unknown_run(tmp_path):
    assert_user_error(run_cli("runs", "verify", "run_nope", cwd=tmp_path), "run_nope", "no such run")


HEARTBEAT_PROBE = """
import sys
from prefect import flow, task
from prefect.events.clients import AssertingEventsClient
from prefect.events.worker import EventsWorker
from verifily_train.cli.runtime import in_process_flow_settings

EventsWorker.set_client_override(AssertingEventsClient)  # records the events this process emits

@task
def step():
    return 1

@flow(name="heartbeat-probe")
def probe():
    return step()

with in_process_flow_settings():
    probe()
EventsWorker.drain_all()
names = [e.event for client in AssertingEventsClient.all for e in client.events]
print("EVENTS", len(names), "HEARTBEATS", names.count("prefect.flow-run.heartbeat"))
"""


@pytest.mark.parametrize("configured", [None, "45"])
def test_in_process_flow_runs_send_no_heartbeats_unless_configured(configured, tmp_path, prefect_api):
    """A flow run `verifily train` makes and watches emits no heartbeat events (Prefect joins their thread at the
    end, up to a second); with a heartbeat frequency the user set, it emits them as Prefect does."""
    env = {k: v for k, v in os.environ.items() if "HEARTBEAT" not in k}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_API_URL=prefect_api)  # no profile setting
    if configured:
        env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] = configured
    out = subprocess.run([sys.executable, "-c", HEARTBEAT_PROBE], capture_output=True, text=True, cwd=tmp_path,
                         env=env, timeout=120)
    found = re.search(r"EVENTS (\d+) HEARTBEATS (\d+)", out.stdout)
    assert found, out.stdout + out.stderr[-3000:]
    events, heartbeats = map(int, found.groups())
    assert events > heartbeats  # the probe sees the other events the run emits (its task run's states)
    assert (heartbeats >= 1) if configured else (heartbeats == 0), out.stdout


def _python_server(code: str):
    """A ``TemporaryServer`` whose process is ``python -c CODE`` (CODE formatted with the port it is given)."""
    return TemporaryServer(command=lambda port: [sys.executable, "-c", code.format(port=port)], health_timeout=20)


def test_stage_modules_are_imported_only_while_the_temporary_server_boots(tmp_path):
    """The CLI imports the train and evaluate stages' modules in the time it would idle waiting for the server:
    all of them while it boots, none once it answers, none when it died (which is then one user error)."""
    modules = [name for name in ("tabnanny", "pyclbr", "netrc") if name not in sys.modules]
    booting = _python_server("import time; time.sleep(60)")
    try:
        assert preload_while_server_boots(booting, modules) == len(modules)
        assert all(name in sys.modules for name in modules)
    finally:
        booting.stop()

    (tmp_path / "api").mkdir()
    (tmp_path / "api" / "health").write_text("true")
    up = _python_server("import http.server, functools; http.server.ThreadingHTTPServer(('127.0.0.1', {port}), "
                        f"functools.partial(http.server.SimpleHTTPRequestHandler, directory={str(tmp_path)!r}))"
                        ".serve_forever()")
    try:
        up.wait()  # answers GET /api/health
        assert up.healthy and preload_while_server_boots(up, ["this_module_is_never_imported"]) == 0
    finally:
        up.stop()

    died = _python_server("raise SystemExit(3)")
    died.proc.wait(timeout=20)
    assert preload_while_server_boots(died, ["this_module_is_never_imported"]) == 0
    with pytest.raises(VerifilyError, match="temporary server did not start \\(exit code 3"):
        died.wait()


def test_demo_stores_the_shipped_example_splits_as_a_dataset_version(verifily_home):
    """`verifily demo` trains on the examples shipped in the package (verifily_train/examples), stored once."""
    from verifily_train.cli.demo import ensure_demo_dataset
    from verifily_train.dataset import resolve

    for task in ("sft", "classification"):
        ref = ensure_demo_dataset(task, verifily_home)
        assert ref == f"ds_demo_{task}@v1" and resolve(ref).num_rows > 0
        assert ensure_demo_dataset(task, verifily_home) == ref  # the second call reuses it
