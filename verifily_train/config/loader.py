"""Load train.yaml plus dotted overrides into a validated, frozen ``TrainConfig``."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib.util
import math
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from verifily_train.config import schema
from verifily_train.config.schema import TrainConfig
from verifily_train.errors import ConfigError
from verifily_train.hashing import canonical_json

OVERRIDES = "command line"


def _section_type(cls: type, name: str) -> Optional[type]:
    """The dataclass type of field ``name`` of ``cls`` when it is a nested section."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
            return type(default) if dataclasses.is_dataclass(default) else None
    return None


def known_keys(cls: type = TrainConfig, prefix: str = "") -> List[str]:
    """Every dotted key of the schema, sections included."""
    keys = []
    for f in dataclasses.fields(cls):
        dotted = prefix + f.name
        keys.append(dotted)
        sub = _section_type(cls, f.name)
        if sub is not None:
            keys.extend(known_keys(sub, dotted + "."))
    return keys


def _check_keys(values: Dict[str, Any], cls: type, where: str, prefix: str = "") -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in values.items():
        dotted = prefix + str(key)
        if key not in names:
            close = difflib.get_close_matches(dotted, known_keys(), n=1, cutoff=0.6)
            if not close:
                close = difflib.get_close_matches(str(key), sorted(names), n=1, cutoff=0.5)
                close = [prefix + c for c in close]
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(where, dotted, f"unknown key{hint}")
        sub = _section_type(cls, key)
        if sub is not None:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(where, dotted, f"must be a mapping of {sub.__name__} keys, got {value!r}")
            _check_keys(value, sub, where, dotted + ".")


# Values (scalars and collections) a YAML document may hold once its aliases are expanded: a train.yaml has a
# few hundred; a 640-byte alias bomb expands to millions and would be built in full by OmegaConf.
MAX_YAML_VALUES = 10_000


class YamlTooLarge(ValueError):
    """The document's aliases expand past ``MAX_YAML_VALUES`` values (or refer to themselves)."""


def _expanded_size(root) -> int:
    """How many values the node graph holds with every alias expanded, counted without expanding it."""
    sizes: Dict[int, Optional[int]] = {}

    def size(node) -> int:
        known = sizes.get(id(node), -1)
        if known is None:
            raise YamlTooLarge("an alias refers to itself")
        if known >= 0:
            return known
        sizes[id(node)] = None  # in progress: meeting it again means a cycle
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        if total > MAX_YAML_VALUES:
            raise YamlTooLarge(f"its aliases expand to more than {MAX_YAML_VALUES:,} values")
        sizes[id(node)] = total
        return total

    return size(root)


