"""train.yaml: schema (all defaults), parsing (``parse``), loading once with overrides (``load``), validation
returning every problem (``validate``) and the hashed view (``hashing``)."""

from verifily_train.config.hashing import config_hash, config_to_dict, config_to_yaml
from verifily_train.config.load import load_config, load_with_problems
from verifily_train.config.schema import TrainConfig

__all__ = ["TrainConfig", "load_config", "load_with_problems", "config_hash", "config_to_dict", "config_to_yaml"]
