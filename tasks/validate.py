from prefect import task

from verifily_train import stages
from verifily_train.tasks.common import STAGE_OPTIONS


@task(name="validate-manifest", retries=1, **STAGE_OPTIONS)
def validate(cfg) -> dict:
    """Verify the dataset (hashes, rows, tags), the model kind and the device."""
    return stages.validate_stage(cfg)
