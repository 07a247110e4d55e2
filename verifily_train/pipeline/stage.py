"""A pipeline stage declared in one place: its name, manual version, key inputs, run function and output type.

A stage's cache key is ``content_hash(code version, *key_inputs(ctx))``; the code version is derived from
the import closure of the module that declares the stage (``pipeline/codeversion.py``), so the key, the
code that runs and the replay record all read the same declaration. A stage reads the outputs of the stages
it ``needs`` (and only those) and returns its declared output type (``pipeline/contract.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Generic, Mapping, Optional, Tuple, Type, TypeVar

from verifily_train.config.schema import TrainConfig
from verifily_train.hashing import content_hash
from verifily_train.pipeline.codeversion import code_version
from verifily_train.pipeline.contract import Fingerprint, StageOutput

Out = TypeVar("Out", bound=StageOutput)


@dataclass(frozen=True)
class StageContext:
    """What a stage reads: the resolved config, the fingerprint and the outputs of the stages it needs."""

    cfg: TrainConfig
    fp: Fingerprint
    done: Mapping[str, StageOutput] = field(default_factory=dict)
    on_progress: Optional[Callable[[int, int], None]] = None  # optimizer steps done / total (train only)

    def __getitem__(self, stage: str) -> StageOutput:
        if stage not in self.done:
            raise KeyError(f"stage {stage!r} is not in this context: a stage reads only the stages it needs")
        return self.done[stage]


@dataclass(frozen=True)
class Stage(Generic[Out]):
    """One cached stage of the ``train`` pipeline."""

    name: str  # the cache folder and the manifest's ``stage``
    task_name: str  # the Prefect task's name (the UI's)
    version: str  # bump when the same inputs should now give different output
    module: str  # the declaring module: its import closure is the stage's code
    key_inputs: Callable[[StageContext], tuple]
    run: Callable[[StageContext, Path, Path], Out]  # (ctx, out_dir, work_dir) -> output
    output: Type[Out]  # what ``run`` returns and the cache's stage.json holds
    needs: Tuple[str, ...] = ()  # the stages whose outputs it reads (the runner checks them)
    retries: str = "once"  # "training" (training.retries), "eval" (eval.retries) or "once" (1)
    description: str = ""
    reports_progress: bool = False  # calls ``ctx.on_progress`` as it goes (the task shows a progress bar)

    def code_version(self) -> str:
        return code_version(self.version, self.module)

    def key(self, ctx: StageContext) -> str:
        return content_hash(self.code_version(), *self.key_inputs(ctx))

    def retries_for(self, cfg: TrainConfig) -> int:
        return {"training": cfg.training.retries, "eval": cfg.eval.retries}.get(self.retries, 1)

    def context(self, cfg: TrainConfig, fp: Fingerprint, done: Mapping[str, StageOutput]) -> StageContext:
        """This stage's context: the outputs it needs, every one of them present."""
        missing = [name for name in self.needs if name not in done]
        if missing:
            raise RuntimeError(f"stage {self.name} needs {', '.join(missing)}, which has not run")
        return StageContext(cfg, fp, {name: done[name] for name in self.needs})

    def produce(self, ctx: StageContext, out_dir: Path, work_dir: Path) -> Out:
        """``run``, checked to return the declared output type."""
        result = self.run(ctx, out_dir, work_dir)
        if not isinstance(result, self.output):
            raise TypeError(f"stage {self.name} returned {type(result).__name__}, not {self.output.__name__}")
        return result

    def read(self, manifest: Mapping) -> Out:
        """The output from its JSON form (stage.json, or a manifest a script holds)."""
        return manifest if isinstance(manifest, self.output) else self.output.from_json(manifest)


def code_versions(stages) -> Dict[str, str]:
    """Each stage's code version by name (what the replay key hashes)."""
    return {stage.name: stage.code_version() for stage in stages}