def safe_yaml(text: str) -> Any:
    """``yaml.safe_load``, but a document whose aliases expand past ``MAX_YAML_VALUES`` values is refused
    (``YamlTooLarge``) before any of it is built."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_yaml(path: Path) -> Dict[str, Any]:
    """Parse a YAML mapping, turning syntax errors into one line that names file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(path, None, "file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(path, None, f"cannot read: {err}") from err
    try:
        data = safe_yaml(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f"line {mark.line + 1}" if mark is not None else None
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(path, line, f"YAML syntax error: {problem}") from err
    except YamlTooLarge as err:
        raise ConfigError(path, None, f"refused: {err} (YAML anchors and aliases are limited)") from None
    except RecursionError:
        raise ConfigError(path, None, "YAML nested too deeply") from None
    except ValueError as err:  # a number too long for Python's int parser
        raise ConfigError(path, None, f"bad value: {str(err).split(';')[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(path, None, f"must be a YAML mapping of keys, got {type(data).__name__}")
    return data


def parse_overrides(overrides: Iterable[str]) -> Dict[str, Any]:
    """``training.num_epochs=1 lora.r=8`` into a nested dict; values are parsed as YAML scalars."""
    nested: Dict[str, Any] = {}
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(OVERRIDES, item, "an override must look like key=value, e.g. training.num_epochs=1")
        key, raw = item.split("=", 1)
        try:
            value = safe_yaml(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        except YamlTooLarge as err:
            raise ConfigError(OVERRIDES, key, f"refused: {err} (YAML anchors and aliases are limited)") from None
        except RecursionError:
            raise ConfigError(OVERRIDES, key, "value nested too deeply") from None
        except ValueError as err:  # a number too long for Python's int parser
            raise ConfigError(OVERRIDES, key, f"bad value: {str(err).split(';')[0]}") from None
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(OVERRIDES, key, "conflicts with an earlier override of its parent key")
        node[parts[-1]] = value
    return nested


def _merge(base, values: Dict[str, Any], where: str):
    try:
        return OmegaConf.merge(base, values)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or None
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(where, key, msg) from None


def _resolve_path(value: Optional[str], base_dir: Path) -> Optional[str]:
    if value is None or value == "":
        return value
    p = Path(os.path.expanduser(value))
    return str(p if p.is_absolute() else (base_dir / p).resolve())


def _looks_like_path(ref: str) -> bool:
    return ref.endswith(".json") or os.sep in ref and "@" not in ref


INLINE = "config (inline)"


def load_config(
    path: Optional[os.PathLike | str | Dict[str, Any]],
    overrides: Sequence[str] = (),
    dataset: Optional[str] = None,
    collect: Optional[List[ConfigError]] = None,
) -> TrainConfig:
    """Read, merge, resolve and validate a config. Raises ``ConfigError`` naming file and key.

    ``path`` is a train.yaml path, or the config itself as a mapping (a deployment's inline ``config``
    parameter; its relative paths resolve against the working directory).

    With ``collect``, value problems are appended to it instead (syntax, unknown keys and types still
    raise: without them there is no config to check further).
    """
    base = OmegaConf.structured(TrainConfig)
    if isinstance(path, dict):
        _check_keys(path, TrainConfig, INLINE)
        base = _merge(base, path, INLINE)
        base_dir = Path.cwd()
        path = None
        inline = True
    else:
        inline = False
    if path is not None:
        path = Path(path)
        file_values = read_yaml(path)
        _check_text(file_values, str(path))
        _check_keys(file_values, TrainConfig, str(path))
        base = _merge(base, file_values, str(path))
        base_dir = path.resolve().parent
    elif not inline:
        base_dir = Path.cwd()
    override_values = parse_overrides(overrides)
    if dataset is not None:
        override_values["dataset_version"] = dataset
    _check_text(override_values, OVERRIDES)
    _check_keys(override_values, TrainConfig, OVERRIDES)
    merged = _merge(base, override_values, OVERRIDES)
    where = str(path) if path is not None else INLINE if inline else OVERRIDES
    for key in ("task", "base_model"):
        if OmegaConf.is_missing(merged, key):
            raise ConfigError(where, key, "is required (spec §8)")
    try:
        cfg: TrainConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(where, getattr(err, "full_key", None), str(err).splitlines()[0]) from None
    cfg = _resolve(cfg, base_dir)
    validate_config(cfg, where, collect, from_command_line=_dotted_keys(override_values))
    return cfg


def _check_text(values: Dict[str, Any], where: str) -> None:
    """No string holds a lone surrogate: a YAML ``"\\ud800"`` escape, or bytes of an argument that are not UTF-8
    (Python passes them on as surrogates); printing or hashing the config would fail on it later."""
    from verifily_train.jsonsafe import lone_surrogate

    key = lone_surrogate(values)
    if key is not None:
        raise ConfigError(where, key or None, "not valid Unicode text (a lone surrogate, or bytes that are not UTF-8)")


def _dotted_keys(values: Dict[str, Any], prefix: str = "") -> List[str]:
    """Every leaf key of a nested override dict, dotted (what a problem's key is matched against)."""
    keys: List[str] = []
    for key, value in values.items():
        dotted = prefix + str(key)
        keys.extend(_dotted_keys(value, dotted + ".") if isinstance(value, dict) and value else [dotted])
    return keys


def _resolve(cfg: TrainConfig, base_dir: Path) -> TrainConfig:
    """Fill task-dependent defaults and make relative data paths absolute (relative to train.yaml)."""
    paths = cfg.data_paths
    data_paths = dataclasses.replace(
        paths,
        train=_resolve_path(paths.train, base_dir),
        val=_resolve_path(paths.val, base_dir),
        test=_resolve_path(paths.test, base_dir),
    )
    ref = cfg.dataset_version
    if ref and _looks_like_path(ref):
        ref = _resolve_path(ref, base_dir)
    ev = cfg.eval
    metrics = list(ev.metrics) if ev.metrics else list(schema.DEFAULT_EVAL_METRICS.get(cfg.task, []))
    gold = _resolve_path(ev.gold_set, base_dir)
    ev = dataclasses.replace(ev, metrics=metrics, gold_set=gold, slice_by_tags=list(ev.slice_by_tags or []))
    return dataclasses.replace(cfg, data_paths=data_paths, dataset_version=ref, eval=ev)


_SINK: Optional[List[ConfigError]] = None  # set while validate_config collects every problem
_FROM_COMMAND_LINE: Sequence[str] = ()  # dotted keys an override set: their problems name the command line


def _fail(where: str, key: str, problem: str) -> None:
    base = key.split("[", 1)[0]
    if any(base == k or base.startswith(k + ".") or k.startswith(base + ".") for k in _FROM_COMMAND_LINE):
        where = OVERRIDES  # the bad value came from KEY=VALUE, not from the file
    error = ConfigError(where, key, problem)
    if _SINK is None:
        raise error
    if any(p.key == key for p in _SINK):
        return  # one line per key: e.g. -inf is both not finite and below the minimum
    _SINK.append(error)


def _one_of(where: str, key: str, value: Any, options: Sequence[str]) -> None:
    if value not in options:
        close = difflib.get_close_matches(str(value), options, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        _fail(where, key, f"must be one of {', '.join(options)}; got {_short(value)}{hint}")


def _short(value: Any, limit: int = 120) -> str:
    """``repr(value)``, cut to ``limit`` characters: an error stays one readable line whatever was given."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text):,} characters)"


def _check(where: str, key: str, ok: bool, problem: str) -> None:
    if not ok:
        _fail(where, key, problem)


def validate_config(cfg: TrainConfig, where: str = "config", collect: Optional[List[ConfigError]] = None,
                    from_command_line: Sequence[str] = ()) -> None:
    """Spec §8 rules 1-3 plus types and ranges (rules 4-6 need the machine, model and data; see preflight).

    Raises the first problem, or, with ``collect``, appends every problem to it. A problem with a key in
    ``from_command_line`` (set by an override) names the command line instead of ``where``.
    """
    global _SINK, _FROM_COMMAND_LINE
    _SINK, _FROM_COMMAND_LINE = collect, tuple(from_command_line)
    try:
        _check_finite(cfg, where)
        _validate(cfg, where)
    finally:
        _SINK, _FROM_COMMAND_LINE = None, ()


def _check_finite(node: Any, where: str, prefix: str = "") -> None:
    """Every float of the config is finite: inf or nan pass range checks like ``> 0`` and break JSON later."""
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            _check_finite(value, where, f"{prefix}{f.name}.")
        elif isinstance(value, float) and not math.isfinite(value):
            _fail(where, prefix + f.name, f"must be a finite number; got {value}")



def _validate(cfg: TrainConfig, where: str) -> None:
    _one_of(where, "task", cfg.task, schema.TASKS)
    has_ref = bool(cfg.dataset_version)
    has_paths = bool(cfg.data_paths.train)
    _check(where, "dataset_version", has_ref or has_paths,
           "either dataset_version or data_paths.train must be provided (spec §8 rule 2)")
    _check(where, "dataset_version", not (has_ref and has_paths),
           "give dataset_version or data_paths, not both")
    if not has_ref and (cfg.data_paths.val or cfg.data_paths.test) and not has_paths:
        _fail(where, "data_paths.train", "is required when data_paths.val or data_paths.test is set")
    _check(where, "base_model", bool(str(cfg.base_model).strip()), "must not be empty")
    _check(where, "seed", 0 <= cfg.seed < 2 ** 32, f"must be in [0, 2**32) (numpy's seed range); got {cfg.seed}")

    t = cfg.training
    _check(where, "training.num_epochs", t.num_epochs >= 1, f"must be >= 1; got {t.num_epochs}")
    _check(where, "training.batch_size", t.batch_size >= 1, f"must be >= 1; got {t.batch_size}")
    _check(where, "training.gradient_accumulation_steps", t.gradient_accumulation_steps >= 1,
           f"must be >= 1; got {t.gradient_accumulation_steps}")
    _check(where, "training.learning_rate", t.learning_rate > 0, f"must be > 0; got {t.learning_rate}")
    _one_of(where, "training.lr_scheduler", t.lr_scheduler, schema.SCHEDULERS)
    _check(where, "training.warmup_ratio", 0 <= t.warmup_ratio < 1, f"must be in [0, 1); got {t.warmup_ratio}")
    _check(where, "training.weight_decay", t.weight_decay >= 0, f"must be >= 0; got {t.weight_decay}")
    _check(where, "training.max_grad_norm", t.max_grad_norm > 0, f"must be > 0; got {t.max_grad_norm}")
    _check(where, "training.max_seq_length", t.max_seq_length >= 8, f"must be >= 8; got {t.max_seq_length}")
    _check(where, "training.max_steps", t.max_steps == -1 or t.max_steps >= 1,
           f"must be -1 (use num_epochs) or >= 1; got {t.max_steps}")
    _check(where, "training.data_order_seed", t.data_order_seed == -1 or 0 <= t.data_order_seed < 2 ** 32,
           f"must be -1 (the run's seed) or in [0, 2**32); got {t.data_order_seed}")
    for key in ("eval_steps", "save_steps", "logging_steps"):
        value = getattr(t, key)
        _check(where, f"training.{key}", value >= 1, f"must be >= 1; got {value}")
    _check(where, "training.attribution_snapshots", 0 <= t.attribution_snapshots <= 64,
           f"must be in [0, 64]; got {t.attribution_snapshots}")
    _one_of(where, "training.report_to", t.report_to, schema.REPORT_TO)
    _check(where, "training.retries", t.retries >= 0, f"must be >= 0; got {t.retries}")

    lo = cfg.lora
    _check(where, "lora.r", lo.r >= 1, f"must be >= 1; got {lo.r}")
    _check(where, "lora.alpha", lo.alpha >= 1, f"must be >= 1; got {lo.alpha}")
    _check(where, "lora.dropout", 0 <= lo.dropout < 1, f"must be in [0, 1); got {lo.dropout}")
    _one_of(where, "lora.quantization", lo.quantization, schema.QUANTIZATIONS)
    _one_of(where, "lora.bnb_4bit_compute_dtype", lo.bnb_4bit_compute_dtype, schema.COMPUTE_DTYPES)
    tm = lo.target_modules
    ok_modules = (isinstance(tm, str) and tm.strip() != "") or (
        isinstance(tm, list) and len(tm) > 0 and all(isinstance(m, str) and m for m in tm))
    _check(where, "lora.target_modules", ok_modules, f"must be \"auto\" or a non-empty list of module names; got {_short(tm)}")
    if lo.quantization != "none":
        _check(where, "lora.quantization", lo.enabled, f"{lo.quantization} quantization needs lora.enabled: true")
        _check(where, "lora.quantization", importlib.util.find_spec("bitsandbytes") is not None,
               f"{lo.quantization} needs bitsandbytes: pip install 'verifily-train[qlora]' (spec §8 rule 3)")

    c = cfg.compute
    _one_of(where, "compute.mode", c.mode, schema.COMPUTE_MODES)
    _one_of(where, "compute.device", c.device, schema.DEVICES)
    _check(where, "compute.fp16", not (c.fp16 and c.bf16), "fp16 and bf16 cannot both be true")
    n = c.num_processes
    n_ok = n == "auto" or (isinstance(n, int) and not isinstance(n, bool) and n >= 1)
    _check(where, "compute.num_processes", n_ok, f"must be auto or an integer >= 1; got {n!r}")
    if n_ok and n != 1:
        _check(where, "compute.num_processes", c.device != "mps",
               "data-parallel training runs on cuda (nccl) or cpu (gloo), not mps; set it to 1")

    e = cfg.eval
    known = schema.KNOWN_EVAL_METRICS.get(cfg.task, ())
    for i, name in enumerate(e.metrics or []):
        _one_of(where, f"eval.metrics[{i}]", name, known)
    _check(where, "eval.hard_examples", e.hard_examples >= 0, f"must be >= 0; got {e.hard_examples}")
    _check(where, "eval.max_new_tokens", e.max_new_tokens >= 1, f"must be >= 1; got {e.max_new_tokens}")
    _check(where, "eval.bootstrap_samples", e.bootstrap_samples >= 0, f"must be >= 0; got {e.bootstrap_samples}")
    _check(where, "eval.fdr_q", 0.0 < e.fdr_q < 1.0, f"must be between 0 and 1 (exclusive); got {e.fdr_q}")
    from verifily_train.evaluation.text_metrics import check_format_setting

    problem = check_format_setting(e.format)
    _check(where, "eval.format", problem is None, problem or "")
    _check(where, "eval.batch_size", e.batch_size >= 1, f"must be >= 1; got {e.batch_size}")
    _check(where, "eval.retries", e.retries >= 0, f"must be >= 0; got {e.retries}")
    for i, tag in enumerate(e.slice_by_tags):
        _check(where, f"eval.slice_by_tags[{i}]", isinstance(tag, str) and tag != "", "must be a tag key name")
    if e.gold_set is not None:
        _check(where, "eval.gold_set", Path(e.gold_set).is_file(), f"file not found: {e.gold_set}")

    p = cfg.prompt
    _one_of(where, "prompt.format", p.format, schema.PROMPT_FORMATS)
    _one_of(where, "prompt.truncation", p.truncation, schema.TRUNCATION_MODES)
    _one_of(where, "prompt.unsupervised_rows", p.unsupervised_rows, schema.UNSUPERVISED_ROWS)
    _check(where, "prompt.system", p.system is None or isinstance(p.system, str), "must be a string or null")
    for key in ("template", "template_no_input"):
        tpl = getattr(p, key)
        try:
            tpl.format(instruction="", input="")
        except (KeyError, IndexError, ValueError) as err:
            _fail(where, f"prompt.{key}", f"bad template: only {{instruction}} and {{input}} may be used ({err})")
    _check(where, "prompt.template", "{instruction}" in p.template, "must contain {instruction}")
    _check(where, "output.dir", bool(cfg.output.dir), "must not be empty")
    if cfg.output.push_to_hub:
        _check(where, "output.hub_model_id", bool(cfg.output.hub_model_id),
               "is required when output.push_to_hub is true (e.g. my-org/my-adapter)")
    _check(where, "runtime.num_workers", cfg.runtime.num_workers >= 0, "must be >= 0")


def config_to_dict(cfg: TrainConfig) -> Dict[str, Any]:
    """The resolved config as plain data (what config.yaml in a Run holds)."""
    return dataclasses.asdict(cfg)


def hashed_view(cfg: TrainConfig) -> Dict[str, Any]:
    """The resolved config minus the keys that cannot change results (``schema.UNHASHED_KEYS``)."""
    data = config_to_dict(cfg)
    for dotted in schema.UNHASHED_KEYS:
        node = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node[part]
        node.pop(parts[-1], None)
    return data


def hashed_section(cfg: TrainConfig, name: str) -> Any:
    """One section (or top-level key) of the hashed view: what a stage's cache key reads from the config."""
    return hashed_view(cfg).get(name)


def config_hash(cfg: TrainConfig) -> str:
    """SHA-256 of the normalized, resolved config: key order, comments and number spelling don't matter."""
    return hashlib.sha256(canonical_json(hashed_view(cfg)).encode("utf-8")).hexdigest()


def config_to_yaml(cfg: TrainConfig) -> str:
    """Readable YAML of the resolved config, in schema order."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True, width=120)
