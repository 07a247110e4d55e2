"""Concurrency, tampering, offline runs and secrets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import assert_user_error, cli_env, run_cli, train, write_config

pytestmark = pytest.mark.slow


def test_four_concurrent_runs_share_store_cache_and_runs_folder(tmp_path, models, cls_splits, prefect_api,
                                                                verifily_home):
    from verifily_train.pipeline.cache import entry_is_valid, list_entries

    created = run_cli("dataset", "create", "--id", "ds_c", "--version", "v1", "--task", "classification",
                      "--train", str(cls_splits["train"]), "--test", str(cls_splits["test"]), cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    write_config(tmp_path, "classification", models["bert"], dataset_version="ds_c@v1",
                 training={"num_epochs": 2}, eval={"bootstrap_samples": 100})
    env = cli_env({"PREFECT_API_URL": prefect_api})
    procs = [subprocess.Popen([sys.executable, "-m", "verifily_train.cli.main", "train", "-c", "train.yaml",
                               f"seed={seed}"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for seed in (1, 2, 1, 2)]
    outputs = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [o[1][-1500:] for o in outputs]
    runs = sorted((tmp_path / "runs").glob("run_*"))
    assert len(runs) == 4 and len({r.name for r in runs}) == 4
    for run in runs:
        assert run_cli("runs", "verify", str(run), cwd=tmp_path).returncode == 0
    entries = list_entries(verifily_home / "cache")
    assert entries and all(entry_is_valid(Path(e["path"])) for e in entries)
    trained = sum(1 for r in runs if not json.loads((r / "run.json").read_text())["stages"]["train"]["cache_hit"])
    assert trained == 2  # two distinct seeds trained once each; the duplicates waited and reused them


def test_any_changed_byte_in_a_finished_run_is_reported(tmp_path, models, sft_splits, prefect_api):
    write_config(tmp_path, "sft", models["llama"], sft_splits, training={"max_steps": 2},
                 eval={"bootstrap_samples": 50})
    result, run = train(tmp_path, prefect_api)
    assert result.returncode == 0, result.stderr[-2000:]
    files = sorted(p for p in run.rglob("*") if p.is_file() and p.name != "checksums.sha256")
    assert len(files) >= 12
    for path in files:
        path.chmod(0o644)
        path.parent.chmod(0o755)
        original = path.read_bytes()
        path.write_bytes(bytes([original[0] ^ 0x20]) + original[1:])
        verdict = run_cli("runs", "verify", str(run), cwd=tmp_path)
        path.write_bytes(original)
        assert_user_error(verdict, str(path.relative_to(run)), "changed since the run was written")
    assert run_cli("runs", "verify", str(run), cwd=tmp_path).returncode == 0


def test_a_dataset_version_changed_after_creation_is_refused_before_training(tmp_path, models, sft_splits,
                                                                            verifily_home):
    created = run_cli("dataset", "create", "--id", "ds_t", "--version", "v1", "--task", "sft",
                      "--train", str(sft_splits["train"]), "--test", str(sft_splits["test"]), cwd=tmp_path)
    assert created.returncode == 0
    target = verifily_home / "datasets/ds_t/v1/train.jsonl"
    target.chmod(0o644)
    target.write_bytes(target.read_bytes().replace(b"human", b"humam", 1))
    write_config(tmp_path, "sft", models["llama"], dataset_version="ds_t@v1")
    result = run_cli("train", "-c", "train.yaml", cwd=tmp_path)
    assert_user_error(result, "files[0].sha256: does not match train.jsonl")
    assert not (tmp_path / "runs").exists() and not (verifily_home / "cache/train").exists()


BLOCK_NETWORK = '''
import socket
_LOCAL = ("127.0.0.1", "localhost", "::1", "0.0.0.0")
def _guard(original):
    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else None
        if host is not None and host not in _LOCAL:
            raise OSError(101, f"network unreachable (blocked by test): {host}")
        return original(self, address)
    return connect
socket.socket.connect = _guard(socket.socket.connect)
socket.socket.connect_ex = _guard(socket.socket.connect_ex)
_getaddrinfo = socket.getaddrinfo
def getaddrinfo(host, *args, **kwargs):
    if host not in _LOCAL and host is not None:
        raise socket.gaierror(-3, f"name resolution blocked by test: {host}")
    return _getaddrinfo(host, *args, **kwargs)
socket.getaddrinfo = getaddrinfo
'''
SECRETS = {"HF_TOKEN": "hf_PLANTEDsecretVALUE0001", "WANDB_API_KEY": "wandbPLANTEDsecret0002",
           "MY_SERVICE_SECRET": "PLANTEDsecretVALUE0003", "AWS_SECRET_ACCESS_KEY": "PLANTEDawsSECRET0004"}


def test_offline_run_succeeds_and_no_file_contains_a_secret(tmp_path, models, sft_splits, verifily_home):
    guard = tmp_path / "netguard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(BLOCK_NETWORK)
    env = cli_env({**SECRETS, "PYTHONPATH": str(guard)})
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "PREFECT_API_URL"):
        env.pop(key, None)  # no offline flags: the code itself must not need the network
    check = subprocess.run([sys.executable, "-c", "import socket; socket.create_connection(('93.184.216.34', 80), 2)"],
                           env=env, capture_output=True, text=True)
    assert check.returncode != 0 and "blocked by test" in check.stderr  # the guard works
    write_config(tmp_path, "sft", models["llama"], sft_splits, training={"max_steps": 2},
                 eval={"bootstrap_samples": 50})
    result = subprocess.run([sys.executable, "-m", "verifily_train.cli.main", "train", "-c", "train.yaml"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run = next((tmp_path / "runs").glob("run_*"))
    assert json.loads((run / "run.json").read_text())["status"] == "completed"
    leaks = []
    for root in (tmp_path / "runs", verifily_home):
        for path in root.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                leaks += [(str(path), k) for k, v in SECRETS.items() if v.encode() in data]
    assert leaks == []
    assert not any(v in result.stdout + result.stderr for v in SECRETS.values())
