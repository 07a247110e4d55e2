from prefect import task

from verifily_train.pipeline import stages
from verifily_train.hashing import content_hash
from verifily_train.pipeline.codeversion import stage_code_version as code_version
from verifily_train.tasks.common import STAGE_OPTIONS, run_stage


@task(name="slice-by-tags", retries=1, **STAGE_OPTIONS)
def slice_by_tags(cfg, tokenized: dict, evaluated: dict, baseline: dict, cache: dict) -> dict:
    """Metrics per tag value, with the base model's beside them."""
    key = content_hash(code_version("slice"), evaluated["output_hash"], baseline["output_hash"], tokenized["labels"], cfg.eval.slice_by_tags, cfg.eval.metrics, cfg.eval.bootstrap_samples, cfg.seed)
    return run_stage("slice", key, cache, lambda out, work: stages.slice_stage(cfg, tokenized, evaluated, baseline, out, work))
