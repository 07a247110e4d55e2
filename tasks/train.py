from prefect import task

from verifily_train.pipeline import stages
from verifily_train.config.loader import hashed_section
from verifily_train.hashing import content_hash
from verifily_train.pipeline.codeversion import stage_code_version as code_version
from verifily_train.tasks.common import STAGE_OPTIONS, run_stage


@task(name="train-lora", retries=0, **STAGE_OPTIONS)
def train_lora(cfg, fp: dict, tokenized: dict, cache: dict):
    """Fine-tune the base model with LoRA and save the adapter (resumes from the key's last checkpoint)."""
    processes = fp["device"].get("num_processes", 1)  # data-parallel ranks; the global batch follows from them
    key = content_hash(code_version("train"), tokenized["output_hash"], fp["model_identity"], fp["model"]["kind"], cfg.task, hashed_section(cfg, "training"), hashed_section(cfg, "lora"), cfg.seed, cfg.output.save_adapter_only, fp["device"]["device"], fp["device"]["precision"], fp["numeric_env"], processes, processes * cfg.training.batch_size * cfg.training.gradient_accumulation_steps)
    progress = TrainingProgress()
    result = run_stage("train", key, cache, lambda out, work: stages.train_stage(cfg, fp, tokenized, out, work, progress))
    progress(1, 1)  # a cache hit, or the last step: the bar ends at 100%
    return result


class TrainingProgress:
    """A Prefect progress artifact on the flow run, updated as optimizer steps complete (live in the UI)."""

    def __init__(self):
        self.artifact_id = None

    def __call__(self, step: int, max_steps: int) -> None:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        percent = 100.0 * step / max_steps if max_steps else 100.0
        try:
            if self.artifact_id is None:
                self.artifact_id = create_progress_artifact(percent, key="training-progress",
                                                            description="train-lora: percent of optimizer steps done")
            else:
                update_progress_artifact(self.artifact_id, percent)
        except Exception:  # the UI's progress bar must never fail a training run
            pass
