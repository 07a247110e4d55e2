"""The typed stage contract: the fingerprint and each stage's output, one frozen dataclass each.

A stage returns its output type; the cache stores ``to_json()`` as ``stage.json`` and a hit reads it back with
``from_json``, which rejects a key the type does not declare (and the constructor an argument it does not
take): a new output field is a ``TypeError`` until it is declared here. Each output also says what it
contributes to the Run (``run_fragment``), so ``artifacts/record.py`` knows no stage by name.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Type, TypeVar

from verifily_train.artifacts.record import RunFragment
from verifily_train.config.hashing import config_hash
from verifily_train.config.schema import TrainConfig
from verifily_train.dataset.version import SPLITS
from verifily_train.model.device import DevicePlan
from verifily_train.model.loading import ModelSpec

GGUF_PREFIX = "gguf:sha256:"
J = TypeVar("J", bound="Json")


def gguf_identity(sha256: str) -> str:
    """A GGUF base model's identity: the file's bytes (what the Run records as ``model_identity``)."""
    return f"{GGUF_PREFIX}{sha256}"


def _optional(default: Any = None) -> Any:
    """A field a manifest may leave out: absent from ``to_json`` while it is None."""
    return field(default=default, metadata={"omit_if_none": True})


class Json:
    """``to_json``/``from_json`` for a frozen dataclass whose fields are the JSON form's keys, and no others."""

    def to_json(self) -> Dict[str, Any]:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.metadata.get("omit_if_none"):
                continue
            out[f.name] = value
        return out

    @classmethod
    def from_json(cls: Type[J], data: Mapping[str, Any]) -> J:
        declared = {f.name for f in fields(cls)}
        undeclared = sorted(set(data) - declared)
        if undeclared:
            raise TypeError(f"{cls.__name__} does not declare {', '.join(undeclared)} "
                            f"(add the field to verifily_train/pipeline/contract.py)")
        return cls(**data)


@dataclass(frozen=True, kw_only=True)
class Fingerprint(Json):
    """Every stage key's inputs read at the start of a run (built only by :meth:`of`; replay calls it too)."""

    stage: str = "fingerprint"
    dataset: Dict[str, Any]  # data_hash, ref, manifest_path, data_path
    data_hash: str
    config_hash: str
    model: Dict[str, Any]  # a ModelSpec's fields
    model_identity: str
    gguf_conversion: Optional[str]
    tokenizer_identity: Optional[str]
    device: Dict[str, Any]  # the DevicePlan's fields, with the accelerator's identity
    numeric_env: Dict[str, Any]
    # only the tokenize key reads these; replay, which never computes a key, leaves them None
    max_positions: Optional[int] = None
    chat_template_hash: Optional[str] = None

    @classmethod
    def of(cls, cfg: TrainConfig, dataset: dict, model: dict, model_identity: str, tokenizer_identity: Optional[str],
           device: dict, numeric_env: dict, gguf_conversion: Optional[str] = None,
           max_positions: Optional[int] = None, chat_template_hash: Optional[str] = None) -> "Fingerprint":
        return cls(dataset=dataset, data_hash=dataset["data_hash"], config_hash=config_hash(cfg), model=model,
                   model_identity=model_identity, gguf_conversion=gguf_conversion,
                   tokenizer_identity=tokenizer_identity, device=device, numeric_env=numeric_env,
                   max_positions=max_positions, chat_template_hash=chat_template_hash)

    @property
    def is_gguf(self) -> bool:
        return str(self.model_identity).startswith(GGUF_PREFIX)

    @property
    def model_spec(self) -> ModelSpec:
        return ModelSpec(**self.model)

    @property
    def device_plan(self) -> DevicePlan:
        """The device as a ``DevicePlan`` (the record also holds the GPU name and CUDA version)."""
        names = {f.name for f in fields(DevicePlan)}
        return DevicePlan(**{k: v for k, v in self.device.items() if k in names})

    @property
    def num_processes(self) -> int:
        return self.device.get("num_processes", 1)  # data-parallel ranks

    def max_row_tokens(self, cfg: TrainConfig) -> int:
        """``training.max_seq_length``, or the model's position limit when that is smaller (in the tokenize key)."""
        limit = self.max_positions
        return min(cfg.training.max_seq_length, limit) if limit else cfg.training.max_seq_length

    def dataset_now(self, validated: "Validated") -> dict:
        """The validated summary with this run's paths (a cache entry may come from a copy elsewhere)."""
        return dict(validated.dataset, manifest_path=self.dataset["manifest_path"], data_path=self.dataset["data_path"])

    def run_fragment(self) -> RunFragment:
        return RunFragment(
            record={"config_hash": self.config_hash, "data_hash": self.data_hash, "model_identity": self.model_identity,
                    "model_source": self.model["source"], "gguf_conversion": self.gguf_conversion},
            identity={"data_hash": self.data_hash, "model_identity": self.model_identity,
                      "tokenizer_identity": self.tokenizer_identity, "gpu_name": self.device.get("gpu_name"),
                      "cuda_version": self.device.get("cuda_version")},
            warnings=tuple(self.device["warnings"]))


