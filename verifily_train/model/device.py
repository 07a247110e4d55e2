"""Device and precision: CUDA > MPS > CPU, and mixed precision only where the hardware supports it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, List, Optional

from verifily_train.config.schema import ComputeSection
from verifily_train.errors import EnvironmentProblem


@dataclass(frozen=True)
class DevicePlan:
    device: str  # cuda | mps | cpu
    precision: str  # bf16 | fp16 | fp32: what really runs
    warnings: List[str] = field(default_factory=list)
    num_processes: int = 1  # data-parallel ranks (compute.num_processes resolved by resolve_num_processes)


def cpu_supports_bf16() -> bool:
    """Native bf16 on the CPU (AVX512-BF16 or AMX): autocast is then faster, not emulated."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_device(compute: ComputeSection) -> DevicePlan:
    """Pick the device (spec §8 rule 4) and the precision that can really run on it."""
    import torch

    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if compute.device == "auto":
        device = "cuda" if cuda else "mps" if mps else "cpu"
    else:
        device = compute.device
        if device == "cuda" and not cuda:
            raise EnvironmentProblem(None, "compute.device", "cuda was asked for but no CUDA GPU is visible; use auto or cpu")
        if device == "mps" and not mps:
            raise EnvironmentProblem(None, "compute.device", "mps was asked for but Apple MPS is not available; use auto or cpu")
    warnings: List[str] = []
    precision = "fp32"
    if compute.bf16:
        supported = (device == "cuda" and torch.cuda.is_bf16_supported()) or (device == "cpu" and cpu_supports_bf16())
        if supported:
            precision = "bf16"
        else:
            warnings.append(f"compute.bf16: bfloat16 is not supported on this {device}; training in fp32")
    elif compute.fp16:
        if device == "cuda":
            precision = "fp16"
        else:
            warnings.append(f"compute.fp16: float16 mixed precision needs CUDA; training in fp32 on {device}")
    processes = resolve_num_processes(compute.num_processes, device, warnings)
    return DevicePlan(device=device, precision=precision, warnings=warnings, num_processes=processes)


def resolve_num_processes(setting: Any, device: str, warnings: Optional[List[str]] = None) -> int:
    """``compute.num_processes`` as a number of ranks: ``auto`` = visible CUDA GPUs (at least 1)."""
    import torch

    gpus = torch.cuda.device_count() if device == "cuda" else 0
    if setting == "auto":
        return max(1, gpus)
    processes = int(setting)
    if processes > 1 and device == "mps":
        raise EnvironmentProblem(None, "compute.num_processes", "data-parallel training runs on cuda or cpu, not mps")
    if device == "cuda" and processes > gpus:
        raise EnvironmentProblem(None, "compute.num_processes",
                                 f"{processes} processes need {processes} CUDA GPUs but {gpus} are visible")
    cores = os.cpu_count() or 1
    if device == "cpu" and processes > cores and warnings is not None:
        warnings.append(f"compute.num_processes: {processes} CPU processes on {cores} cores run slower than 1")
    return processes
