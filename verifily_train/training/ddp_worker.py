"""One data-parallel rank: ``torchrun ... -m verifily_train.training.ddp_worker JOB`` (see distributed.py)."""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from verifily_train.config import from_resolved
from verifily_train.errors import VerifilyError
from verifily_train.fsio import atomic_write_json
from verifily_train.model.device import DevicePlan
from verifily_train.model.loading import ModelSpec, load_tokenizer
from verifily_train.training.trainer import train_adapter


def _redirect_output(log: Path) -> None:
    """Send this rank's stdout and stderr to its own log file (the parent shows rank 0's)."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _report_error(folder: Path, rank: int, err: BaseException) -> None:
    report = {"rank": rank, "time": time.time(), "type": type(err).__name__, "message": str(err),
              "user_error": isinstance(err, VerifilyError), "traceback": traceback.format_exc()}
    if isinstance(err, VerifilyError):
        report.update(where=err.where, key=err.key, problem=err.problem)
    atomic_write_json(folder / f"error-rank{rank}.json", report)


def run_rank(job_path: Path) -> None:
    """Train this rank's share with the job's config; rank 0 writes ``result.json`` (the stage manifest)."""
    rank = int(os.environ.get("RANK", "0"))
    folder = job_path.parent
    _redirect_output(folder / f"rank-{rank}.log")
    try:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        job = json.loads(job_path.read_text(encoding="utf-8"))
        cfg = from_resolved(job["config"])  # validated once, in the parent
        spec = ModelSpec(**job["spec"])
        tok = load_tokenizer(spec, cfg.trust_remote_code)
        manifest = train_adapter(cfg, spec, tok, job["tokenized"], Path(job["tokenized_dir"]),
                                 DevicePlan(**job["plan"]), Path(job["out_dir"]), Path(job["work_dir"]))
        if rank == 0:
            atomic_write_json(folder / "result.json", manifest)
        if dist.is_initialized():
            dist.destroy_process_group()
    except BaseException as err:
        _report_error(folder, rank, err)
        traceback.print_exc()
        sys.exit(1)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: torchrun ... -m verifily_train.training.ddp_worker JOB.json")
    run_rank(Path(sys.argv[1]))
