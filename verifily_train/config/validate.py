"""Spec §8 rules 1-3 plus types and ranges of a resolved config, returned as a list of problems.

Rules 4-6 need the machine, the model and the data: ``pipeline/preflight.py`` checks those.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from verifily_train.config import schema
from verifily_train.config.parse import OVERRIDES
from verifily_train.config.schema import TrainConfig
from verifily_train.errors import ConfigError

MAX_REPLICATES = 64  # runs in one replicate group


# The fields a mapping may fill, per task (rows.SFT_FORMAT_FIELDS, plus the fields every row may hold).
COLUMN_FIELDS = {
    "sft": ("instruction", "input", "output", "messages", "prompt", "completion", "text", "system", "id", "tags"),
    "classification": ("text", "label", "id", "tags"),
}


def check_columns(columns, task: str, where: str, key: str) -> Dict[str, str]:
    """A column mapping (``data_paths.columns``, ``dataset create --columns``) as a plain ``{field: source}``
    dict; a bad one is a ``ConfigError`` naming ``key``."""
    if columns is None:
        return {}
    if not isinstance(columns, dict) and not hasattr(columns, "items"):
        raise ConfigError(where, key, f"must be a mapping of field -> your column name; got {type(columns).__name__}")
    out: Dict[str, str] = {}
    for field, source in dict(columns).items():
        if field not in COLUMN_FIELDS.get(task, ()):
            raise ConfigError(where, f"{key}.{field}", f"is not a row field of task {task} "
                                                       f"({', '.join(COLUMN_FIELDS.get(task, ()))})")
        if not isinstance(source, str) or not source.strip():
            raise ConfigError(where, f"{key}.{field}", f"must be the name of one of your columns; got {source!r}")
        out[str(field)] = source
    sources = list(out.values())
    twice = next((s for s in sources if sources.count(s) > 1), None)
    if twice is not None:
        raise ConfigError(where, key, f"column {twice!r} is mapped to two fields "
                                      f"({', '.join(f for f, s in out.items() if s == twice)})")
    return out


def validate_config(cfg: TrainConfig, where: str = "config", from_command_line: Sequence[str] = ()) -> List[ConfigError]:
    """Every value problem of ``cfg``, one per key, in schema order (empty when it is valid).

    A problem with a key in ``from_command_line`` (set by an override) names the command line instead of ``where``.
    """
    checker = _Checker(where, from_command_line)
    _check_finite(cfg, checker)
    _validate(cfg, checker)
    return checker.problems


class _Checker:
    """Collects problems: one line per key (e.g. -inf is both not finite and below the minimum)."""

    def __init__(self, where: str, from_command_line: Sequence[str]):
        self.where = where
        self.from_command_line = tuple(from_command_line)
        self.problems: List[ConfigError] = []

    def fail(self, key: str, problem: str) -> None:
        base = key.split("[", 1)[0]
        where = self.where
        if any(base == k or base.startswith(k + ".") or k.startswith(base + ".") for k in self.from_command_line):
            where = OVERRIDES  # the bad value came from KEY=VALUE, not from the file
        if not any(p.key == key for p in self.problems):
            self.problems.append(ConfigError(where, key, problem))

    def check(self, key: str, ok: bool, problem: str) -> None:
        if not ok:
            self.fail(key, problem)

    def one_of(self, key: str, value: Any, options: Sequence[str]) -> None:
        if value not in options:
            close = difflib.get_close_matches(str(value), options, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            self.fail(key, f"must be one of {', '.join(options)}; got {_short(value)}{hint}")


def check_format_setting(setting: str) -> Optional[str]:
    """A problem with an ``eval.format`` value, or None."""
    if setting in ("auto", "json", "none"):
        return None
    if setting.startswith("regex:"):
        try:
            re.compile(setting[len("regex:"):])
        except re.error as err:
            return f"invalid regular expression: {err}"
        return None
    return f"must be auto, json, none or regex:<pattern>; got {setting!r}"


def _short(value: Any, limit: int = 120) -> str:
    """``repr(value)``, cut to ``limit`` characters: an error stays one readable line whatever was given."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text):,} characters)"


def _check_finite(node: Any, c: _Checker, prefix: str = "") -> None:
    """Every float of the config is finite: inf or nan pass range checks like ``> 0`` and break JSON later."""
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            _check_finite(value, c, f"{prefix}{f.name}.")
        elif isinstance(value, float) and not math.isfinite(value):
            c.fail(prefix + f.name, f"must be a finite number; got {value}")


