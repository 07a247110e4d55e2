"""Ablation runs in child processes: start one, read its result file, stop them all on Ctrl-C, and (in the
child) die with the parent.

The protocol is explicit: the parent runs ``python -m <module> --job JOB_JSON --result PATH --parent PID``;
the child writes its result as one JSON object to ``PATH`` (atomically) and exits 0. Nothing is read from its
stdout; its stderr's last line is the error reported when it fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import List, Mapping

from verifily_train.fsio import atomic_write_json

# The ablation workers this process runs now. A SIGINT stops them at once (``stopping_workers_on_interrupt``):
# the flow's task threads wait for their worker, so Ctrl-C waited 22-30 s for runs nobody would read.
_WORKERS: set = set()
_WORKERS_LOCK = threading.Lock()
_STOPPING = threading.Event()
WORKER_GRACE_SECONDS = 5.0  # from SIGTERM to SIGKILL for a worker that does not end
PARENT_POLL_SECONDS = 1.0  # how often a worker checks that its parent still lives


def stop_workers() -> None:
    """Terminate every ablation worker of this process, and start no more (a retry included)."""
    _STOPPING.set()
    with _WORKERS_LOCK:
        procs = list(_WORKERS)
    for proc in procs:
        with contextlib.suppress(OSError):
            proc.terminate()

    def kill_stragglers():
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(OSError):
                    proc.kill()

    if procs:
        timer = threading.Timer(WORKER_GRACE_SECONDS, kill_stragglers)
        timer.daemon = True
        timer.start()


@contextlib.contextmanager
def stopping_workers_on_interrupt():
    """While an attribution runs in this (main) thread: SIGINT terminates its ablation workers, then
    interrupts as before (``KeyboardInterrupt``, exit 130), so its end waits for no training run."""
    _STOPPING.clear()
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous in (signal.SIG_IGN, None):
        yield
        return

    def on_sigint(signum, frame):
        stop_workers()
        if callable(previous):
            previous(signum, frame)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _STOPPING.clear()  # the attribution has ended: a later one in this process starts its workers


def run_worker(module: str, job: Mapping[str, object], env: Mapping[str, str], what: str) -> dict:
    """``python -m module`` on ``job`` in a child process this process can stop (``stop_workers``); the result
    it wrote. A failure is a ``RuntimeError`` naming ``what`` and the child's last stderr line."""
    if _STOPPING.is_set():
        raise RuntimeError(f"{what}: interrupted")
    with tempfile.TemporaryDirectory(prefix="verifily-worker-") as tmp:
        result = Path(tmp) / "result.json"
        command = [sys.executable, "-m", module, "--job", json.dumps(dict(job)), "--result", str(result),
                   "--parent", str(os.getpid())]
        proc = subprocess.Popen(command, env=dict(env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        with _WORKERS_LOCK:
            _WORKERS.add(proc)
        try:
            if _STOPPING.is_set():  # interrupted while it started
                proc.terminate()
            _, err = proc.communicate()
        finally:
            with _WORKERS_LOCK:
                _WORKERS.discard(proc)
        if _STOPPING.is_set():
            raise RuntimeError(f"{what}: interrupted")
        if proc.returncode != 0 or not result.is_file():
            tail = [ln for ln in err.splitlines() if ln.strip()][-1:] or [f"exit {proc.returncode}"]
            raise RuntimeError(f"{what} failed: {tail[0]}")
        return json.loads(result.read_text(encoding="utf-8"))


def parse_worker_args(argv: List[str]) -> tuple:
    """``(job, result path, parent pid)`` from a worker's command line (``run_worker`` writes it)."""
    import argparse

    parser = argparse.ArgumentParser(prog="worker")
    parser.add_argument("--job", required=True)
    parser.add_argument("--result", required=True)
    parser.add_argument("--parent", type=int, required=True)
    args = parser.parse_args(argv)
    return json.loads(args.job), Path(args.result), args.parent


def write_result(path: Path, result: Mapping[str, object]) -> None:
    """The worker's answer, whole or not at all (the parent reads it only after a zero exit)."""
    atomic_write_json(path, dict(result))


def exit_with_parent(parent: int) -> None:
    """In a worker: end when ``parent`` ends, however it ends. Linux sends SIGKILL on the parent's death
    (PR_SET_PDEATHSIG: Prefect's own SIGTERM handler would otherwise keep an orphan reporting to a dead API);
    a thread checks the parent's pid as well (other systems, and a parent that died before the call); and
    SIGTERM ends the worker at once until a flow engine installs its own handler."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(128 + signum))

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(1)
            threading.Event().wait(PARENT_POLL_SECONDS)

    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
