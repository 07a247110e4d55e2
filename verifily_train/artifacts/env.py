"""env.json: the software and hardware facts that can change a run's numbers (what env_hash hashes)."""

from __future__ import annotations

import platform
import sys
from importlib import metadata
from typing import Dict

from verifily_train.hashing import content_hash

PACKAGES = ("verifily-train", "torch", "transformers", "peft", "accelerate", "tokenizers", "safetensors",
            "datasets", "numpy", "scikit-learn", "bitsandbytes")


def package_versions() -> Dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def describe_environment(device: str, precision: str, threads: int) -> dict:
    """Python, packages, machine, device, precision and thread count."""
    return {
        "python": platform.python_version(),
        "implementation": sys.implementation.name,
        "platform": platform.system().lower(),
        "machine": platform.machine(),
        "packages": package_versions(),
        "device": device,
        "precision": precision,
        "threads": threads,
    }


def env_hash(env: dict) -> str:
    """SHA-256 of env.json's canonical JSON."""
    return content_hash(env)
