"""The Prefect runtime around an in-process flow run: the configured server or a temporary one, heartbeats,
the quiet environment, and Prefect API failures as user errors.

Prefect itself is imported only inside the functions that need it: ``verifily --help`` and the commands
that make no flow run stay fast.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import importlib.util
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Optional, Sequence

from verifily_train.cli.stack import configured_api_url
from verifily_train.errors import EnvironmentProblem, VerifilyError
from verifily_train.procs import die_with_parent, free_port, stop, wait_healthy
from verifily_train.quiet import quiet_libraries

__all__ = ["quiet_libraries", "use_prefect_server", "TemporaryServer", "start_temporary_server", "start_quiet_server",
           "await_server", "preload_fingerprint_modules", "in_process_flow_settings", "preload_while_server_boots", "is_prefect_api_error",
           "prefect_api_problem", "first_line", "STAGE_MODULES"]


def use_prefect_server() -> Optional[str]:
    """The configured Prefect API (PREFECT_API_URL, else a running `verifily stack`), exported for Prefect."""
    url = configured_api_url()
    if url:
        os.environ["PREFECT_API_URL"] = url
    return url


def preload_fingerprint_modules() -> None:
    """Import what the fingerprint stage needs (torch, transformers' config classes) while the server boots."""
    import torch  # noqa: F401
    from transformers import AutoConfig  # noqa: F401
    from transformers.models.auto import modeling_auto  # noqa: F401


# what the train and evaluate stages import, one or both of which run in every flow that is not a replay: each
# takes seconds to import, even after the fingerprint modules (docs/models.md, "Around the flow run")
STAGE_MODULES = ("transformers.modeling_utils", "peft", "transformers.trainer")


def preload_while_server_boots(server: "TemporaryServer", modules: Sequence[str] = STAGE_MODULES) -> int:
    """Import ``modules`` while the temporary server is still booting; returns how many were imported.

    The server boots on the other core and this process would otherwise idle in ``server.wait()``. Each
    module is imported only while the server is not up yet, so a flow that needs none of them (its train and
    evaluate stages cached) loses at most the one import that outlasts the boot.
    """
    count = 0
    for name in modules:
        if server.healthy or server.proc.poll() is not None:
            break
        importlib.import_module(name)
        count += 1
    return count


HEARTBEAT_SETTINGS = ("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "PREFECT_RUNNER_HEARTBEAT_FREQUENCY")


@contextlib.contextmanager
def in_process_flow_settings():
    """Prefect settings for a flow run this process makes and watches: no flow-run heartbeats, unless configured.

    Heartbeats let a server mark a flow run whose process vanished as crashed (Prefect's zombie-flow
    automation); they matter for deployment runs, which a worker starts and nobody watches. Here the CLI
    is in the user's terminal. Prefect's heartbeat thread sleeps in whole seconds and is joined when the
    flow ends, so a flow run waits for its last sleep (docs/models.md, "Around the flow run", has the cost).
    A heartbeat frequency set in the environment or in a Prefect profile/prefect.toml is kept.
    """
    if any(os.environ.get(name) for name in HEARTBEAT_SETTINGS) or any(
            prefect_setting_elsewhere(name) for name in HEARTBEAT_SETTINGS):
        yield
        return
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


def prefect_setting_elsewhere(name: str) -> bool:
    """True when ``name`` may be set outside the environment (the active Prefect profile, or a prefect.toml
    or .env in this folder): then Prefect's own settings decide, and we do not start a server over them."""
    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect")
    profiles = Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml")
    if (Path("prefect.toml").is_file() or Path(".env").is_file()
            or (Path("pyproject.toml").is_file() and "[tool.prefect" in Path("pyproject.toml").read_text(errors="ignore"))):
        return True
    if not profiles.is_file():
        return False
    try:
        import tomllib

        data = tomllib.loads(profiles.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True
    active = os.environ.get("PREFECT_PROFILE") or data.get("active", "ephemeral")
    return name in (data.get("profiles", {}).get(active) or {})


def server_command(port: int) -> list:
    """The command Prefect runs for its temporary server (prefect/server/api/server.py), on ``port``."""
    app_dir = Path(importlib.util.find_spec("prefect").origin).parent.parent
    return [sys.executable, "-m", "uvicorn", "--app-dir", str(app_dir), "--factory",
            "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "error", "--lifespan", "on"]


class TemporaryServer:
    """Prefect's temporary local server, started by us as early as possible instead of by Prefect on first use.

    Prefect starts it (``SubprocessASGIServer``) when the first client call finds no ``PREFECT_API_URL``:
    after its own import and the server module's in this process, then the server's boot, all in series.
    Started here right after the cheap preflight checks, without importing Prefect, it boots on the other
    core while this process imports transformers and torch. It is the same command Prefect runs, on a free
    loopback port, with the same settings (the child reads the same environment and profile), plus a death
    signal: a ``kill -9`` of verifily leaves no server. ``command`` (a function of the port) replaces it.
    """

    def __init__(self, command=server_command, health_timeout: float = 90.0):
        self._first_use = first_use_lock()  # held until this server answers: it creates the database
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.proc = subprocess.Popen(
            command(self.port),
            env={**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                 "PREFECT__SERVER_FINAL": "1"},
            # its own session: a terminal's Ctrl-C (SIGINT to the foreground group) must reach verifily alone,
            # which then reports the interrupted run to the server and stops it (a dead server hangs the exit)
            start_new_session=True, preexec_fn=die_with_parent)
        atexit.register(self.stop)
        self.healthy = False
        self._thread = threading.Thread(target=self._wait_healthy, args=(health_timeout,),
                                        name="prefect-server-health", daemon=True)
        self._thread.start()

    def _wait_healthy(self, timeout: float) -> None:
        try:
            self.healthy = wait_healthy(self.url, lambda: self.proc.poll() is None, timeout)
            if self.healthy and self._first_use is not None:
                _ready_marker().write_text(_ready_text(), encoding="utf-8")
        except OSError:
            pass  # no marker: the next first run takes the lock again, nothing worse
        finally:
            if self._first_use is not None:
                os.close(self._first_use)  # releases the lock
                self._first_use = None

    def wait(self) -> None:
        """Block until the server answers; a server that died or never answered is a one-line error."""
        self._thread.join()
        if not self.healthy:
            code = self.proc.poll()
            self.stop()
            raise VerifilyError(None, "PREFECT_API_URL", "Prefect's temporary server did not start"
                                + (f" (exit code {code}: is PREFECT_HOME's disk full, or a file size limit set?)"
                                   if code is not None else " within 90 s")
                                + ": set PREFECT_API_URL to a running server, or start one with verifily stack up")

    def stop(self) -> None:
        if self.proc.poll() is None:
            stop(self.proc, timeout=5)


_SERVER: Optional[TemporaryServer] = None
FIRST_USE_WAIT_SECONDS = 180.0  # two health timeouts: past it the holder is stuck, and we start anyway


def prefect_home() -> Path:
    return Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()


def _ready_marker() -> Path:
    return prefect_home() / ".verifily-server-ready"


def _ready_text() -> str:
    """What the database was created for: this Prefect (a new one migrates it) at this database URL."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        prefect_version = version("prefect")
    except PackageNotFoundError:
        prefect_version = "?"
    return f"prefect {prefect_version}\n{os.environ.get('PREFECT_API_DATABASE_CONNECTION_URL', '')}\n"


def first_use_lock(wait: Optional[float] = None) -> Optional[int]:
    """The first start of a temporary server on a ``PREFECT_HOME`` (or after a Prefect upgrade) creates and
    migrates its SQLite database: two at once failed ("database is locked", a column added twice). That start
    holds an exclusive lock on ``PREFECT_HOME/.verifily-first-use.lock`` until its server answers, then writes
    ``.verifily-server-ready``; a second first run waits for it, then starts on the ready database. Returns the
    locked file descriptor, or None once the database is ready (later starts take no lock)."""
    import fcntl
    import time

    marker = _ready_marker()
    try:
        if marker.read_text(encoding="utf-8") == _ready_text():
            return None
    except (OSError, UnicodeDecodeError):
        pass
    try:
        prefect_home().mkdir(parents=True, exist_ok=True)
        fd = os.open(prefect_home() / ".verifily-first-use.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:
        return None  # an unwritable PREFECT_HOME: Prefect's own error says more than ours would
    deadline = time.monotonic() + (FIRST_USE_WAIT_SECONDS if wait is None else wait)
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:  # another first run's server is creating the database: wait for it
            if time.monotonic() > deadline:
                os.close(fd)
                return None
            time.sleep(0.1)
    try:
        if marker.read_text(encoding="utf-8") == _ready_text():
            os.close(fd)
            return None
    except (OSError, UnicodeDecodeError):
        pass
    return fd


def start_quiet_server() -> Optional[TemporaryServer]:
    """Before a flow run (or once the cheap preflight checks pass): quiet the libraries, then start the
    temporary server unless a server is configured; the same server on every call."""
    quiet_libraries()
    return start_temporary_server()


def start_temporary_server() -> Optional[TemporaryServer]:
    """Start Prefect's temporary server now when a run would start one anyway; export its URL for Prefect.

    Nothing is started when a server is configured (``PREFECT_API_URL``, a running stack, a profile), when
    Prefect is already imported (its settings are read), when ephemeral mode is off, or off Linux.
    """
    global _SERVER
    if _SERVER is not None:
        return _SERVER
    if (os.environ.get("PREFECT_API_URL") or not sys.platform.startswith("linux") or "prefect" in sys.modules
            or os.environ.get("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "").lower() in ("0", "false")
            or prefect_setting_elsewhere("PREFECT_API_URL")
            or prefect_setting_elsewhere("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE")):
        return None
    _SERVER = TemporaryServer()
    os.environ["PREFECT_API_URL"] = _SERVER.url  # read when Prefect is imported; child processes inherit it
    return _SERVER


API_PROBE_SECONDS = 5.0


def check_api_answers(url: Optional[str] = None, timeout: float = API_PROBE_SECONDS) -> None:
    """A configured Prefect API (``PREFECT_API_URL``, a stack) answers ``/health`` within ``timeout`` seconds, or
    one line says so: a stale URL after ``verifily stack down`` was three tracebacks, and a listener that never
    answers hung ``train`` without a word. Checked before a flow run, never retried."""
    import socket
    import urllib.error
    import urllib.request

    url = url or os.environ.get("PREFECT_API_URL")
    if not url:
        return
    advice = "start it (verifily stack up), or unset PREFECT_API_URL to use a temporary server"
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout) as response:
            response.read(1024)
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            raise EnvironmentProblem(None, "PREFECT_API_URL", f"{url} refused this client ({err.code} {err.reason}): "
                                                              "set PREFECT_API_AUTH_STRING to the server's auth "
                                                              "string") from None
        raise EnvironmentProblem(None, "PREFECT_API_URL", f"{url}/health answered {err.code} {err.reason}: "
                                                          "is it a Prefect server's API?") from None
    except (socket.timeout, TimeoutError):
        raise EnvironmentProblem(None, "PREFECT_API_URL", f"{url} did not answer within {timeout:g} s: a silent "
                                                          f"listener, or a server that hangs; {advice}") from None
    except (urllib.error.URLError, OSError, ValueError) as err:  # refused, no such host; ValueError: a bad URL
        reason = getattr(err, "reason", err)
        raise EnvironmentProblem(None, "PREFECT_API_URL", f"no Prefect server answers at {url} ({reason}); "
                                                          f"{advice}") from None


def await_server(server: Optional[TemporaryServer], preload_stages: bool = False) -> None:
    """Wait for the temporary server (if one was started) before a flow runs: a half-started one is never
    handed to the flow; a configured server must answer (``check_api_answers``). With ``preload_stages``, the
    train and evaluate stages' modules are imported meanwhile."""
    if server is None:
        check_api_answers()
        return
    if preload_stages:
        preload_while_server_boots(server)
    server.wait()


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    line = text.splitlines()[0] if text else type(err).__name__
    return line.split(" for url ")[0][:200]  # "Server error '500 Internal Server Error'", not the URL and advice


def is_prefect_api_error(err: BaseException) -> bool:
    """A failure of the Prefect server's API (an HTTP error status, or no connection), not of our stages."""
    try:
        import httpx
        from prefect.exceptions import PrefectHTTPStatusError
    except ImportError:
        return False
    return isinstance(err, (PrefectHTTPStatusError, httpx.HTTPError))


def prefect_api_problem(err: BaseException) -> EnvironmentProblem:
    """One line for a Prefect API failure before the Run was written: the stages that finished stay cached."""
    status = getattr(getattr(err, "response", None), "status_code", None)
    if status in (401, 403):  # not a full disk: the server wants the client's auth string
        return EnvironmentProblem(None, "PREFECT_API_URL", f"Prefect's server refused this client ({first_line(err)}): "
                                                           "set PREFECT_API_AUTH_STRING to the server's auth string. "
                                                           "Finished stages are cached")
    if status is None and is_prefect_api_error(err):  # no HTTP answer at all: refused, timed out, reset
        return EnvironmentProblem(None, "PREFECT_API_URL", f"Prefect's server stopped answering ({first_line(err)}). "
                                                           "Finished stages are cached: start it and re-run")
    return EnvironmentProblem(None, "PREFECT_API_URL", f"Prefect's server failed ({first_line(err)}); its database "
                                                       "may be out of space or past a file size limit. Finished "
                                                       "stages are cached: fix it and re-run")
