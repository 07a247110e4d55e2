"""What the train stage writes after training: the adapter (or model), a merged model on request, the log."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

from verifily_train.config.schema import TrainConfig
from verifily_train.model.loading import ModelSpec, load_model


def save_trained(model, tok, labels, cfg: TrainConfig, spec: ModelSpec, out_dir: Path, frozen_converted: bool,
                 log_history: List[dict]) -> tuple:
    """Write ``adapter/`` (``model/`` for a full fine-tune), the merged ``model/`` if asked, the log; (adapter, merged)."""
    adapter_dir = out_dir / ("adapter" if cfg.lora.enabled else "model")
    merged_dir: Optional[Path] = None
    if cfg.lora.enabled and not cfg.output.save_adapter_only:
        merged_dir = out_dir / "model"
    model.save_pretrained(adapter_dir)
    normalize_adapter_config(adapter_dir / "adapter_config.json")
    tok.save_pretrained(adapter_dir)
    (adapter_dir / "labels.json").write_text(json.dumps({"labels": labels}, indent=2) + "\n", encoding="utf-8")
    if merged_dir is not None:
        # frozen weights held in bf16 for speed would merge into a bf16 model: merge into the fp32 base
        merged = merge_into_fresh_base(spec, adapter_dir, labels, tok, cfg) if frozen_converted else model.merge_and_unload()
        merged.save_pretrained(merged_dir)
        tok.save_pretrained(merged_dir)
    write_log(log_history, out_dir / "trainer_log.jsonl")
    return adapter_dir, merged_dir


def normalize_adapter_config(path: Path) -> None:
    """PEFT writes target_modules from a set, in hash-seed order: sort it so identical runs give identical bytes."""
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    for key in ("target_modules", "modules_to_save"):
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_log(history: List[dict], path: Path) -> None:
    """The Trainer's log history, one JSON object a line."""
    with open(path, "w", encoding="utf-8") as handle:
        for entry in history:
            handle.write(json.dumps(entry, sort_keys=True) + "\n")


def merge_into_fresh_base(spec: ModelSpec, adapter_dir: Path, labels, tok, cfg: TrainConfig):
    """The saved adapter merged into the base model loaded afresh (fp32), for ``output.save_adapter_only: false``."""
    from peft import PeftModel  # heavy: only a merged save needs it

    base = load_model(spec, labels=labels or None, pad_token_id=tok.pad_token_id,
                      trust_remote_code=cfg.trust_remote_code)
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
