"""Child processes we start: tie their life to ours, recognise them by PID, stop them."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Callable, Optional


def die_with_parent() -> None:
    """``preexec_fn`` for a child: the kernel sends it SIGTERM when its parent dies (Linux
    PR_SET_PDEATHSIG), so a ``kill -9`` of ours leaves no server, launcher or rank running."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except OSError:
        pass


def start_time(pid: int) -> Optional[str]:
    """The kernel's start time of ``pid`` (field 22 of /proc/pid/stat): tells a recycled PID from ours."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def stop(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM, then SIGKILL if it is still running after ``timeout`` seconds; reaps it."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` now (bound to 0 and released: a server started right after gets it)."""
    import socket

    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def wait_healthy(api_url: str, alive: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    """Poll ``<api_url>/health`` until it answers 200 (True), or ``alive()`` turns False or ``timeout`` passes."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(interval)
    return False
