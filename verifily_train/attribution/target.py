"""The target a tag verdict is read on: the evaluated split, a gold set, or a slice of the evaluated split.

A verdict answers "on this target, are the value's rows worse (or better) than as many random rows?". The
target is fixed before any retraining and named in every verdict line. Default: the gold set when the
parent run scored one, else the evaluated split (test, or val when the dataset has no test split).
"""

from __future__ import annotations

from typing import Optional

from verifily_train.dataset.rows import tag_text
from verifily_train.errors import ConfigError

TARGET_FORMS = "test, val, gold, slice:<tag>=<value> or slice:<tag>!=<value>"
GOLD_METRIC = "gold_token_f1"  # the gold set is scored by generation only: no per-row loss (evaluation/predict.py)


def default_target(record: dict) -> str:
    """``gold`` when the parent run scored a gold set, else the split it evaluated."""
    if GOLD_METRIC in (record.get("metrics") or {}):
        return "gold"
    return eval_split(record) or "test"


def eval_split(record: dict) -> Optional[str]:
    return (record.get("evaluation") or {}).get("split")


def check_target(target: str, record: dict, tag_values: Optional[dict] = None) -> str:
    """The target, checked against the parent run: one line naming ``--target`` when it cannot be read.

    ``tag_values`` maps each tag key to the values present in the evaluated split's rows (for slices)."""
    split = eval_split(record)
    if split is None:
        raise ConfigError(None, "--target", "the run evaluated no split (eval.enabled false, or no test/val rows): "
                                            "a verdict needs a target")
    if target == "gold":
        if GOLD_METRIC not in (record.get("metrics") or {}):
            raise ConfigError(None, "--target", "the run scored no gold set (eval.gold_set with a generation metric)")
        return target
    if target in ("test", "val"):
        if target != split:
            raise ConfigError(None, "--target", f"the arms are evaluated on the {split} split (a run evaluates test, "
                                                f"else val); {target} is not scored")
        return target
    key, negate, value = parse_slice(target, keys=None if tag_values is None else
                                     [k for k, present in tag_values.items() if present])
    if tag_values is not None:
        present = tag_values.get(key)
        if value not in present and not negate:
            raise ConfigError(None, "--target", f"no {split} rows have {key}={value} "
                                                f"(present: {', '.join(sorted(present))})")
        if negate and set(present) == {value}:
            raise ConfigError(None, "--target", f"every {split} row has {key}={value}: {target} is empty")
    return target


def parse_slice(target: str, forms: str = TARGET_FORMS, keys=None) -> tuple:
    """``slice:<tag>=<value>`` -> (tag, False, value); ``slice:<tag>!=<value>`` -> (tag, True, value); else one
    ``--target`` line listing ``forms``. The one parser of slice targets (tag verdicts and ``--rows`` alike):
    the operator is the first ``=`` (``!=`` when a ``!`` precedes it); a second operator is ambiguous and
    refused; with ``keys`` (the tag keys the target split's rows carry) an unknown key is refused in both
    forms (``sourc!=human`` would otherwise be every row). The value is compared in NFC."""
    body = target[len("slice:"):] if target.startswith("slice:") else ""
    at = body.find("=")
    negate = at > 0 and body[at - 1] == "!"
    key, value = (body[:at - 1] if negate else body[:at]) if at >= 0 else "", body[at + 1:] if at >= 0 else ""
    if not key or not value:
        raise ConfigError(None, "--target", f"must be {forms}; got {target!r}")
    if "=" in value or "!" in key:
        raise ConfigError(None, "--target", f"{target!r} is ambiguous: one = or != between the tag and the value")
    if keys is not None and key not in keys:
        known = ", ".join(sorted(keys)) or "none"
        raise ConfigError(None, "--target", f"no rows of the target split carry tag {key!r} (tags: {known})")
    return key, negate, tag_text(value)


def slice_name(target: str) -> str:
    """The key of the target's cell among a value's slices: ``overall``, ``gold`` or ``<tag>=<value>``."""
    if target.startswith("slice:"):
        return target[len("slice:"):]
    return "gold" if target == "gold" else "overall"


def target_mask(frame, target: str):
    """Which rows of a per-example table (``tag.<key>`` columns) are in the target."""
    import numpy as np

    if not target.startswith("slice:"):
        return np.ones(len(frame), dtype=bool)
    key, negate, value = parse_slice(target)
    column = f"tag.{key}"
    if column not in frame.columns:
        return np.ones(len(frame), dtype=bool) if negate else np.zeros(len(frame), dtype=bool)
    values = frame[column].map(lambda v: None if v is None or v != v else tag_text(v))
    tagged = (values == value).to_numpy() & frame[column].notna().to_numpy()
    return ~tagged if negate else tagged


def describe(target: str, split: Optional[str], rows: Optional[int]) -> str:
    """The target in words: "the test split (120 rows)", "test rows with source=human (40 rows)"."""
    count = f" ({rows} rows)" if rows is not None else ""
    if target == "gold":
        return f"the gold set{count}"
    if target.startswith("slice:"):
        key, negate, value = parse_slice(target)
        return f"{split or 'test'} rows with {key}{'!=' if negate else '='}{value}{count}"
    return f"the {target} split{count}"
