from prefect import task

from verifily_train.pipeline import stages
from verifily_train.config.loader import hashed_section
from verifily_train.evaluation.baseline import baseline_key_parts
from verifily_train.hashing import content_hash, sha256_file
from verifily_train.pipeline.codeversion import stage_code_version as code_version
from verifily_train.tasks.common import STAGE_OPTIONS, run_stage


def gold_set_hash(cfg):
    """The gold set's bytes (not its path) when one is configured."""
    return sha256_file(cfg.eval.gold_set) if cfg.eval.gold_set else None


@task(name="evaluate", retries=1, **STAGE_OPTIONS)
def evaluate(cfg, fp: dict, tokenized: dict, trained: dict, cache: dict) -> dict:
    """Score every evaluation example with the reloaded adapter."""
    key = content_hash(code_version("evaluate"), trained["output_hash"], tokenized["output_hash"], fp["model_identity"], cfg.lora.quantization, cfg.eval.enabled, cfg.eval.batch_size, cfg.eval.metrics, cfg.eval.max_new_tokens, cfg.eval.format, gold_set_hash(cfg), hashed_section(cfg, "prompt"), fp["device"]["device"], fp["device"]["precision"], fp["numeric_env"])
    return run_stage("evaluate", key, cache, lambda out, work: stages.evaluate_stage(cfg, fp, tokenized, trained, out, work))


def baseline_key(cfg, fp: dict, tokenized: dict) -> str:
    """No training in it (every run of this model and data reuses it), but the base's quantization (QLoRA)."""
    return content_hash(code_version("evaluate"), "baseline", tokenized["output_hash"], fp["model_identity"], cfg.task, cfg.eval.enabled, cfg.eval.baseline, cfg.eval.batch_size, cfg.eval.metrics, cfg.eval.max_new_tokens, cfg.eval.format, fp["device"]["device"], fp["device"]["precision"], fp["numeric_env"], *baseline_key_parts(cfg.lora))


@task(name="evaluate-baseline", retries=1, **STAGE_OPTIONS)
def evaluate_baseline(cfg, fp: dict, tokenized: dict, cache: dict) -> dict:
    """Score the untuned base model once per model, data and quantization."""
    key = baseline_key(cfg, fp, tokenized)
    return run_stage("baseline", key, cache, lambda out, work: stages.baseline_stage(cfg, fp, tokenized, out, work))
