"""Data-parallel training: the train stage relaunches itself under torchrun as N DDP ranks.

The parent (the train stage in the flow's process) writes a JSON job description, starts
``python -m torch.distributed.run --standalone --nproc-per-node N -m verifily_train.training.ddp_worker JOB``
and waits. Every rank builds the same Trainer (``train_adapter``); the HF Trainer speaks DDP itself
(nccl on cuda, gloo on cpu). Rank 0 alone writes the adapter, the log and the checkpoint marks, and its
output is what the parent shows; a failing rank records its error in a file, torchrun stops the
others, and the parent raises one error naming the rank.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from verifily_train import errors
from verifily_train.config import config_to_dict
from verifily_train.fsio import atomic_write_json
from verifily_train.procs import die_with_parent, stop
from verifily_train.training.checkpoints import last_complete_checkpoint
from verifily_train.training.ranks import JOB_ENV

JOB_FOLDER = "ddp"  # inside the stage's work folder: job.json, result.json, error-rank<R>.json, logs


def _rank_env(plan, job_path: Path) -> dict:
    env = dict(os.environ, **{JOB_ENV: str(job_path)})
    # one process per core at most: N ranks each running all-core BLAS would fight over the same cores
    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // plan.num_processes))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def launch_ranks(cfg, spec, tokenized: dict, tokenized_dir: Path, plan, out_dir: Path, work_dir: Path) -> dict:
    """Train on ``plan.num_processes`` DDP ranks under torchrun; returns rank 0's stage manifest."""
    folder = work_dir / JOB_FOLDER
    shutil.rmtree(folder, ignore_errors=True)  # a previous attempt's errors and logs
    folder.mkdir(parents=True)
    # partial checkpoints are deleted here, once, so no two ranks race to delete the same folder
    last_complete_checkpoint(work_dir / "checkpoints")
    # the resolved config as config_to_dict gives it: each rank rebuilds it (config.from_resolved), never re-parses
    job = {"config": config_to_dict(cfg), "spec": dataclasses.asdict(spec), "tokenized": tokenized,
           "tokenized_dir": str(tokenized_dir), "plan": dataclasses.asdict(plan), "out_dir": str(out_dir),
           "work_dir": str(work_dir)}
    job_path = folder / "job.json"
    atomic_write_json(job_path, job)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={plan.num_processes}", "--max-restarts=0",
               "-m", "verifily_train.training.ddp_worker", str(job_path)]
    with open(folder / "launcher.log", "wb") as launcher_log:
        proc = subprocess.Popen(command, env=_rank_env(plan, job_path), stdin=subprocess.DEVNULL,
                                stdout=launcher_log, stderr=subprocess.STDOUT,
                                preexec_fn=die_with_parent if sys.platform.startswith("linux") else None)
        try:
            _follow_rank0(proc, folder / "rank-0.log")
        finally:
            if proc.poll() is None:  # interrupted (Ctrl-C, a Prefect cancel): stop every rank
                stop(proc, timeout=30)
    result = folder / "result.json"
    if proc.returncode == 0 and result.is_file():
        return json.loads(result.read_text(encoding="utf-8"))
    raise rank_failure(folder, plan.num_processes, proc.returncode)


def _follow_rank0(proc: subprocess.Popen, log: Path) -> None:
    """Wait for the launcher, copying rank 0's output (progress bar included) to this process's stderr."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a bar's block glyph may span two reads
    handle = None
    try:
        while True:
            finished = proc.poll() is not None
            if handle is None and log.is_file():
                handle = open(log, "rb")
            if handle is not None:
                chunk = handle.read()
                if chunk:
                    sys.stderr.write(decoder.decode(chunk))
                    sys.stderr.flush()
            if finished:
                return
            time.sleep(0.2)
    finally:
        if handle is not None:
            handle.close()


def rank_failure(folder: Path, processes: int, returncode: Optional[int]) -> Exception:
    """One error for a failed launch: the first rank that reported one (a user error keeps its class)."""
    reports = []
    for path in folder.glob("error-rank*.json"):
        try:
            reports.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    if not reports:
        return RuntimeError(f"data-parallel training on {processes} processes stopped (torchrun exit code "
                            f"{returncode}) before any rank reported an error; see {folder / 'launcher.log'}")
    first = min(reports, key=lambda r: r["time"])
    cls = getattr(errors, first["type"], None)
    if first.get("user_error") and isinstance(cls, type) and issubclass(cls, errors.VerifilyError):
        try:
            return cls(first.get("where"), first.get("key"), first.get("problem", ""))
        except TypeError:
            pass
    message = " ".join(first["message"].split())
    return RuntimeError(f"rank {first['rank']} of {processes} failed, so torchrun stopped the others: "
                        f"{first['type']}: {message} (traceback in {folder / ('rank-%d.log' % first['rank'])})")
