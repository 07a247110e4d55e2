"""``verifily config show`` and ``verifily models list``: what a config resolves to, which models are embedded."""

from __future__ import annotations

import sys

from verifily_train.cli.console import print_table
from verifily_train.config import config_hash, config_to_yaml, load_config
from verifily_train.model.registry import list_embedded


def cmd_config_show(args) -> int:
    cfg = load_config(args.config, args.overrides, dataset=args.dataset)
    sys.stdout.write(config_to_yaml(cfg))
    print(f"# config_hash: {config_hash(cfg)}")
    return 0


def cmd_models_list(args) -> int:
    rows = [[m["alias"], m["task"], m["description"], m["path"] if m["installed"] else f"not installed: {m['install']}"]
            for m in list_embedded()]
    print_table(rows, ["ALIAS", "TASK", "MODEL", "WHERE"])
    print("Use an alias as base_model (base_model: smollm2), or any local folder, .gguf file or Hub id.")
    return 0
