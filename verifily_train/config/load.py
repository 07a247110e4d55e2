"""train.yaml plus dotted overrides, parsed and merged once into a frozen ``TrainConfig`` and its problems."""

from __future__ import annotations

import dataclasses
import difflib
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from verifily_train.config import schema
from verifily_train.config.parse import OVERRIDES, check_text, parse_overrides, read_yaml
from verifily_train.config.schema import TrainConfig
from verifily_train.config.validate import validate_config
from verifily_train.errors import ConfigError

INLINE = "config (inline)"
ConfigSource = Optional[Union[os.PathLike, str, Dict[str, Any]]]


def load_with_problems(path: ConfigSource, overrides: Sequence[str] = (),
                       dataset: Optional[str] = None) -> Tuple[TrainConfig, List[ConfigError]]:
    """Read, merge and resolve a config once; returns it with every value problem (empty: valid).

    ``path`` is a train.yaml path, or the config itself as a mapping (a deployment's inline ``config``
    parameter, or the resolved config the CLI hands the flow; its relative paths resolve against the working
    directory). Syntax errors, unknown keys and wrong types raise ``ConfigError``: without them there is no
    config to check further.
    """
    base = OmegaConf.structured(TrainConfig)
    inline = isinstance(path, dict)
    if inline:
        _check_keys(path, TrainConfig, INLINE)
        base = _merge(base, path, INLINE)
        path = None
    base_dir = Path.cwd()
    if path is not None:
        path = Path(path)
        file_values = read_yaml(path)
        check_text(file_values, str(path))
        _check_keys(file_values, TrainConfig, str(path))
        base = _merge(base, file_values, str(path))
        base_dir = path.resolve().parent
    override_values = parse_overrides(overrides)
    if dataset is not None:
        override_values["dataset_version"] = dataset
    check_text(override_values, OVERRIDES)
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
    return cfg, validate_config(cfg, where, from_command_line=_dotted_keys(override_values))


def load_config(path: ConfigSource, overrides: Sequence[str] = (), dataset: Optional[str] = None,
                collect: Optional[List[ConfigError]] = None) -> TrainConfig:
    """:func:`load_with_problems`, raising the first value problem; with ``collect``, they are appended to it."""
    cfg, problems = load_with_problems(path, overrides, dataset)
    if collect is not None:
        collect.extend(problems)
    elif problems:
        raise problems[0]
    return cfg


def from_resolved(data: Mapping[str, Any]) -> TrainConfig:
    """The ``TrainConfig`` that ``config_to_dict`` made ``data`` from, rebuilt field by field: neither parsed nor
    validated again (that happened once, where it was resolved). What the ``train`` flow and each DDP rank get."""
    return _rebuild(TrainConfig, data)


def _rebuild(cls: type, data: Mapping[str, Any]):
    names = {f.name for f in dataclasses.fields(cls)}
    if set(data) != names:  # not config_to_dict's output: a bug in the caller, not a user's config problem
        raise TypeError(f"not a resolved {cls.__name__}: keys {sorted(set(data) ^ names)} differ from the schema")
    values = {}
    for name, value in data.items():
        sub = section_type(cls, name)
        values[name] = _rebuild(sub, value) if sub is not None else value
    return cls(**values)


def section_type(cls: type, name: str) -> Optional[type]:
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
        sub = section_type(cls, f.name)
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
        sub = section_type(cls, key)
        if sub is not None:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(where, dotted, f"must be a mapping of {sub.__name__} keys, got {value!r}")
            _check_keys(value, sub, where, dotted + ".")


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