@dataclass(frozen=True, kw_only=True)
class StageOutput(Json):
    """What every stage's manifest carries; the cache adds the optional fields (a run into a folder has none)."""

    STAGE: ClassVar[str] = ""
    stage: str
    key: Optional[str] = _optional()
    output_hash: Optional[str] = _optional()
    cache_hit: Optional[bool] = _optional()
    seconds: Optional[float] = _optional()
    dir: Optional[str] = _optional()  # the folder holding the stage's files
    private: Optional[str] = _optional()  # a cache-off run's private folder (deleted at the run's end)

    LAST: ClassVar[tuple] = ("cache_hit", "seconds", "dir", "private")  # added after stage.json is read back

    def __post_init__(self):
        if self.stage != self.STAGE:
            raise TypeError(f"{type(self).__name__} is the output of stage {self.STAGE!r}, not {self.stage!r}")

    def to_json(self) -> Dict[str, Any]:
        """As the cache hands a manifest back: stage.json's keys sorted, then what it adds to a read."""
        out = super().to_json()
        return {**{k: out[k] for k in sorted(out) if k not in self.LAST}, **{k: out[k] for k in self.LAST if k in out}}

    @property
    def folder(self) -> Path:
        return Path(self.dir)

    def report(self) -> dict:
        """Cache hit or not, seconds and key (run.json's ``stages`` and the summary)."""
        return {"cache_hit": bool(self.cache_hit), "seconds": self.seconds, "key": self.key}

    def run_fragment(self, fp: Fingerprint) -> RunFragment:
        """What this output contributes to the Run (files, run.json keys, metrics); nothing by default."""
        return RunFragment()

    def located(self, folder: Path) -> "StageOutput":
        return replace(self, dir=str(folder))


@dataclass(frozen=True, kw_only=True)
class Validated(StageOutput):
    STAGE: ClassVar[str] = "validate"
    dataset: Dict[str, Any]  # the DatasetVersion's summary and ref
    data_hash: str

    def run_fragment(self, fp: Fingerprint) -> RunFragment:
        return RunFragment(identity={"dataset": fp.dataset_now(self)})


@dataclass(frozen=True, kw_only=True)
class Tokenized(StageOutput):
    STAGE: ClassVar[str] = "tokenize"
    splits: Dict[str, Dict[str, Any]]  # per split: file, rows, truncated, answer_cut, dropped, tokens
    labels: List[str]
    eval_split: Optional[str]
    eval_note: Optional[str]
    truncated_rows: int
    max_seq_length: int
    prompt: Optional[Dict[str, Any]]  # the rendering: format, chat template hash, an example row
    render_check: Optional[Dict[str, Any]]
    stop_token_ids: List[int]
    warnings: List[str]

    def run_fragment(self, fp: Fingerprint) -> RunFragment:
        splits = self.splits
        return RunFragment(
            copy=self._write_data_rows,
            metrics={"truncated_rows": self.truncated_rows},
            metrics_file={"truncated_rows": self.truncated_rows,
                          "truncated_by_split": {s: v["truncated"] for s, v in splits.items()},
                          "answer_cut_by_split": {s: v.get("answer_cut", 0) for s, v in splits.items()},
                          "dropped_by_split": {s: v.get("dropped", 0) for s, v in splits.items()}},
            record={"prompt": self.prompt, "render_check": self.render_check},
            warnings=tuple(self.warnings))

    def _write_data_rows(self, run_dir: Path) -> None:
        """Per-row identity of every split (hash, id, tags): what ``compare`` diffs two dataset versions with."""
        import pandas as pd

        # in a fixed order: a manifest read back from the cache lists its splits sorted, a fresh one in build order
        order = {name: i for i, name in enumerate(SPLITS)}
        names = sorted(self.splits, key=lambda name: (order.get(name, len(order)), name))
        frames = [pd.read_parquet(self.folder / self.splits[name]["file"],
                                  columns=["split", "line", "example_id", "row_hash", "tags"]) for name in names]
        pd.concat(frames, ignore_index=True).to_parquet(run_dir / "data_rows.parquet", index=False)


