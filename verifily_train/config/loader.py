"""The config's old single module, kept as re-exports for importers not moved yet (pipeline/, flows/train.py).

New code imports from ``verifily_train.config`` (or ``config.load``, ``config.validate``, ``config.hashing``,
``config.parse``).
"""

from verifily_train.config.hashing import config_hash, config_to_dict, config_to_yaml, hashed_section, hashed_view
from verifily_train.config.load import known_keys, load_config, load_with_problems
from verifily_train.config.parse import parse_overrides, read_yaml, safe_yaml
from verifily_train.config.validate import validate_config

__all__ = ["config_hash", "config_to_dict", "config_to_yaml", "hashed_section", "hashed_view", "known_keys",
           "load_config", "load_with_problems", "parse_overrides", "read_yaml", "safe_yaml", "validate_config"]
