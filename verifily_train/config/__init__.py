"""train.yaml: schema (all defaults), loading with overrides, validation and hashing."""

from verifily_train.config.loader import config_hash, config_to_dict, config_to_yaml, load_config
from verifily_train.config.schema import TrainConfig

__all__ = ["TrainConfig", "load_config", "config_hash", "config_to_dict", "config_to_yaml"]