def _validate(cfg: TrainConfig, c: _Checker) -> None:
    c.one_of("task", cfg.task, schema.TASKS)
    has_ref = bool(cfg.dataset_version)
    has_paths = bool(cfg.data_paths.train)
    c.check("dataset_version", has_ref or has_paths,
           "either dataset_version or data_paths.train must be provided (spec §8 rule 2)")
    c.check("dataset_version", not (has_ref and has_paths),
           "give dataset_version or data_paths, not both")
    if not has_ref and (cfg.data_paths.val or cfg.data_paths.test) and not has_paths:
        c.fail("data_paths.train", "is required when data_paths.val or data_paths.test is set")
    if cfg.data_paths.columns:
        c.check("data_paths.columns", not has_ref, "applies to data_paths; a store version maps its columns when "
                                                   "it is created (verifily dataset create --columns)")
        try:
            check_columns(cfg.data_paths.columns, cfg.task, c.where, "data_paths.columns")
        except ConfigError as err:
            c.fail(err.key or "data_paths.columns", err.problem)
    c.check("base_model", bool(str(cfg.base_model).strip()), "must not be empty")
    c.check("seed", 0 <= cfg.seed < 2 ** 32, f"must be in [0, 2**32) (numpy's seed range); got {cfg.seed}")

    t = cfg.training
    c.check("training.num_epochs", t.num_epochs >= 1, f"must be >= 1; got {t.num_epochs}")
    c.check("training.batch_size", t.batch_size >= 1, f"must be >= 1; got {t.batch_size}")
    c.check("training.gradient_accumulation_steps", t.gradient_accumulation_steps >= 1,
           f"must be >= 1; got {t.gradient_accumulation_steps}")
    c.check("training.learning_rate", t.learning_rate > 0, f"must be > 0; got {t.learning_rate}")
    c.one_of("training.lr_scheduler", t.lr_scheduler, schema.SCHEDULERS)
    c.check("training.warmup_ratio", 0 <= t.warmup_ratio < 1, f"must be in [0, 1); got {t.warmup_ratio}")
    c.check("training.weight_decay", t.weight_decay >= 0, f"must be >= 0; got {t.weight_decay}")
    c.check("training.max_grad_norm", t.max_grad_norm > 0, f"must be > 0; got {t.max_grad_norm}")
    c.check("training.max_seq_length", t.max_seq_length >= 8, f"must be >= 8; got {t.max_seq_length}")
    c.check("training.max_steps", t.max_steps == -1 or t.max_steps >= 1,
           f"must be -1 (use num_epochs) or >= 1; got {t.max_steps}")
    c.check("training.data_order_seed", t.data_order_seed == -1 or 0 <= t.data_order_seed < 2 ** 32,
           f"must be -1 (the run's seed) or in [0, 2**32); got {t.data_order_seed}")
    for key in ("eval_steps", "save_steps", "logging_steps"):
        value = getattr(t, key)
        c.check(f"training.{key}", value >= 1, f"must be >= 1; got {value}")
    c.check("training.attribution_snapshots", 0 <= t.attribution_snapshots <= 64,
            f"must be in [0, 64]; got {t.attribution_snapshots}")
    if isinstance(t.report_to, str):
        c.one_of("training.report_to", t.report_to, schema.REPORT_TO)
    elif isinstance(t.report_to, (list, tuple)) and all(isinstance(name, str) for name in t.report_to):
        for index, name in enumerate(t.report_to):
            c.one_of(f"training.report_to[{index}]", name, schema.REPORT_TO)
    else:
        c.fail("training.report_to", f"must be a tracker name or a list of them; got {_short(t.report_to)}")
    c.check("training.retries", t.retries >= 0, f"must be >= 0; got {t.retries}")
    c.check("training.replicates", 1 <= t.replicates <= MAX_REPLICATES,
            f"must be in [1, {MAX_REPLICATES}]; got {t.replicates}")

    lo = cfg.lora
    c.check("lora.r", lo.r >= 1, f"must be >= 1; got {lo.r}")
    c.check("lora.alpha", lo.alpha >= 1, f"must be >= 1; got {lo.alpha}")
    c.check("lora.dropout", 0 <= lo.dropout < 1, f"must be in [0, 1); got {lo.dropout}")
    c.one_of("lora.quantization", lo.quantization, schema.QUANTIZATIONS)
    c.one_of("lora.bnb_4bit_compute_dtype", lo.bnb_4bit_compute_dtype, schema.COMPUTE_DTYPES)
    tm = lo.target_modules
    ok_modules = (isinstance(tm, str) and tm.strip() != "") or (
        isinstance(tm, list) and len(tm) > 0 and all(isinstance(m, str) and m for m in tm))
    c.check("lora.target_modules", ok_modules, f"must be \"auto\" or a non-empty list of module names; got {_short(tm)}")
    if lo.quantization != "none":
        c.check("lora.quantization", lo.enabled, f"{lo.quantization} quantization needs lora.enabled: true")
        c.check("lora.quantization", importlib.util.find_spec("bitsandbytes") is not None,
               f"{lo.quantization} needs bitsandbytes: pip install 'verifily-train[qlora]' (spec §8 rule 3)")

    cm = cfg.compute
    c.one_of("compute.mode", cm.mode, schema.COMPUTE_MODES)
    c.one_of("compute.device", cm.device, schema.DEVICES)
    c.check("compute.fp16", not (cm.fp16 and cm.bf16), "fp16 and bf16 cannot both be true")
    n = cm.num_processes
    n_ok = n == "auto" or (isinstance(n, int) and not isinstance(n, bool) and n >= 1)
    c.check("compute.num_processes", n_ok, f"must be auto or an integer >= 1; got {n!r}")
    if n_ok and n != 1:
        c.check("compute.num_processes", cm.device != "mps",
               "data-parallel training runs on cuda (nccl) or cpu (gloo), not mps; set it to 1")

    e = cfg.eval
    known = schema.KNOWN_EVAL_METRICS.get(cfg.task, ())
    for i, name in enumerate(e.metrics or []):
        c.one_of(f"eval.metrics[{i}]", name, known)
    c.check("eval.hard_examples", e.hard_examples >= 0, f"must be >= 0; got {e.hard_examples}")
    c.check("eval.max_new_tokens", e.max_new_tokens >= 1, f"must be >= 1; got {e.max_new_tokens}")
    c.check("eval.bootstrap_samples", e.bootstrap_samples >= 0, f"must be >= 0; got {e.bootstrap_samples}")
    c.check("eval.fdr_q", 0.0 < e.fdr_q < 1.0, f"must be between 0 and 1 (exclusive); got {e.fdr_q}")
    problem = check_format_setting(e.format)
    c.check("eval.format", problem is None, problem or "")
    c.check("eval.batch_size", e.batch_size >= 1, f"must be >= 1; got {e.batch_size}")
    c.check("eval.retries", e.retries >= 0, f"must be >= 0; got {e.retries}")
    for i, tag in enumerate(e.slice_by_tags):
        c.check(f"eval.slice_by_tags[{i}]", isinstance(tag, str) and tag != "", "must be a tag key name")
    if e.gold_set is not None:
        c.check("eval.gold_set", Path(e.gold_set).is_file(), f"file not found: {e.gold_set}")

    p = cfg.prompt
    c.one_of("prompt.format", p.format, schema.PROMPT_FORMATS)
    c.one_of("prompt.truncation", p.truncation, schema.TRUNCATION_MODES)
    c.one_of("prompt.unsupervised_rows", p.unsupervised_rows, schema.UNSUPERVISED_ROWS)
    c.check("prompt.system", p.system is None or isinstance(p.system, str), "must be a string or null")
    for key in ("template", "template_no_input"):
        tpl = getattr(p, key)
        problem = _template_problem(tpl)
        if problem:
            c.fail(f"prompt.{key}", f"bad template: only {{instruction}} and {{input}} may be used ({problem})")
    c.check("prompt.template", "{instruction}" in p.template, "must contain {instruction}")
    c.check("output.dir", bool(cfg.output.dir), "must not be empty")
    if cfg.output.push_to_hub:
        c.check("output.hub_model_id", bool(cfg.output.hub_model_id),
               "is required when output.push_to_hub is true (e.g. my-org/my-adapter)")
    c.check("runtime.num_workers", cfg.runtime.num_workers >= 0, "must be >= 0")


def _template_problem(tpl: str) -> str:
    """What is wrong with a prompt template, or "": every field must be exactly ``{instruction}`` or ``{input}``
    (``{instruction.text}`` raised AttributeError at the first row; ``{input:>999999999}`` would pad a row
    to a gigabyte), read by ``string.Formatter``, never by formatting."""
    import string

    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(tpl) if name is not None]
    except ValueError as err:  # a lone { or }
        return str(err)
    for name, spec, conv in fields:
        if name not in ("instruction", "input"):
            return f"{{{name}}} is not a field" if name else "an empty {} field"
        if spec or conv:
            return f"{{{name}{'!' + conv if conv else ''}{':' + spec if spec else ''}}}: no conversion or format spec"
    return ""
