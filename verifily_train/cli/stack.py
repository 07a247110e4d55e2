"""``verifily stack up|down|status``: a Prefect server, the work pools, the deployments and workers.

Everything started here is recorded (PID, process start time, log file) in
``$VERIFILY_HOME/stack/state.json``, so ``stack down`` stops exactly those processes (each runs in its
own process group, which also holds the flow runs a worker spawned) and nothing else. The server listens
on 127.0.0.1 unless told otherwise; beyond loopback it needs an API auth string.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from verifily_train import jsonsafe
from verifily_train.errors import EnvironmentProblem, VerifilyError
from verifily_train.fsio import atomic_write_json, verifily_home
from verifily_train.procs import start_time, wait_healthy

POOLS = ("local", "managed", "self-host")  # spec §6 compute modes as Prefect work pools
WORKERS = ("local", "managed")  # self-host is served by the customer's own worker
LOOPBACK = ("127.0.0.1", "localhost", "::1")
AUTH_ENV = "PREFECT_SERVER_API_AUTH_STRING"


def state_path(home: Optional[Path] = None) -> Path:
    return (home or verifily_home()) / "stack" / "state.json"


def _alive(proc: dict) -> bool:
    started = start_time(proc["pid"])
    return started is not None and started == proc.get("start_time")


def read_state(home: Optional[Path] = None) -> Optional[dict]:
    """The state ``stack up`` wrote, or None: none, or a file of another shape (another tool's, a hand edit,
    ``{"processes": {}}``), which is not a stack verifily can find or stop and breaks no command."""
    try:
        state = jsonsafe.loads(state_path(home).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # BadJson and UnicodeDecodeError are ValueErrors
        return None
    return state if _state_shape_ok(state) else None


def _state_shape_ok(state) -> bool:
    if not isinstance(state, dict) or not all(isinstance(state.get(k), str) for k in ("api_url", "ui_url")):
        return False
    procs = state.get("processes")
    return (isinstance(procs, dict) and isinstance(procs.get("server"), dict) and all(
        isinstance(p, dict) and isinstance(p.get("pid"), int) and not isinstance(p.get("pid"), bool) and p["pid"] > 0
        and isinstance(p.get("log", ""), str) for p in procs.values()))


def running_api_url(home: Optional[Path] = None) -> Optional[str]:
    """The API URL of a stack this user started and whose server is still running, else None."""
    state = read_state(home)
    if state and _alive(state["processes"]["server"]):
        return state["api_url"]
    return None


def configured_api_url(home: Optional[Path] = None) -> Optional[str]:
    """``PREFECT_API_URL`` from the environment, else the running stack's (no Prefect import)."""
    return os.environ.get("PREFECT_API_URL") or running_api_url(home)


def _prefect() -> List[str]:
    exe = shutil.which("prefect", path=str(Path(sys.executable).parent)) or shutil.which("prefect")
    if exe is None:
        raise EnvironmentProblem(None, "prefect", "the prefect command is not installed in this environment")
    return [exe]


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _spawn(name: str, argv: Sequence[str], env: dict, logs: Path, cwd: Optional[Path] = None) -> dict:
    log = logs / f"{name}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(list(argv), env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    return {"pid": proc.pid, "start_time": start_time(proc.pid), "log": str(log), "argv": list(argv)}


def _tail(path: str) -> str:
    try:
        lines = [ln for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:200] if lines else ""


def _wait_healthy(url: str, proc: dict, timeout: float) -> None:
    if wait_healthy(url, lambda: _alive(proc), timeout, interval=0.25):
        return
    if not _alive(proc):
        raise EnvironmentProblem(proc["log"], None, f"the Prefect server exited: {_tail(proc['log'])}")
    raise EnvironmentProblem(proc["log"], None, f"the Prefect server did not answer {url}/health in {timeout:.0f}s")


