"""The plan of a tag-level attribution, made before any retraining: values, target, budget, arms and their cost.

``verifily attribute --dry-run`` prints it and stops; the ``attribute`` flow makes the same plan first, so a
bad value, target or budget is one line before any run starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from verifily_train.artifacts.run import load_run_json
from verifily_train.attribution import target as targets
from verifily_train.attribution.derive import train_tag_counts
from verifily_train.attribution.stats import DEFAULT_CONTROLS
from verifily_train.config import load_config
from verifily_train.dataset.store import load_for_config
from verifily_train.errors import RunError, VerifilyError


def make_plan(parent: Path, by: str, values: Optional[List[str]], seeds: int, target: Optional[str] = None,
              budget_steps: Optional[int] = None, budget_fraction: Optional[float] = None,
              controls: Optional[int] = None) -> dict:
    """What an ``attribute`` call will train and judge; user errors as one line naming the flag."""
    record = load_run_json(parent)
    if record.get("status") != "completed":
        raise RunError(parent, None, "only a completed run can be attributed")
    cfg = load_config(str(parent / "config.yaml"))
    dv = load_for_config(cfg.dataset_version, cfg.data_paths, cfg.task)
    counts = train_tag_counts(dv, by) if by in (record["job"]["dataset_version"].get("tag_schema") or {}) else {}
    chosen, notes = choose_values(record, by, values, counts)
    chosen_target = targets.check_target(target or targets.default_target(record), record,
                                         _evaluated_tag_values(parent))
    overrides, budget = retrain_budget(record, budget_steps, budget_fraction)
    sizes = sorted({counts[v] for v in chosen})
    controls = DEFAULT_CONTROLS if controls is None else controls
    arms = 1 + len(chosen) + controls * len(sizes)
    runs = arms * seeds
    reused = 1 if budget["max_steps"] is None else 0  # the full arm at the parent's seed and budget is the parent
    return {"parent": str(parent), "by": by, "values": {v: counts[v] for v in chosen}, "notes": notes,
            "target": chosen_target, "target_words": targets.describe(chosen_target, targets.eval_split(record), None),
            "seeds": seeds, "sizes": sizes, "controls": controls, "arms": arms, "training_runs": runs - reused, "reused_runs": reused,
            "overrides": overrides, "budget": budget, "train_rows": sum(counts.values()) if counts else None}


def describe_plan(plan: dict) -> str:
    """The plan in lines: the question, the arms, and the cost in training runs."""
    values = ", ".join(f"{plan['by']}={v} ({n} rows)" for v, n in plan["values"].items())
    lines = [f"Question: on {plan['target_words']}, are a value's rows worse (or better) than as many random rows?",
             f"Values: {values}",
             f"Arms: full, {len(plan['values'])} value(s) removed, {plan['controls']} x {len(plan['sizes'])} "
             f"size-matched random control(s) ({plan['controls']} fresh random subset(s) per size and seed), x "
             f"{plan['seeds']} seeds = {plan['arms'] * plan['seeds']} "
             f"runs; {plan['training_runs']} to train"
             + (f" ({plan['reused_runs']} reused: the parent run is the full arm's first seed)" if plan["reused_runs"]
                else ""),
             f"Budget: {plan['budget']['description']}"]
    lines += [f"note: {note}" for note in plan["notes"]]
    return "\n".join(lines)


def _evaluated_tag_values(parent: Path) -> Optional[dict]:
    """Each tag key's values among the rows the parent run evaluated (its predictions), for slice targets."""
    import pyarrow.parquet as pq

    path = parent / "predictions.parquet"
    if not path.is_file():
        return None
    names = [n for n in pq.read_schema(path).names if n.startswith("tag.")]
    table = pq.read_table(path, columns=names)
    return {n[len("tag."):]: {str(v) for v in table.column(n).to_pylist() if v is not None} for n in names}


def choose_values(record: dict, by: str, values: Optional[List[str]], counts: dict):
    """The tag values to remove, and notes: the given ones (checked against the dataset's tag schema and its
    train rows) or every value present in the train rows (declared but absent values named in one note)."""
    tag_schema = record["job"]["dataset_version"].get("tag_schema") or {}
    if by not in tag_schema:
        raise VerifilyError(None, "--by", f"the run's dataset has no tag {by!r} (tags: {', '.join(tag_schema) or 'none'})")
    known = sorted(str(v) for v in (tag_schema.get(by) or {}).get("values", []))
    if values:
        unknown = [v for v in values if known and v not in known]
        if unknown:
            raise VerifilyError(None, "--values", f"{unknown[0]!r} is not a value of tag {by!r} "
                                                  f"(values: {', '.join(known)})")
        absent = [v for v in values if v not in counts]
        if absent:
            raise VerifilyError(None, "--values", f"no train rows have {by}={absent[0]} "
                                                  f"(present: {', '.join(counts) or 'none'})")
        return list(values), []
    if not known:
        raise VerifilyError(None, "--by", f"tag {by!r} is not categorical: give the values with --values")
    if not counts:
        raise VerifilyError(None, "--by", f"no train rows carry tag {by!r}")
    absent = [v for v in known if v not in counts]
    notes = [f"declared in the tag schema but absent from the train rows, not attributed: "
             f"{', '.join(f'{by}={v}' for v in absent)}"] if absent else []
    return sorted(counts), notes


def retrain_budget(record: dict, steps: Optional[int], fraction: Optional[float]):
    """The overrides and description of the retraining budget (settings checked by ``check_options``)."""
    parent_steps = int(record.get("metrics", {}).get("train_steps") or 0)
    if fraction is not None:
        steps = max(1, round(parent_steps * fraction))
    if steps is not None:
        return [f"training.max_steps={steps}"], {
            "max_steps": steps, "parent_steps": parent_steps,
            "description": f"short retrains: {steps} optimizer steps per arm from the same initialisation "
                           f"(the parent ran {parent_steps})"}
    return [], {"max_steps": None, "parent_steps": parent_steps,
                "description": "full retrains with the parent's config (arms without rows take fewer steps per epoch)"}
