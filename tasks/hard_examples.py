from prefect import task

from verifily_train.pipeline import stages
from verifily_train.hashing import content_hash
from verifily_train.pipeline.codeversion import stage_code_version as code_version
from verifily_train.tasks.common import STAGE_OPTIONS, run_stage


@task(name="mine-hard-examples", retries=1, **STAGE_OPTIONS)
def mine_hard_examples(cfg, evaluated: dict, cache: dict) -> dict:
    """The worst evaluation examples with their tags."""
    key = content_hash(code_version("hard_examples"), evaluated["output_hash"], cfg.eval.hard_examples, cfg.eval.slice_by_tags,
                       cfg.eval.fdr_q)
    return run_stage("hard_examples", key, cache, lambda out, work: stages.hard_examples_stage(cfg, evaluated, out, work))