def _run(argv: Sequence[str], env: dict, cwd: Optional[Path], what: str) -> None:
    done = subprocess.run(list(argv), env=env, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [ln.strip() for ln in (done.stderr + done.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if "Error" in ln.split(":", 1)[0]] or lines  # e.g. "DeploymentApplyError: ..."
        problem = errors[-1][:300] if errors else f"exit {done.returncode}"
        raise EnvironmentProblem(None, what, f"failed: {problem} (run it by hand for the whole output)")


def stack_env(api_url: str, home: Path, host: str) -> Dict[str, str]:
    env = dict(os.environ, PREFECT_HOME=str(home / "prefect"), PREFECT_API_URL=api_url,
               PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", VERIFILY_HOME=str(home),
               PREFECT_WORKER_QUERY_SECONDS=os.environ.get("PREFECT_WORKER_QUERY_SECONDS", "2"))
    if os.environ.get(AUTH_ENV):
        env["PREFECT_API_AUTH_STRING"] = os.environ[AUTH_ENV]  # the clients' half of the server's auth
    if host not in LOOPBACK:
        env.setdefault("PREFECT_UI_API_URL", api_url)
    return env


def stack_up(project: Path, host: str = "127.0.0.1", port: int = 4200, workers: Sequence[str] = WORKERS,
             home: Optional[Path] = None, timeout: float = 120.0, out=sys.stdout) -> dict:
    """Start server, create pools, deploy ``project/prefect.yaml``, start workers; returns the state."""
    home = home or verifily_home()
    if not 1 <= port <= 65535:  # 99999 was an OverflowError from bind()
        raise VerifilyError(None, "--port", f"must be a TCP port from 1 to 65535; got {port}")
    if host not in LOOPBACK and not os.environ.get(AUTH_ENV):
        raise VerifilyError(None, "--host", f"listening on {host} exposes the API beyond this machine: set "
                                            f"{AUTH_ENV} (and give clients PREFECT_API_AUTH_STRING) first")
    if not (project / "prefect.yaml").is_file():
        raise VerifilyError(project / "prefect.yaml", None, "not found: run from the repository root or pass --project")
    unknown = [w for w in workers if w not in POOLS]
    if unknown:
        raise VerifilyError(None, "--workers", f"unknown pool {unknown[0]!r}; pools: {', '.join(POOLS)}")
    if running_api_url(home):
        raise VerifilyError(state_path(home), None, f"a stack is already running at {read_state(home)['ui_url']} "
                                                    f"(verifily stack down stops it)")
    if not _port_free(host, port):
        raise VerifilyError(None, "--port", f"{host}:{port} is already in use; pick another --port")
    client_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    api_url, ui_url = f"http://{client_host}:{port}/api", f"http://{client_host}:{port}"
    env = stack_env(api_url, home, host)
    logs = state_path(home).parent / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    state = {"api_url": api_url, "ui_url": ui_url, "host": host, "port": port, "project": str(project.resolve()),
             "prefect_home": env["PREFECT_HOME"], "processes": {}}
    prefect = _prefect()
    server = _spawn("server", prefect + ["server", "start", "--host", host, "--port", str(port)], env, logs)
    state["processes"]["server"] = server
    atomic_write_json(state_path(home), state)  # recorded at once: `stack down` can stop a half-started stack
    try:
        out.write(f"starting Prefect server on {host}:{port} (log {server['log']})\n")
        _wait_healthy(api_url, server, timeout)
        creating = [subprocess.Popen(prefect + ["work-pool", "create", pool, "--type", "process", "--overwrite"],
                                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for pool in POOLS]
        for pool, proc in zip(POOLS, creating):
            if proc.wait() != 0:
                raise EnvironmentProblem(None, f"work pool {pool}", "could not be created: "
                                         + (proc.stderr.read().decode(errors="replace").strip().splitlines() or ["?"])[-1])
        out.write(f"work pools: {', '.join(POOLS)}\n")
        _run(prefect + ["--no-prompt", "deploy", "--all"], env, project, "prefect deploy --all")
        out.write(f"deployed {project / 'prefect.yaml'}\n")
        for pool in workers:
            state["processes"][f"worker-{pool}"] = _spawn(f"worker-{pool}", prefect + ["worker", "start", "--pool", pool],
                                                          env, logs, cwd=project)
        atomic_write_json(state_path(home), state)
    except BaseException:
        stack_down(home, out=open(os.devnull, "w"))
        raise
    out.write(f"workers: {', '.join(workers) or 'none'}\n\nPrefect UI: {ui_url}\n"
              f"  export PREFECT_API_URL={api_url}   # needed by `prefect ...`; verifily finds the stack by itself\n"
              f"  prefect deployment run train/sft -p dataset=ds_x@v2 --watch   # after the export above\n"
              f"  verifily stack down\n"
              f"note: retrain/watch now runs hourly and trains the newest sft version of every dataset in the store "
              f"not yet trained under its config; pause its schedule in the UI if that is not wanted\n")
    return state


def _stop(proc: dict, grace: float = 15.0) -> bool:
    if not _alive(proc):
        return False
    try:
        os.killpg(proc["pid"], signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _alive(proc):
        time.sleep(0.1)
        _reap(proc["pid"])
    if _alive(proc):
        try:
            os.killpg(proc["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass
    _reap(proc["pid"])
    return True


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)  # our own child when up and down run in one process (tests)
    except ChildProcessError:
        pass


def stack_down(home: Optional[Path] = None, out=sys.stdout) -> int:
    """Stop the workers, then the server, that ``stack up`` recorded; returns how many were running."""
    state = read_state(home)
    if state is None:
        out.write("no stack recorded; nothing to stop\n")
        return 0
    procs = state["processes"]
    order = [name for name in procs if name != "server"] + (["server"] if "server" in procs else [])
    stopped = 0
    for name in order:  # workers first: a worker whose server vanished can hang on shutdown
        if _stop(procs[name]):
            stopped += 1
            out.write(f"stopped {name} (pid {procs[name]['pid']})\n")
    state_path(home).unlink(missing_ok=True)
    out.write(f"stack down ({stopped} process{'es' if stopped != 1 else ''} stopped)\n")
    return stopped


def stack_status(home: Optional[Path] = None, out=sys.stdout) -> int:
    state = read_state(home)
    if state is None:
        out.write("no stack running (verifily stack up starts one)\n")
        return 1
    for name, proc in state["processes"].items():
        out.write(f"{name:16s} pid {proc['pid']:<8d} {'running' if _alive(proc) else 'stopped'}  {proc['log']}\n")
    out.write(f"Prefect UI: {state['ui_url']}   API: {state['api_url']}\n")
    return 0


def cmd_stack(args) -> int:
    """``verifily stack up|down|status``."""
    if args.stack_command == "up":
        workers = [w for w in args.workers.split(",") if w] if args.workers is not None else list(WORKERS)
        stack_up(Path(args.project), host=args.host, port=args.port, workers=workers)
        return 0
    if args.stack_command == "down":
        stack_down()
        return 0
    return stack_status()
