from pathlib import Path

from prefect import task

from verifily_train import stages
from verifily_train.tasks.common import STAGE_OPTIONS


@task(name="train-lora", retries=0, **STAGE_OPTIONS)
def train_lora(cfg, validated: dict, tokenized: dict, tokenized_dir: str, out_dir: str) -> dict:
    """Fine-tune the base model with LoRA and save the adapter."""
    return stages.train_stage(cfg, validated, tokenized, Path(tokenized_dir), Path(out_dir))
