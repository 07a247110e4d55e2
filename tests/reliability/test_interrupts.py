"""Ctrl-C (issue 25, class 7) and Prefect's own database under a file-size limit (class 8), on real runs.

Ctrl-C is SIGINT to the terminal's foreground process group: every process of `verifily train` gets it.
It must stop the run within seconds, print "interrupted" as its one line, exit 130, leave no process
behind (Prefect's temporary server runs in its own session and is stopped by verifily), and leave a state
the next run resumes from (its last complete checkpoint).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import assert_user_error, cli_env, run_cli, write_config

pytestmark = pytest.mark.slow
CHECKPOINT = "cache/train/.work-*/checkpoints/checkpoint-*/.verifily-complete"


def default_sigint() -> None:
    """A terminal's foreground command gets SIGINT's default action; a test run launched in the background of
    a non-interactive shell inherits SIGINT *ignored* (POSIX), which every exec keeps: reset it in the child."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(folder: Path, env: dict, *extra: str) -> subprocess.Popen:
    """`verifily train` as a terminal starts it: the leader of its own process group, SIGINT not ignored."""
    return subprocess.Popen([sys.executable, "-m", "verifily_train.cli.main", "train", "-c", "train.yaml", *extra],
                            cwd=folder, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)


def _descendants(pid: int) -> list:
    out, todo = [], [pid]
    while todo:
        ps = subprocess.run(["ps", "-o", "pid=", "--ppid", str(todo.pop())], capture_output=True, text=True).stdout
        children = [int(x) for x in ps.split()]
        out += children
        todo += children
    return out


def _alive(pid: int) -> bool:
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    return bool(state) and not state.startswith("Z")


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and not predicate():
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    assert predicate(), "the run never reached the point to interrupt"


def _interrupt(proc: subprocess.Popen, group: bool) -> tuple:
    """SIGINT (to the group, as Ctrl-C does, or to the main process alone); returns (stderr, processes left)."""
    children = _descendants(proc.pid)
    (os.killpg if group else os.kill)(proc.pid, signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=10)  # the bound: stopped within 10 s of Ctrl-C
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        for c in children:
            if _alive(c):
                os.kill(c, signal.SIGKILL)
        raise AssertionError("Ctrl-C did not stop the run within 10 s")
    deadline = time.time() + 5
    while time.time() < deadline and any(_alive(c) for c in children):
        time.sleep(0.1)
    left = [c for c in children if _alive(c)]
    for c in left:
        os.kill(c, signal.SIGKILL)  # clean up before failing
    return err, left


def _assert_interrupted(proc: subprocess.Popen, err: str, left: list, folder: Path) -> None:
    assert proc.returncode == 130, (proc.returncode, err[-2000:])
    assert "Traceback" not in err, err[-3000:]
    lines = [seg.strip() for line in err.splitlines() for seg in line.split("\r") if seg.strip()]
    assert lines and lines[-1] == "interrupted", err[-2000:]
    assert [l for l in lines if "error" in l.lower() or "interrupted" in l] == ["interrupted"], err[-2000:]
    assert not left, f"processes outlived the interrupted run: {left}"
    runs = folder / "runs"
    assert not runs.exists() or not list(runs.rglob("checksums.sha256")), "an interrupted run claims completion"


def test_ctrl_c_stops_a_run_at_once_and_the_rerun_resumes(tmp_path, models, sft_splits, verifily_home, prefect_api):
    """The issue's case: process-group SIGINT during training with Prefect's temporary server."""
    write_config(tmp_path, "sft", models["llama"], sft_splits,
                 training={"num_epochs": 10, "save_steps": 2, "eval_steps": 1000}, eval={"bootstrap_samples": 50})
    env = cli_env()
    env.pop("PREFECT_API_URL", None)  # the temporary server: the process a terminal's Ctrl-C used to kill first
    proc = _start(tmp_path, env)
    _wait_for(lambda: list(verifily_home.glob(CHECKPOINT)), proc)
    err, left = _interrupt(proc, group=True)
    _assert_interrupted(proc, err, left, tmp_path)
    resumed = run_cli("train", "-c", "train.yaml", cwd=tmp_path, env=cli_env({"PREFECT_API_URL": prefect_api}))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run = next((tmp_path / "runs").glob("run_*"))
    assert json.loads((run / "metrics.json").read_text())["train"]["resumed_from_step"] >= 2


def test_sigint_to_the_main_process_alone_stops_it_too(tmp_path, models, sft_splits, verifily_home,
                                                       prefect_api):  # designed here
    """`kill -INT <pid>` (no group) while a stage works, with a configured server: the same clean stop, and the
    stage's scratch folder is gone."""
    write_config(tmp_path, "sft", models["llama"], sft_splits)
    proc = _start(tmp_path, cli_env({"VERIFILY_PAUSE_STAGE": "tokenize:60", "PREFECT_API_URL": prefect_api}))
    _wait_for(lambda: list((verifily_home / "cache/tokenize").glob(".tmp-*")), proc)
    err, left = _interrupt(proc, group=False)
    _assert_interrupted(proc, err, left, tmp_path)
    assert not list((verifily_home / "cache/tokenize").glob(".tmp-*"))


def test_ctrl_c_while_the_temporary_server_boots(tmp_path, models, sft_splits):  # designed here
    write_config(tmp_path, "sft", models["llama"], sft_splits)
    env = cli_env()
    env.pop("PREFECT_API_URL", None)
    proc = _start(tmp_path, env)
    _wait_for(lambda: _descendants(proc.pid), proc, timeout=60)
    err, left = _interrupt(proc, group=True)
    _assert_interrupted(proc, err, left, tmp_path)
    assert not (tmp_path / "runs").exists()


def _limit(size: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    return apply


def test_a_file_size_limit_on_prefects_own_database_ends_cleanly(tmp_path, models, sft_splits):
    """An existing PREFECT_HOME whose database cannot grow: the run either completes (the Run verifies; at most a
    warning that Prefect could not record it) or stops with one line; never a Prefect 500 traceback, never exit 1."""
    from verifily_train.procs import free_port, stop, wait_healthy

    home = tmp_path / "prefect-home"
    home.mkdir()
    env = cli_env({"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    env.pop("PREFECT_API_URL", None)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                               str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_healthy(f"http://127.0.0.1:{port}/api", lambda: server.poll() is None, 90, interval=0.5)
    finally:
        stop(server, timeout=20)
    sizes = {p.name: p.stat().st_size for p in home.glob("prefect.db*")}
    # between the database's size and its write-ahead log's: the server may start, then fail to write
    limit = max((sizes.get("prefect.db", 0) + sizes.get("prefect.db-wal", 0)) // 2, 1 << 20)
    write_config(tmp_path, "sft", models["llama"], sft_splits, training={"max_steps": 2, "save_steps": 1000},
                 eval={"bootstrap_samples": 50})
    # room for the Run's own files (all well under 1 MB here)
    result = subprocess.run([sys.executable, "-m", "verifily_train.cli.main", "train", "-c", "train.yaml"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=600,
                            preexec_fn=_limit(limit))
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.returncode in (0, 2), (result.returncode, result.stderr[-3000:])
    runs = list((tmp_path / "runs").glob("run_*/checksums.sha256")) if (tmp_path / "runs").exists() else []
    if result.returncode == 0:
        assert len(runs) == 1 and run_cli("runs", "verify", str(runs[0].parent), cwd=tmp_path).returncode == 0
    else:
        assert_user_error(result, "Prefect")
        assert runs == []
