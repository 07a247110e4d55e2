"""Preflight: every problem that can be found before a model is loaded, reported at once.

Config values, dataset (hashes, every row, labels across splits, slice tags), model reference and kind
(its config only), device, optional extras, Hub credentials and the runs folder. Nothing here imports
Prefect; torch and transformers are imported only for the device and the model's config.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Sequence
from urllib.parse import urlparse

from verifily_train.artifacts.hub import check_push_to_hub
from verifily_train.config.schema import TrainConfig, trackers
from verifily_train.dataset.manifest import check_slice_tags
from verifily_train.dataset.rows import iter_jsonl, validate_row
from verifily_train.dataset.store import load_for_config
from verifily_train.errors import ConfigError, DataError, EnvironmentProblem, ModelError, PreflightError, VerifilyError
from verifily_train.fsio import check_writable_folder
from verifily_train.model.device import resolve_device
from verifily_train.model.loading import check_model_reference, check_weights, inspect_model
from verifily_train.model.quantization import quantization_config
from verifily_train.model.registry import is_gguf, resolve_alias
from verifily_train.pipeline.cache import cache_root
from verifily_train.training.compiled import check_compile_support


def _attempt(problems: List[VerifilyError], check: Callable[[], None]) -> bool:
    try:
        check()
        return True
    except VerifilyError as err:
        problems.append(err)
        return False


def _check_runs_dir(output_dir: str) -> None:
    check_writable_folder(output_dir, "output.dir")


def _check_gold_set(cfg) -> None:
    """``eval.gold_set``'s rows, before training: a malformed or empty gold set used to fail (or write NaN)
    only once the model was trained."""
    gold = cfg.eval.gold_set
    if not gold or cfg.task != "sft" or not cfg.eval.enabled or not Path(gold).is_file():
        return  # a missing file is the config's own problem (eval.gold_set: file not found)
    rows = 0
    for lineno, row in iter_jsonl(Path(gold), gold):
        validate_row(row, "sft", {}, {}, f"{gold}:{lineno}")
        rows += 1
    if rows == 0:
        raise DataError(gold, "eval.gold_set", "has no rows: give a JSONL file of SFT rows, or remove eval.gold_set")


# the trackers training.report_to can name, and the packages the HF Trainer needs for each (any one will do)
REPORT_TO_PACKAGES = {"wandb": ("wandb",), "tensorboard": ("tensorboard", "tensorboardX"), "mlflow": ("mlflow",)}


def _check_report_to(cfg) -> None:
    """The tracker ``training.report_to`` names is installed (the Trainer would fail at its first log, after
    the model loaded)."""
    for tracker in trackers(cfg.training):
        needs = REPORT_TO_PACKAGES.get(tracker, ())
        if needs and not any(importlib.util.find_spec(name) for name in needs):
            raise EnvironmentProblem(None, "training.report_to", f"{tracker} needs the {needs[0]} package: "
                                                                 f"pip install {needs[0]} (or set training.report_to: none)")


HUB_UNREACHABLE = "the Hub is unreachable: only the local Hub cache was tried"


@dataclass(frozen=True)
class CheapChecks:
    """What the cheap checks learned that later steps need: ``hub_unreachable``, the model is a Hub id and the Hub
    cannot be reached, so the caller sets ``HF_HUB_OFFLINE`` (cli/train.py) and the model loads from the local
    Hub cache at once instead of after ~30 s of retries."""

    hub_unreachable: bool = False


_FOUND_UNREACHABLE = False  # a probe in this process found the Hub unreachable (its memo, carrying nothing else)


def hub_is_unreachable(timeout: float = 3.0) -> bool:
    """The Hub cannot be reached (no network) while HF_HUB_OFFLINE is not set. False behind a proxy (a direct
    connection says nothing then) and once huggingface_hub is imported (it has read HF_HUB_OFFLINE already).

    Once True, True for the rest of the process: the caller then set HF_HUB_OFFLINE, which a later probe would
    read as the user's choice (and drop "the Hub is unreachable" from a second ``vt.train``'s model error)."""
    global _FOUND_UNREACHABLE
    if _FOUND_UNREACHABLE:
        return True
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false", "no"):
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")) \
            or "huggingface_hub" in sys.modules:
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((endpoint.hostname or "huggingface.co", endpoint.port or 443), timeout).close()
        return False
    except OSError:
        _FOUND_UNREACHABLE = True
        return True


def _check_cache_dir(cfg) -> None:
    """The stage cache (``cache.dir``, else ``$VERIFILY_HOME/cache``) must be writable: even with the cache
    off, stages compute in private folders under it."""
    key = "cache.dir" if cfg.cache.dir else "VERIFILY_HOME"
    try:
        root = cache_root(cfg.cache.dir)
    except (OSError, ValueError) as err:
        raise VerifilyError(None, key, f"not a usable path ({err})") from None
    check_writable_folder(root, key)


def cheap_checks(cfg: TrainConfig, config_problems: Sequence[VerifilyError] = ()) -> CheapChecks:
    """Config values (``config_problems``: what ``config.load_with_problems`` returned with ``cfg``), dataset,
    slice tags, model reference, credentials and output folder, all at once, without importing torch or
    transformers."""
    problems: List[VerifilyError] = list(config_problems)
    offline = False
    bad_keys = {p.key for p in problems if isinstance(p, ConfigError)}

    def dataset_check() -> None:
        dv = load_for_config(cfg.dataset_version, cfg.data_paths, cfg.task)
        if cfg.eval.enabled and not any(k and k.startswith("eval.slice_by_tags") for k in bad_keys):
            check_slice_tags(dv, cfg.eval.slice_by_tags)

    if not bad_keys & {"task", "dataset_version", "data_paths.train"}:
        _attempt(problems, dataset_check)

    def model_reference_check() -> None:
        nonlocal offline
        base = resolve_alias(cfg.base_model)
        if is_gguf(base):
            if not Path(os.path.expanduser(base)).is_file():
                raise ModelError(cfg.base_model, "base_model", "GGUF file not found")
            if importlib.util.find_spec("gguf") is None:
                raise ModelError(base, "base_model", "reading GGUF checkpoints needs the gguf package: pip install gguf")
            return
        check_model_reference(base)
        if not Path(os.path.expanduser(base)).exists():
            offline = hub_is_unreachable()

    if "task" not in bad_keys and "base_model" not in bad_keys:
        _attempt(problems, model_reference_check)

    def hub_check() -> None:
        check_push_to_hub(cfg, hub_offline=offline)

    _attempt(problems, hub_check)
    _attempt(problems, lambda: _check_gold_set(cfg))
    _attempt(problems, lambda: _check_report_to(cfg))
    _attempt(problems, lambda: _check_runs_dir(cfg.output.dir))
    _attempt(problems, lambda: _check_cache_dir(cfg))
    if problems:  # cheap checks failed: report them now, before torch and transformers are imported
        raise problems[0] if len(problems) == 1 else PreflightError(problems)
    return CheapChecks(hub_unreachable=offline)


def model_and_device_checks(cfg: TrainConfig, hub_unreachable: bool = False) -> None:
    """The model's kind (its config: imports transformers) and the device (imports torch), after the cheap checks
    (``hub_unreachable``: theirs, named in a model problem)."""
    problems: List[VerifilyError] = []

    def model_kind_check() -> None:  # reads the model's config only (imports transformers)
        base = resolve_alias(cfg.base_model)
        if not is_gguf(base):  # a GGUF's kind is checked once it is converted (a CausalLM)
            inspect_model(base, cfg.task, cfg.trust_remote_code)
            check_weights(base)

    if not _attempt(problems, model_kind_check) and hub_unreachable and problems[-1].key == "base_model":
        last = problems.pop()
        problems.append(type(last)(last.where, last.key, f"{last.problem} ({HUB_UNREACHABLE})"))

    def device_check() -> None:
        plan = resolve_device(cfg.compute)
        quantization_config(cfg.lora, plan.device)
        if cfg.training.compile:
            check_compile_support(plan.device)

    _attempt(problems, device_check)
    if problems:
        raise problems[0] if len(problems) == 1 else PreflightError(problems)
