"""Which data-parallel rank this process is (torchrun's environment), for code that every rank runs."""

from __future__ import annotations

import os
from typing import Optional

JOB_ENV = "VERIFILY_DDP_JOB"  # set in every rank: train_adapter trains there instead of relaunching


def in_launched_rank() -> bool:
    """True inside a rank started by ``launch_ranks`` (which then trains instead of launching again)."""
    return bool(os.environ.get(JOB_ENV))


def is_main_rank() -> bool:
    """Rank 0 (or a single-process run): the one that writes files and reports progress."""
    return int(os.environ.get("RANK", "0")) == 0


def local_device_index() -> int:
    """The CUDA device of this rank (torchrun's LOCAL_RANK; 0 in a single process)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def ddp_backend(device: str) -> Optional[str]:
    """nccl between GPUs, gloo between CPU processes; None for a single process."""
    if not in_launched_rank():
        return None
    return "nccl" if device == "cuda" else "gloo"


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    import torch.distributed as dist  # heavy: only a rank that reaches a checkpoint needs it

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
