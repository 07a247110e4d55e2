"""Plain-data views of a resolved config: the dict and YAML a Run keeps, the hashed view and ``config_hash``."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Dict

import yaml

from verifily_train.config import schema
from verifily_train.config.schema import TrainConfig
from verifily_train.hashing import canonical_json


def config_to_dict(cfg: TrainConfig) -> Dict[str, Any]:
    """The resolved config as plain data (what config.yaml in a Run holds)."""
    return dataclasses.asdict(cfg)


def hashed_view(cfg: TrainConfig) -> Dict[str, Any]:
    """The resolved config minus the keys that cannot change results (``schema.UNHASHED_KEYS``)."""
    data = config_to_dict(cfg)
    for dotted in schema.UNHASHED_KEYS:
        node = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node[part]
        node.pop(parts[-1], None)
    return data


def hashed_section(cfg: TrainConfig, name: str) -> Any:
    """One section (or top-level key) of the hashed view: what a stage's cache key reads from the config."""
    return hashed_view(cfg).get(name)


def config_hash(cfg: TrainConfig) -> str:
    """SHA-256 of the normalized, resolved config: key order, comments and number spelling don't matter."""
    return hashlib.sha256(canonical_json(hashed_view(cfg)).encode("utf-8")).hexdigest()


def config_to_yaml(cfg: TrainConfig) -> str:
    """Readable YAML of the resolved config, in schema order."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True, width=120)
