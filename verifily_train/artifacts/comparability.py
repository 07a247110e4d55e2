"""What makes two runs less comparable than their config diff says: precision, model and tokenizer bytes,
tool and library versions, device. Read from run.json and env.json with ``.get``: older runs lack some
fields, newer ones may add them at the top level or in a nested reproducibility record."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Tuple

# nested records a newer run.json may keep its identity fields in (checked after the top level)
NESTED = ("reproducibility", "identity", "environment", "env")
LIBRARIES = ("torch", "transformers", "peft", "tokenizers", "accelerate", "bitsandbytes")


def _env_json(run_dir: Path) -> dict:
    path = Path(run_dir) / "env.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def _lookup(record: dict, env: dict, *names: str):
    """The first recorded value of any of ``names``: run.json's top level, its nested records, then env.json."""
    nested = [record.get(n) for n in NESTED if isinstance(record.get(n), dict)]
    # run.json's reproducibility record keeps its fields under "components"
    nested += [d.get("components") for d in nested if isinstance(d.get("components"), dict)]
    places = [record] + nested + [env]
    for place in places:
        for name in names:
            value = place.get(name)
            if value not in (None, "", {}, []):
                return value
    return None


def _packages(record: dict, env: dict) -> dict:
    found = _lookup(record, env, "packages", "package_versions", "libraries")
    return found if isinstance(found, dict) else {}


def run_facts(run_dir: Path, record: dict) -> dict:
    """The facts of one run that can change its figures on identical data and config."""
    env = _env_json(run_dir)
    job = record.get("job") or {}
    config = job.get("config") or {}
    lora = config.get("lora") or {}
    evaluation = record.get("evaluation") or {}
    packages = _packages(record, env)
    return {
        "precision": _lookup(record, env, "precision", "train_precision"),
        "quantization": record.get("quantization") or (lora.get("quantization") if lora.get("enabled", True) else "none"),
        "eval_precision": evaluation.get("precision") or _lookup(record, env, "eval_precision"),
        "model": _lookup(record, env, "model_identity", "model_hash", "base_model_identity")
        or record.get("model_source") or job.get("base_model"),
        "tokenizer": _lookup(record, env, "tokenizer_identity", "tokenizer_hash", "tokenizer_files_hash"),
        "tool_version": _lookup(record, env, "tool_version", "verifily_version", "verifily_train_version")
        or packages.get("verifily-train"),
        "device": _lookup(record, env, "device_kind", "device_type") or env.get("device") or job.get("device"),
        "device_name": _lookup(record, env, "device_name", "gpu_name", "accelerator"),
        "cuda_version": _lookup(record, env, "cuda_version"),
        "source_digest": _lookup(record, env, "source_digest"),
        "libraries": {name: packages.get(name) for name in LIBRARIES if packages.get(name)},
    }


def _short(value) -> str:
    text = str(value)
    head, sep, tail = text.partition(":")
    if sep and len(tail) > 16 and all(c in "0123456789abcdef" for c in tail.lower()):
        return f"{head}:{tail[:12]}"  # sha256:<64 hex>: the first 12 say which
    return text if len(text) <= 40 else text[:37] + "..."


# field, what to call it, why it matters
CHECKS: Tuple[Tuple[str, str, str], ...] = (
    ("precision", "precision", "generation may differ on identical weights"),
    ("quantization", "quantization", "the frozen base weights are rounded differently"),
    ("eval_precision", "evaluation precision", "generation may differ on identical weights"),
    ("model", "base model identity", "the deltas mix a model change with the data or config change"),
    ("tokenizer", "tokenizer identity", "loss and perplexity are per token: not comparable across tokenizers"),
    ("tool_version", "verifily-train version", "stage code may have changed the figures"),
    ("device", "device kind", "kernels differ: outputs may differ on identical weights"),
    ("device_name", "device model", "kernels differ: outputs may differ on identical weights"),
    ("cuda_version", "CUDA version", "kernels differ: outputs may differ on identical weights"),
    ("source_digest", "verifily-train source digest", "stage code differs, even where the version does not"),
)


def comparability_caveats(facts_a: dict, facts_b: dict) -> List[dict]:
    """One caveat per fact recorded in both runs that differs; one note naming facts a run did not record."""
    caveats = []
    for field, label, why in CHECKS:
        a, b = facts_a.get(field), facts_b.get(field)
        if field == "source_digest" and any(c["field"] == "tool_version" for c in caveats):
            continue  # another version has other sources: one line says it
        if a is not None and b is not None and a != b:
            caveats.append({"field": field, "a": a, "b": b,
                            "line": f"caveat: {label} differs (A {_short(a)}, B {_short(b)}): {why}"})
    libs_a, libs_b = facts_a.get("libraries") or {}, facts_b.get("libraries") or {}
    changed = [f"{n} {libs_a[n]} -> {libs_b[n]}" for n in LIBRARIES if n in libs_a and n in libs_b and libs_a[n] != libs_b[n]]
    if changed:
        caveats.append({"field": "libraries", "a": libs_a, "b": libs_b,
                        "line": f"caveat: library versions differ ({', '.join(changed)}): numerics may differ"})
    missing = _unrecorded(facts_a, facts_b)
    if missing:
        caveats.append({"field": "unrecorded", "a": None, "b": None, "line": missing})
    return caveats


def _unrecorded(facts_a: dict, facts_b: dict) -> Optional[str]:
    # the facts every run.json has recorded since identities were added; the rest are optional
    labels = {field: label for field, label, _ in CHECKS if field in ("precision", "model", "tokenizer", "tool_version",
                                                                         "device")}
    parts = []
    for side, facts in (("A", facts_a), ("B", facts_b)):
        absent = [label for field, label in labels.items() if facts.get(field) is None]
        if absent:
            parts.append(f"{side} does not record its {', '.join(absent)}")
    return f"note: {'; '.join(parts)}: not checked" if parts else None

