"""The HuggingFace Hub side of a Run: credentials checked before training, the adapter uploaded after."""

from __future__ import annotations

import os
from pathlib import Path

from verifily_train.config.schema import TrainConfig
from verifily_train.errors import EnvironmentProblem


def check_push_to_hub(cfg: TrainConfig, hub_offline: bool = False) -> None:
    """A missing token or an offline Hub (``hub_offline``: preflight found it unreachable) is reported before
    training, not after."""
    if not cfg.output.push_to_hub:
        return
    if hub_offline or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        raise EnvironmentProblem(None, "output.push_to_hub", "HF_HUB_OFFLINE is set, so the adapter cannot be uploaded")
    from huggingface_hub import get_token

    if not get_token():
        raise EnvironmentProblem(None, "output.push_to_hub", "no HuggingFace token: run `hf auth login` or set HF_TOKEN")


def push_adapter(cfg: TrainConfig, run_path: Path) -> str:
    """Upload the run's adapter folder to ``output.hub_model_id`` (only when push_to_hub is on)."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(cfg.output.hub_model_id, exist_ok=True, private=True)
    api.upload_folder(repo_id=cfg.output.hub_model_id, folder_path=str(run_path / "adapter"))
    return f"https://huggingface.co/{cfg.output.hub_model_id}"
