"""env.json: the software and hardware facts that can change a run's numbers (what env_hash hashes)."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Dict, Iterable, Optional

from verifily_train.hashing import content_hash, sha256_file
from verifily_train import __version__

LIBRARY_ROOT = Path(__file__).resolve().parent.parent
# library versions whose upgrade can change trained weights or scores (in every stage key)
NUMERIC_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate")
PACKAGES = ("verifily-train", "torch", "transformers", "peft", "accelerate", "tokenizers", "safetensors",
            "datasets", "numpy", "scikit-learn", "bitsandbytes")


def package_versions(names: Iterable[str] = PACKAGES) -> Dict[str, Optional[str]]:
    """Installed version of each distribution (None when it is not installed)."""
    out = {}
    for name in names:
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


def numeric_env() -> Dict[str, Optional[str]]:
    """Library versions whose upgrade can change trained weights or scores."""
    return package_versions(NUMERIC_PACKAGES)


def tool_version() -> str:
    """The installed verifily-train version (the package's ``__version__`` when run from a bare checkout)."""
    try:
        return metadata.version("verifily-train")
    except metadata.PackageNotFoundError:
        return __version__


def package_sources() -> Dict[str, Path]:
    """This tool's ``.py`` files by their name inside the installed package.

    ``flows/`` and ``tasks/`` sit beside the package in a checkout but install inside it
    (``verifily_train.flows``), so a checkout and a wheel of the same code name the same files.
    ``find_spec`` of a subpackage imports only its parent: Prefect is not loaded.
    """
    files = {p.relative_to(LIBRARY_ROOT).as_posix(): p for p in LIBRARY_ROOT.rglob("*.py")}
    for sub in ("flows", "tasks"):
        spec = importlib.util.find_spec(f"verifily_train.{sub}")
        for location in (spec.submodule_search_locations or []) if spec is not None else []:
            root = Path(location).resolve()
            files.update({f"{sub}/{p.relative_to(root).as_posix()}": p for p in root.rglob("*.py")})
    return files


def digest_sources(files: Dict[str, Path]) -> str:
    """SHA-256 over ``name\\0sha256(bytes)`` lines in sorted name order: where the files live does not count."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}\0{sha256_file(files[name])}\n".encode())
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """``digest_sources(package_sources())``, computed once per process."""
    return digest_sources(package_sources())


def accelerator_identity(device: str) -> Dict[str, Optional[str]]:
    """GPU name and CUDA version of the first visible GPU on ``cuda``; None for both elsewhere."""
    if device != "cuda":
        return {"gpu_name": None, "cuda_version": None}
    import torch

    return {"gpu_name": torch.cuda.get_device_name(0), "cuda_version": torch.version.cuda}
