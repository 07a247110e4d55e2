"""Suite 4, CLI start-up: wall time of ``verifily --help`` and ``verifily runs list`` in fresh processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from bench.common import median

COMMANDS = {"verifily --help": ["--help"], "verifily runs list": ["runs", "list"]}


def verifily_command() -> str:
    """The installed console script next to this interpreter (what a user types)."""
    script = Path(sys.executable).parent / "verifily"
    return str(script) if script.is_file() else "verifily"


def run_cli_startup(work: Path, reps: int, log=print) -> dict:
    env = dict(os.environ, VERIFILY_HOME=str(work / "cli-home"))
    out = {}
    for _ in range(reps):
        for name, args in COMMANDS.items():
            started = time.perf_counter()
            done = subprocess.run([verifily_command(), *args], env=env, cwd=work,
                                  capture_output=True, text=True)
            seconds = time.perf_counter() - started
            if done.returncode != 0:
                raise RuntimeError(f"{name} failed: {done.stderr[-500:]}")
            out.setdefault(name, []).append(seconds)
    table = {name: {"seconds": median(times), "target_under_1s_met": median(times) < 1.0} for name, times in out.items()}
    for name, row in table.items():
        log(f"  {name}: {row['seconds']:.2f} s")
    return {"reps": reps, "commands": table, "raw": out}
