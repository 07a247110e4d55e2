from prefect import task

from verifily_train.pipeline import stages
from verifily_train.hashing import content_hash
from verifily_train.pipeline.codeversion import stage_code_version as code_version
from verifily_train.tasks.common import STAGE_OPTIONS, run_stage


@task(name="fingerprint", retries=1, **STAGE_OPTIONS)
def fingerprint(cfg, cache: dict) -> dict:
    """Hash the data bytes, model and tokenizer files; check model kind, device and Hub credentials."""
    from pathlib import Path

    return stages.fingerprint_stage(cfg, Path(cache["root"]))


@task(name="validate-manifest", retries=1, **STAGE_OPTIONS)
def validate(cfg, fp: dict, cache: dict) -> dict:
    """Validate every row and tag of the dataset (cached by the data's content hash)."""
    key = content_hash(code_version("validate"), fp["data_hash"], cfg.task, cfg.eval.enabled and cfg.eval.slice_by_tags)
    return run_stage("validate", key, cache, lambda out, work: stages.validate_stage(cfg, fp, out, work))
