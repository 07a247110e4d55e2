"""A pipeline stage declared in one place: its name, manual version, key inputs and run function.

A stage's cache key is ``content_hash(code version, *key_inputs(ctx))``; the code version is derived from
the import closure of the module that declares the stage (``pipeline/codeversion.py``), so the key, the
code that runs and the replay record all read the same declaration.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Tuple

from verifily_train.config.schema import TrainConfig
from verifily_train.hashing import content_hash
from verifily_train.pipeline.codeversion import code_version


@dataclass(frozen=True)
class StageContext:
    """What a stage reads: the resolved config, the fingerprint and the manifests of the stages before it."""

    cfg: TrainConfig
    fp: dict
    done: Mapping[str, dict] = field(default_factory=dict)
    on_progress: Optional[Callable[[int, int], None]] = None  # optimizer steps done / total (train only)

    def __getitem__(self, stage: str) -> dict:
        return self.done[stage]


@dataclass(frozen=True)
class Stage:
    """One cached stage of the ``train`` pipeline."""

    name: str  # the cache folder and the manifest's ``stage``
    task_name: str  # the Prefect task's name (the UI's)
    version: str  # bump when the same inputs should now give different output
    module: str  # the declaring module: its import closure is the stage's code
    key_inputs: Callable[[StageContext], tuple]
    run: Callable[[StageContext, Path, Path], dict]  # (ctx, out_dir, work_dir) -> manifest
    needs: Tuple[str, ...] = ()
    retries: str = "once"  # "training" (training.retries), "eval" (eval.retries) or "once" (1)
    description: str = ""

    def code_version(self) -> str:
        return code_version(self.version, self.module)

    def key(self, ctx: StageContext) -> str:
        return content_hash(self.code_version(), *self.key_inputs(ctx))

    def retries_for(self, cfg: TrainConfig) -> int:
        return {"training": cfg.training.retries, "eval": cfg.eval.retries}.get(self.retries, 1)


def code_versions(stages) -> Dict[str, str]:
    """Each stage's code version by name (what the replay key hashes)."""
    return {stage.name: stage.code_version() for stage in stages}
