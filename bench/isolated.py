"""One contender of one repetition in a fresh Python process: ``python -m bench.isolated REQUEST RESULT``.

Why: glibc's allocator keeps the fragmentation a training run leaves behind. Measured on the hidden-512
bench model (2 threads): after one bf16-autocast run of the train stage, later fp32 runs of the same
stage in that process ran 13-16% slower (1,904 -> 1,655 / 1,591 tok/s; every op slower, allocation-heavy
ones most: ``aten::empty`` 2.2x), and with jemalloc preloaded they did not (1,789 -> 1,792 / 1,741).
So whichever contender ran after another paid for it. A user's ``verifily train`` trains once per
process; each contender here does too, and every contender, peers included, gets the same fresh start.

REQUEST is JSON: ``factory`` ("module:function" returning {name: zero-argument run}), its ``kwargs``
(JSON values), the ``contender`` to run, and ``threads``. RESULT receives the run's outcome as JSON.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict

REPO = Path(__file__).resolve().parents[1]


def load_factory(spec: str) -> Callable[..., Dict[str, Callable[[], dict]]]:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def run_isolated(factory: str, kwargs: dict, contender: str, threads: int, work: Path) -> dict:
    """Run ``factory(**kwargs)[contender]()`` in a child process; its outcome (a JSON dict)."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work, prefix="isolated-") as tmp:
        request, result = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request.write_text(json.dumps({"factory": factory, "kwargs": kwargs, "contender": contender,
                                       "threads": threads}, default=str), encoding="utf-8")
        done = subprocess.run([sys.executable, "-m", "bench.isolated", str(request), str(result)], cwd=REPO)
        if done.returncode != 0 or not result.is_file():
            raise RuntimeError(f"contender {contender} failed in its own process (exit {done.returncode})")
        return json.loads(result.read_text(encoding="utf-8"))


def isolated_runs(factory: str, kwargs: dict, names, threads: int, work: Path) -> Dict[str, Callable[[], dict]]:
    """{name: run} where each run starts a fresh process for that contender."""
    return {name: (lambda name=name: run_isolated(factory, kwargs, name, threads, work)) for name in names}


def main(argv=None) -> int:
    request_path, result_path = (argv or sys.argv[1:])[:2]
    request = json.loads(Path(request_path).read_text(encoding="utf-8"))
    from bench.common import quiet_libraries, set_threads

    set_threads(int(request["threads"]))
    quiet_libraries()
    runs = load_factory(request["factory"])(**request["kwargs"])
    outcome = dict(runs[request["contender"]](), process=os.getpid())
    Path(result_path).write_text(json.dumps(outcome, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
