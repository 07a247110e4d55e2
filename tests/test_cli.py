"""The CLI: exit codes, one-line user errors, fast start-up without heavy imports, help everywhere."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import assert_user_error, run_cli


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


@pytest.mark.parametrize("configured", [None, "45"])
def test_in_process_flow_runs_skip_heartbeats_unless_configured(configured, tmp_path):
    """The flow run `verifily train` makes and watches sends no heartbeats (Prefect joins their thread at the end,
    up to a second); a heartbeat frequency the user set is kept."""
    import os

    code = ("from verifily_train.cli.train import in_process_flow_settings\n"
            "from prefect.flow_engine import FlowRunEngine\n"
            "seconds = lambda: FlowRunEngine.heartbeat_seconds.fget(None)\n"
            "before = seconds()\n"
            "with in_process_flow_settings():\n    inside = seconds()\n"
            "print('HEARTBEAT', before, inside, seconds())")
    env = {k: v for k, v in os.environ.items() if "HEARTBEAT" not in k}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")  # no profile setting
    if configured:
        env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] = configured
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    expected = "HEARTBEAT 45 45 45" if configured else "HEARTBEAT 180 None 180"
    assert expected in out.stdout, out.stdout + out.stderr


def test_stage_modules_are_imported_only_while_the_temporary_server_boots(monkeypatch):
    """The CLI imports the train and evaluate stages' modules in the time it would idle waiting for the server,
    and stops as soon as the server is up (or has died): a flow that needs none of them loses one import at most."""
    import importlib
    import types

    from verifily_train.cli import train as cli_train

    def fake_server(healthy=False, exit_code=None):
        return types.SimpleNamespace(healthy=healthy, proc=types.SimpleNamespace(poll=lambda: exit_code))

    imported = []
    server = fake_server()

    def import_module(name):
        imported.append(name)
        server.healthy = len(imported) == 2  # the server answers during the second import

    monkeypatch.setattr(importlib, "import_module", import_module)
    assert cli_train._preload_while_server_boots(server) == 2
    assert imported == list(cli_train.STAGE_MODULES[:2])
    imported.clear()
    assert cli_train._preload_while_server_boots(fake_server(healthy=True)) == 0
    assert cli_train._preload_while_server_boots(fake_server(exit_code=1)) == 0
    assert imported == []
