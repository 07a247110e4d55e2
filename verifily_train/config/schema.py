"""The train.yaml schema: every key and default of spec §8, in one place.

This module must not import torch. Comments after each field are the documentation that
``docs/config.md`` is generated from (``verifily_train.config.docs``), so keep them one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from verifily_train.config.metricspec import names_for

TASKS = ("sft", "classification")
SCHEDULERS = ("linear", "cosine", "constant")
DEVICES = ("auto", "cuda", "mps", "cpu")
QUANTIZATIONS = ("none", "4bit", "8bit")
COMPUTE_MODES = ("local", "managed", "self_host")
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")
REPORT_TO = ("none", "tensorboard", "mlflow", "wandb")
PROMPT_FORMATS = ("auto", "chat", "template")
TRUNCATION_MODES = ("end", "middle")
UNSUPERVISED_ROWS = ("error", "drop")

# eval.metrics: the names a task accepts are its defaults; both come from the one metric table (config/metricspec.py)
KNOWN_EVAL_METRICS = {task: names_for(task) for task in TASKS}
DEFAULT_EVAL_METRICS = {task: list(names) for task, names in KNOWN_EVAL_METRICS.items()}


MANAGED_MESSAGE = ("Managed mode coming soon: nothing was sent anywhere and nothing was trained. "
                   "Use the local or self-host pool (--mode local trains on this machine).")


@dataclass(frozen=True)
class DataPathsSection:
    train: Optional[str] = None  # path to the training split (JSONL); relative to train.yaml
    val: Optional[str] = None  # path to the validation split (optional)
    test: Optional[str] = None  # path to the test split (optional; without it evaluation uses val)
    columns: Dict[str, str] = field(default_factory=dict)  # your own field names for the row fields, e.g. {instruction: question, output: answer} (docs/datasets.md); the renamed rows' content hash is the data hash


@dataclass(frozen=True)
class TrainingSection:
    num_epochs: int = 3  # passes over the training split
    batch_size: int = 8  # examples per device per step
    gradient_accumulation_steps: int = 4  # micro-batches per optimizer step
    learning_rate: float = 2.0e-4  # peak learning rate, must be > 0
    lr_scheduler: str = "cosine"  # one of: linear, cosine, constant
    warmup_ratio: float = 0.03  # fraction of total steps spent warming up, in [0, 1)
    weight_decay: float = 0.01  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping norm
    max_seq_length: int = 2048  # longer rows are truncated (and counted), never dropped; >= 8
    group_by_length: bool = False  # draw batches of similar-length rows (less padding, but a different optimisation: measured worse loss on short runs, docs/benchmarks.md)
    compile: bool = False  # torch.compile the repeated decoder block: fewer, fused kernels after a one-off compile of about a minute; pays on long GPU runs (docs/models.md)
    max_steps: int = -1  # when > 0, stop after this many optimizer steps (overrides num_epochs)
    data_order_seed: int = -1  # -1: the run's seed orders the rows; >= 0 reorders them alone (same init): order-sensitivity checks
    eval_steps: int = 500  # evaluate on val every N steps (when a val split exists)
    save_steps: int = 500  # checkpoint every N steps
    attribution_snapshots: int = 4  # trainable-weight snapshots (LoRA/head only) kept in the train stage's cache entry, evenly spaced over the run, for `verifily attribute --rows`; 0 = none
    logging_steps: int = 10  # log the loss every N steps; not hashed (cannot change the result)
    report_to: Any = "none"  # tracker(s) for the HF Trainer and the Run's results: none, tensorboard, mlflow, wandb, or a list (docs/trackers.md); not hashed
    retries: int = 0  # Prefect retries of the train stage on a transient failure; not hashed
    replicates: int = 1  # runs of this config at seeds seed, seed+1, ...: a run group that `verifily compare` tests at the seed level (docs/evaluation.md); not hashed (each run is one seed)


def trackers(training: TrainingSection) -> tuple:
    """``training.report_to`` as a tuple of tracker names; ``none`` (or an empty list) is ()."""
    value = training.report_to
    names = [value] if isinstance(value, str) else list(value or [])
    return tuple(str(name) for name in names if name != "none")


@dataclass(frozen=True)
class LoraSection:
    enabled: bool = True  # false fine-tunes every weight of the model
    r: int = 16  # LoRA rank, >= 1; higher adds capacity and memory
    alpha: int = 32  # LoRA scaling numerator; keep 2 * r unless sweeping
    dropout: float = 0.05  # dropout on the LoRA branch, in [0, 1)
    target_modules: Any = "auto"  # "auto" (PEFT's mapping for the model type, else all linear layers) or a list of module names
    quantization: str = "none"  # none, 4bit (QLoRA, NF4) or 8bit; needs the [qlora] extra (bitsandbytes)
    bnb_4bit_compute_dtype: str = "bfloat16"  # compute dtype of 4-bit layers: bfloat16, float16, float32


@dataclass(frozen=True)
class ComputeSection:
    mode: str = "local"  # local, managed (prints "Managed mode coming soon"), self_host; not hashed
    device: str = "auto"  # auto (CUDA > MPS > CPU), cuda, mps, cpu
    fp16: bool = False  # float16 mixed precision (CUDA only; else one warning and fp32)
    bf16: bool = True  # bfloat16 mixed precision where supported (CUDA, or a CPU with native bf16)
    num_processes: Any = 1  # data-parallel training processes (DDP via torchrun; nccl on cuda, gloo on cpu): 1, N, or auto (= visible CUDA GPUs, at least 1); per-device batch stays training.batch_size, so the global batch is batch_size * gradient_accumulation_steps * N (docs/scaling.md)


@dataclass(frozen=True)
class EvalSection:
    enabled: bool = True  # evaluate on the test split (else val) at the end of training
    metrics: Optional[List[str]] = None  # null = task defaults: sft [loss, perplexity, exact_match, token_f1, format_compliance]; classification [accuracy, macro_f1]
    gold_set: Optional[str] = None  # SFT: a JSONL of the SFT schema scored by exact match / token F1 (gold_* metrics); relative to train.yaml
    max_new_tokens: int = 64  # SFT: greedy generation length for exact_match / token_f1 / format_compliance
    format: str = "auto"  # SFT format compliance: auto (json when >= 90% of references parse as JSON, else off), json, none, regex:<pattern>
    bootstrap_samples: int = 1000  # resamples for the 95% confidence intervals of overall and slice metrics (0 = none)
    fdr_q: float = 0.10  # false-discovery rate (Benjamini-Hochberg, 0 < q < 1) of `verifily compare`'s stars over every slice x metric cell and of the hard-example headline over tag values; not hashed (keys the hard-examples stage)
    slice_by_tags: List[str] = field(default_factory=lambda: ["source"])  # tag keys to slice metrics by; each must exist in the dataset
    hard_examples: int = 50  # how many worst test examples to list, with their tags
    baseline: bool = True  # SFT: also evaluate the untuned base model (cached) so the summary shows the gain
    batch_size: int = 16  # examples per evaluation batch
    retries: int = 1  # Prefect retries of the evaluation stages on a transient failure; not hashed


@dataclass(frozen=True)
class PromptSection:
    format: str = "auto"  # SFT rendering: auto (chat when the tokenizer has a chat template and the model is a CausalLM, else template), chat (the tokenizer's chat template), template (the two strings below)
    system: Optional[str] = None  # chat: system prompt for rows without their own (a row's `system` field or system turn wins); null = the template's default
    truncation: str = "end"  # a row longer than training.max_seq_length: its user content is cut at the end or middle (docs/datasets.md); never the assistant header, and the answer keeps its end token
    unsupervised_rows: str = "error"  # a row left with no answer token within the window: error (names file and line) or drop (counted in the Run)
    template: str = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"  # template format: the prompt when the row has an input
    template_no_input: str = "### Instruction:\n{instruction}\n\n### Response:\n"  # template format: the prompt when input is empty or absent


@dataclass(frozen=True)
class OutputSection:
    dir: str = "runs/"  # where Run folders are written, relative to the working directory; not hashed
    save_adapter_only: bool = True  # false also saves the merged full model (safetensors) in model/
    push_to_hub: bool = False  # upload the adapter to the Hub once the run completes; not hashed
    hub_model_id: Optional[str] = None  # repository for push_to_hub, e.g. org/my-adapter; not hashed


@dataclass(frozen=True)
class CacheSection:
    enabled: bool = True  # reuse a stage's output when its content-hash key is unchanged; false recomputes everything; not hashed
    dir: Optional[str] = None  # cache folder; null = $VERIFILY_HOME/cache; not hashed


@dataclass(frozen=True)
class RuntimeSection:
    num_workers: int = 0  # dataloader worker processes
    progress: bool = True  # show progress bars


@dataclass(frozen=True)
class TrainConfig:
    task: str = MISSING  # required: sft or classification
    base_model: str = MISSING  # required: a HuggingFace Hub id or a local model folder
    dataset_version: Optional[str] = None  # a dataset reference: ds_x@v3, ds_x@latest, ds_x@sha256:..., or a manifest.json path
    data_paths: DataPathsSection = field(default_factory=DataPathsSection)  # explicit JSONL splits instead of dataset_version
    trust_remote_code: bool = False  # allow model code from the model folder/Hub repo to run
    seed: int = 42  # seeds LoRA init, data order and dropout: same seed, same adapter bytes
    training: TrainingSection = field(default_factory=TrainingSection)
    lora: LoraSection = field(default_factory=LoraSection)
    compute: ComputeSection = field(default_factory=ComputeSection)
    eval: EvalSection = field(default_factory=EvalSection)
    prompt: PromptSection = field(default_factory=PromptSection)
    output: OutputSection = field(default_factory=OutputSection)
    cache: CacheSection = field(default_factory=CacheSection)  # stage cache and crash resume (docs/caching.md)
    runtime: RuntimeSection = field(default_factory=RuntimeSection)  # settings that cannot change results; never hashed


# Runs per side that `verifily train --seeds` (no number) trains: the replicate count at which bench/aa.py
# measured the seed-level compare's power (docs/evaluation.md).
DEFAULT_REPLICATES = 5

# Keys left out of config_hash because they cannot change the trained weights or metrics.
# Dataset location keys are out too: the data's identity enters the reproducibility hash as data_hash.
UNHASHED_KEYS = (
    "dataset_version",
    "data_paths",
    "runtime",
    "cache",
    "output.dir",
    "output.push_to_hub",
    "output.hub_model_id",
    "training.logging_steps",
    "training.report_to",
    "training.retries",
    "training.replicates",
    "eval.retries",
    "eval.fdr_q",
    "compute.mode",
)
