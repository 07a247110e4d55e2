"""train.yaml: schema (all defaults), parsing (``parse``), loading once with overrides (``load``, whose
``from_resolved`` rebuilds a resolved config without validating it again), validation returning every problem
(``validate``) and the hashed view (``hashing``)."""

from verifily_train.config.hashing import config_hash, config_to_dict, config_to_yaml
from verifily_train.config.load import from_resolved, load_config, load_with_problems
from verifily_train.config.schema import TrainConfig

__all__ = ["TrainConfig", "load_config", "load_with_problems", "from_resolved", "config_hash", "config_to_dict",
           "config_to_yaml"]