@dataclass(frozen=True, kw_only=True)
class Trained(StageOutput):
    STAGE: ClassVar[str] = "train"
    resumed_from_step: Optional[int]
    adapter_dir: str
    merged_dir: Optional[str]
    full_finetune: bool
    log: str
    device: str
    precision: str
    train_loss: Optional[float]
    global_step: int
    epochs: float
    train_tokens: int
    train_seconds: float
    train_cpu_seconds: float
    tokens_per_second: Optional[float]
    trainable_params: int
    total_params: int
    threads: int
    num_processes: int
    # the speed levers as resolved for this run (training/speed)
    label_only_head: Any
    frozen_linears_in_compute_dtype: Any
    fp32_attention: Any
    cheap_dropout_layers: Any
    fused_lora_output_layers: Any
    compiled_blocks: Any
    label_rows_last_layers: Any
    packed_rows: Any
    packed_row_counts: Any
    dead_tails_cut: Any
    lean_steps: Any
    padding_fraction: Any

    SUMMARY: ClassVar[tuple] = ("train_loss", "global_step", "epochs", "train_tokens", "train_seconds",
                                "tokens_per_second", "trainable_params", "total_params", "resumed_from_step")

    def run_fragment(self, fp: Fingerprint) -> RunFragment:
        return RunFragment(
            copy=self._copy_weights,
            identity={"device": self.device, "precision": self.precision, "threads": self.threads},
            metrics={"train_loss": self.train_loss, "train_steps": self.global_step, "train_tokens": self.train_tokens,
                     "train_tokens_per_second": self.tokens_per_second},
            metrics_file={"train": {k: getattr(self, k) for k in self.SUMMARY},
                          "num_processes": self.num_processes},
            record={"precision": self.precision})

    def _copy_weights(self, run_dir: Path) -> None:
        shutil.copytree(self.folder / self.adapter_dir, run_dir / self.adapter_dir)
        if self.merged_dir:
            shutil.copytree(self.folder / self.merged_dir, run_dir / "model")
        shutil.copyfile(self.folder / self.log, run_dir / "trainer_log.jsonl")


@dataclass(frozen=True, kw_only=True)
class Evaluated(StageOutput):
    STAGE: ClassVar[str] = "evaluate"
    skipped: bool
    note: Optional[str]
    split: Optional[str]
    metrics: Dict[str, Any]
    predictions: Optional[str] = _optional()  # absent when skipped
    format: Optional[str] = _optional()  # generation metrics: the answer format scored
    gold: Optional[Dict[str, Any]] = _optional()  # eval.gold_set's metrics
    classification_report: Optional[Dict[str, Any]] = _optional()

    def read_predictions(self):
        """The per-example predictions as a DataFrame."""
        import pandas as pd

        return pd.read_parquet(self.folder / self.predictions)

    def run_fragment(self, fp: Fingerprint) -> RunFragment:
        return RunFragment(
            copy=None if self.skipped else self._copy_predictions,
            metrics=self.metrics,
            metrics_file={"eval": self.metrics, "eval_split": self.split, "eval_note": self.note,
                          "classification_report": self.classification_report, "format": self.format},
            record={"evaluation": {"split": self.split, "skipped": self.skipped, "note": self.note}})

    def _copy_predictions(self, run_dir: Path) -> None:
        shutil.copyfile(self.folder / self.predictions, run_dir / "predictions.parquet")


@dataclass(frozen=True, kw_only=True)
class Baseline(Evaluated):
    """The untuned base model's scores (evaluate's prediction path without the adapter)."""

    STAGE: ClassVar[str] = "baseline"
    quantization: Optional[str] = _optional()  # how the base was loaded; absent when skipped

    def run_fragment(self, fp: Fingerprint) -> RunFragment:
        return RunFragment(
            metrics={f"baseline_{name}": value for name, value in self.metrics.items()
                     if name in ("loss", "perplexity")},
            metrics_file={"baseline": self.metrics, "baseline_note": self.note},
            record={"baseline_quantization": None if self.skipped else (self.quantization or "none")})


@dataclass(frozen=True, kw_only=True)
class Sliced(StageOutput):
    STAGE: ClassVar[str] = "slice"
    slices: Dict[str, Any]
    note: Optional[str]
    file: str
    overall: Optional[Dict[str, Any]] = _optional()  # absent when evaluation was skipped
    bootstrap: Optional[Dict[str, Any]] = _optional()
    low_confidence_n: Optional[int] = _optional()

    def run_fragment(self, fp: Fingerprint) -> RunFragment:
        return RunFragment(copy=self._copy, metrics_file={"eval_ci95": (self.overall or {}).get("ci95", {}),
                                                          "bootstrap": self.bootstrap})

    def _copy(self, run_dir: Path) -> None:
        shutil.copyfile(self.folder / self.file, run_dir / "slices.json")


@dataclass(frozen=True, kw_only=True)
class HardExamples(StageOutput):
    STAGE: ClassVar[str] = "hard_examples"
    file: str
    count: int
    headline: Optional[str]
    lift: Dict[str, Any]

    def run_fragment(self, fp: Fingerprint) -> RunFragment:
        return RunFragment(copy=self._copy, metrics_file={"hard_example_lift": self.lift},
                           record={"hard_examples_headline": self.headline})

    def _copy(self, run_dir: Path) -> None:
        shutil.copyfile(self.folder / self.file, run_dir / "hard_examples.jsonl")
