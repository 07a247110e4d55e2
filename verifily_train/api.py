"""The Python API: ``train``, ``load_run``, ``compare`` and ``attribute`` for notebooks and scripts.

The same code paths as the CLI (``verifily train``, ``runs show``, ``compare``, ``attribute``): the same flow,
cache and Run artifact, results as objects with pandas DataFrames, user errors raised as ``VerifilyError``
(never ``sys.exit``, nothing printed but progress bars). It sits beside ``cli/`` in the import layers
(tests/layering.py): ``train`` and ``attribute`` run Prefect flows through the CLI's runtime, imported when
called, so ``import verifily_train`` and ``load_run`` never import Prefect.
"""

from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

from verifily_train.artifacts.results import attribution_verdicts, comparison_cells
from verifily_train.artifacts.run import find_run, load_run_json, verify_before_use, verify_run
from verifily_train.artifacts.trackers import check_result_tracker, log_attribution, log_comparison
from verifily_train.attribution.plan import describe_plan
from verifily_train.attribution.render import render
from verifily_train.attribution.stats import DEFAULT_SEEDS
from verifily_train.cli.train import train_summary
from verifily_train.config import config_to_dict, load_with_problems
from verifily_train.config.schema import MANAGED_MESSAGE, TrainConfig
from verifily_train.errors import ConfigError, EnvironmentProblem, RunError, VerifilyError

__all__ = ["Run", "RunGroup", "Comparison", "GroupComparison", "Attribution", "train", "load_run", "compare", "compare_groups",
           "attribute", "VerifilyError"]

ConfigLike = Union[str, os.PathLike, Mapping[str, Any], TrainConfig]
RunLike = Union[str, os.PathLike, "Run"]


class Run:
    """A Run folder (docs/run_artifacts.md), read when asked; nothing here writes to it."""

    def __init__(self, path: Union[str, os.PathLike], summary: Optional[dict] = None):
        self.path = Path(os.path.abspath(path))  # a notebook may chdir later
        self.summary = summary  # what ``train`` returned (replayed, compared_with, ...); None when loaded

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, status={self.status!r})"

    @property
    def run_id(self) -> str:
        return str(self.record.get("run_id", self.path.name))

    @property
    def status(self) -> str:
        return str(self.record.get("status", "?"))

    @cached_property
    def record(self) -> dict:
        """run.json as a dict."""
        return load_run_json(self.path)

    @cached_property
    def config(self) -> TrainConfig:
        """The resolved config the Run recorded (config.yaml), as a ``TrainConfig``: ``vt.train(run.config)``
        trains it again."""
        path = self.path / "config.yaml"
        if not path.is_file():
            raise RunError(self.path, None, "has no config.yaml (a failed run records only run.json)")
        return load_with_problems(path)[0]  # a data path that moved since is the next train's problem, not a read's

    @property
    def metrics(self) -> dict:
        """The flat metrics of run.json: evaluation metrics, baseline_*, train_loss, train_steps, ..."""
        return dict(self.record.get("metrics") or {})

    @cached_property
    def slices(self):
        """One row per tag key and value (and ``overall``): n, each metric, its 95% interval, the delta to
        overall, the untuned base model's figure and ``low_confidence``."""
        import pandas as pd

        data = self._json("slices.json")
        overall = dict(data.get("overall") or {})
        overall.setdefault("baseline", self._json("metrics.json").get("baseline") or {})  # the untuned base model
        rows = [_slice_row("overall", None, overall)]
        for key, block in (data.get("slices") or {}).items():
            rows += [_slice_row(key, entry.get("value"), entry) for entry in block.get("values", [])]
        columns = list(dict.fromkeys(c for row in rows for c in row))
        metrics = [c for c in columns if c not in SLICE_COLUMNS and "_ci95_" not in c
                   and not c.startswith(("delta_", "baseline_"))]
        order = list(SLICE_COLUMNS) + [c for m in metrics for c in (m, f"{m}_ci95_low", f"{m}_ci95_high",
                                                                      f"delta_{m}", f"baseline_{m}") if c in columns]
        return pd.DataFrame(rows, columns=order)

    @cached_property
    def predictions(self):
        """predictions.parquet: one row per evaluated example with its tags and per-example scores."""
        import pandas as pd

        return pd.read_parquet(self._file("predictions.parquet"))

    @cached_property
    def hard_examples(self):
        """hard_examples.jsonl: the hardest evaluated examples, hardest first."""
        import pandas as pd

        path = self._file("hard_examples.jsonl")
        with open(path, encoding="utf-8") as handle:
            return pd.DataFrame([json.loads(line) for line in handle if line.strip()])

    @property
    def report_path(self) -> Path:
        """The Run's self-contained HTML report."""
        return self._file("report.html")

    def verify(self, root: Optional[str] = None) -> int:
        """Re-check every checksum against the ledger's integrity root (or ``root``); the number of files checked.
        A changed, missing or extra file raises ``RunError`` naming it."""
        return verify_run(self.path, expected_root=root)

    def _file(self, name: str) -> Path:
        path = self.path / name
        if not path.is_file():
            raise RunError(self.path, None, f"has no {name}" + ("" if self.status == "completed" else
                                                                f" (status is {self.status!r})"))
        return path

    def _json(self, name: str) -> dict:
        try:
            return json.loads(self._file(name).read_text(encoding="utf-8"))
        except ValueError as err:
            raise RunError(self.path / name, None, f"cannot read: {err}") from None


SLICE_COLUMNS = ("key", "value", "n", "low_confidence")


def _slice_row(key: str, value: Any, entry: dict) -> dict:
    row: Dict[str, Any] = {"key": key, "value": value, "n": entry.get("n"),
                           "low_confidence": bool(entry.get("low_confidence", False))}
    for name, figure in (entry.get("metrics") or {}).items():
        if name in ("examples", "tokens"):
            continue
        row[name] = figure
        low, high = (entry.get("ci95") or {}).get(name) or (None, None)
        row[f"{name}_ci95_low"], row[f"{name}_ci95_high"] = low, high
        if name in (entry.get("delta") or {}):
            row[f"delta_{name}"] = entry["delta"][name]
    for name, figure in (entry.get("baseline") or {}).items():
        if name in row:
            row[f"baseline_{name}"] = figure
    return row


def load_run(path_or_id: RunLike, runs_dir: Optional[Union[str, os.PathLike]] = None) -> Run:
    """A Run by folder or run id (looked up as ``verifily runs show`` does: ``runs/``, then ``$VERIFILY_HOME/runs``)."""
    if isinstance(path_or_id, Run):
        return path_or_id
    return Run(find_run(os.fspath(path_or_id), runs_dir))


def _overrides(overrides: Mapping[str, Any], prefix: str = "") -> List[str]:
    """``training={"num_epochs": 1}`` or ``training__num_epochs=1`` as ``training.num_epochs=1`` (values as YAML)."""
    out: List[str] = []
    for key, value in overrides.items():
        dotted = prefix + key.replace("__", ".")
        if isinstance(value, Mapping):
            out += _overrides(value, dotted + ".")
        else:
            out.append(f"{dotted}={json.dumps(value)}")  # JSON is YAML: strings stay strings, lists stay lists
    return out


def _config_source(config: ConfigLike):
    if isinstance(config, TrainConfig):
        return config_to_dict(config)
    if isinstance(config, Mapping):
        return dict(config)
    if isinstance(config, (str, os.PathLike)):
        return os.fspath(config)
    raise ConfigError(None, "config", f"must be a train.yaml path, a dict or a TrainConfig; got {type(config).__name__}")


def train(config: ConfigLike, *, dataset: Optional[str] = None, refresh: bool = False,
          **overrides: Any) -> Union[Run, "RunGroup"]:
    """Train as ``verifily train`` does (preflight, then a replay from the cache or the ``train`` flow) and return
    the Run.

    Args:
        config: a train.yaml path, the config as a dict, or a ``TrainConfig`` (``run.config``).
        dataset: a dataset reference (``ds_x@v3``), as ``--dataset``.
        refresh: recompute every stage and replace its cache entries, as ``--refresh``.
        overrides: config keys, as sections (``training={"num_epochs": 1}``) or with ``__`` for the dot
            (``training__num_epochs=1``); ``cache={"enabled": False}`` is ``--no-cache``.
    """
    cfg, problems = load_with_problems(_config_source(config), _overrides(overrides), dataset=dataset)
    if cfg.compute.mode == "managed":
        raise EnvironmentProblem(None, "compute.mode", MANAGED_MESSAGE)
    if cfg.compute.mode == "self_host":  # the run happens on a worker; its Run lands on the worker's storage
        raise ConfigError(None, "compute.mode", "self_host submits the run to a work pool: use verifily train "
                                                "--mode self_host, or compute={'mode': 'local'} to train here")
    summary = train_summary(cfg, problems, refresh=refresh)
    if "members" in summary:  # training.replicates > 1: the group's path; its member Runs in ``.members``
        if not summary.get("group_id"):
            raise ConfigError(None, "training.replicates", "every replicate was skipped: nothing was trained")
        group = RunGroup(summary["path"], [Run(m["path"], m) for m in summary["members"]])
        return group
    return Run(summary["path"], summary)


class RunGroup:
    """Replicate runs of one config (``training.replicates``): ``.path`` (the group folder, what
    ``compare_groups`` takes), ``.members`` (the Runs, seed order)."""

    def __init__(self, path: Union[str, os.PathLike], members: List[Run]):
        self.path = Path(path).resolve()
        self.members = members

    def __repr__(self) -> str:
        return f"RunGroup({self.path.name!r}, {len(self.members)} runs)"


class Comparison:
    """``verifily compare A B`` as an object: ``.raw`` is its JSON (``--json``), ``str()`` its table."""

    def __init__(self, raw: dict):
        self.raw = raw
        self.tracker_run_id: Optional[str] = None  # the MLflow run it was logged to (report_to)

    def __repr__(self) -> str:
        return f"Comparison({self.raw['run_a']!r} -> {self.raw['run_b']!r})"

    def __str__(self) -> str:
        from verifily_train.artifacts.compare import render_comparison

        return render_comparison(self.raw)

    def markdown(self) -> str:
        from verifily_train.artifacts.compare import render_comparison

        return render_comparison(self.raw, markdown=True)

    @property
    def overall(self):
        """One row per metric: A, B, B - A, and (on shared test rows) its paired interval, p values and star."""
        return self._frame("overall")

    @property
    def slices(self):
        """One row per tag key, value and metric: n, B - A with its paired interval, p values, star and flips."""
        return self._frame("slices")

    @property
    def config_diff(self):
        import pandas as pd

        return pd.DataFrame(self.raw.get("config_diff") or [], columns=["key", "a", "b"])

    def _frame(self, part: str):
        import pandas as pd

        rows = [r for r in comparison_cells(self.raw) if (r["key"] == "overall") == (part == "overall")]
        if part == "overall":
            rows = [{k: v for k, v in r.items() if k not in ("key", "value")} for r in rows]
        return pd.DataFrame(rows)


def compare(a: RunLike, b: RunLike, *, runs_dir: Optional[Union[str, os.PathLike]] = None,
            bootstrap_samples: int = 1000, fdr_q: Optional[float] = None, permutations: Optional[int] = None,
            report_to: Optional[str] = None) -> Comparison:
    """B minus A as ``verifily compare A B`` computes it (the same statistics; no Run is written to).
    ``report_to="mlflow"`` also logs it as an MLflow run nested under B's (docs/trackers.md)."""
    from verifily_train.artifacts.compare import PERMUTATIONS, compare_runs

    check_result_tracker(report_to, "report_to")
    run_a, run_b = load_run(a, runs_dir), load_run(b, runs_dir)
    for run in (run_a, run_b):  # completed and untampered, as ``verifily compare`` checks
        verify_before_use(run.path, "compare")
    comparison = Comparison(compare_runs(run_a.path, run_b.path, bootstrap_samples=bootstrap_samples, fdr_q=fdr_q,
                                         permutations=PERMUTATIONS if permutations is None else permutations))
    if report_to:
        comparison.tracker_run_id = log_comparison(comparison.raw, str(comparison))
    return comparison


class GroupComparison:
    """``verifily compare GROUP_A GROUP_B`` as an object: ``.raw`` is its JSON, ``str()`` its table, ``.cells`` one
    row per slice x metric cell (means, B - A, its 95% interval over seeds, adjusted p, star, detectable effect)."""

    def __init__(self, raw: dict):
        self.raw = raw

    def __repr__(self) -> str:
        return f"GroupComparison({len(self.raw['a']['runs'])} runs -> {len(self.raw['b']['runs'])} runs)"

    def __str__(self) -> str:
        from verifily_train.artifacts.groups import render_group_comparison

        return render_group_comparison(self.raw)

    @property
    def cells(self):
        import pandas as pd

        rows = []
        cells = [("overall", None, self.raw["overall"])] + [(k, v, e["deltas"]) for k, vs in self.raw["slices"].items()
                                                            for v, e in vs.items()]
        for key, value, deltas in cells:
            for metric, d in deltas.items():
                ci = d.get("ci95") or [None, None]
                rows.append({"key": key, "value": value, "metric": metric, "a": d.get("a"), "b": d.get("b"),
                             "delta": d.get("delta"), "ci_low": ci[0], "ci_high": ci[1], "p": d.get("p"),
                             "p_adjusted": d.get("p_adjusted"), "significant": d.get("significant"),
                             "detectable": d.get("mde")})
        return pd.DataFrame(rows)


def compare_groups(a: Union[RunLike, List[RunLike]], b: Union[RunLike, List[RunLike]], *,
                   runs_dir: Optional[Union[str, os.PathLike]] = None, fdr_q: Optional[float] = None) -> GroupComparison:
    """Did the change from A to B move each metric beyond seed spread? ``a`` and ``b`` are run groups (id or
    path, from ``train(..., training__replicates=3)`` or ``verifily train --seeds 3``) or lists of replicate
    runs; the same seed-level tests as ``verifily compare GROUP_A GROUP_B`` (docs/evaluation.md)."""
    from verifily_train.artifacts.groups import compare_groups as compare_sides, resolve_side

    def side(refs, flag):
        refs = [str(r.path) if isinstance(r, (Run, RunGroup)) else str(r)
                for r in (refs if isinstance(refs, (list, tuple)) else [refs])]
        return resolve_side(refs, runs_dir, flag)

    return GroupComparison(compare_sides(side(a, "a"), side(b, "b"), fdr_q=fdr_q))


class Attribution:
    """``verifily attribute`` as an object: ``.raw`` is attribution.json (or, for a dry run, the plan)."""

    def __init__(self, raw: dict, dry_run: bool = False):
        self.raw = raw
        self.dry_run = dry_run
        self.tracker_run_id: Optional[str] = None  # the MLflow run it was logged to (report_to)

    def __repr__(self) -> str:
        kind = "plan" if self.dry_run else "result"
        return f"Attribution({kind}, by={self.raw.get('by')!r}, values={list(self.raw.get('values') or [])})"

    def __str__(self) -> str:
        return describe_plan(self.raw) if self.dry_run else render(self.raw)

    @property
    def path(self) -> Optional[Path]:
        return Path(self.raw["path"]) if self.raw.get("path") else None

    @property
    def verdicts(self):
        """One row per removed value: rows removed, verdict, the effect against random removal on the target
        with its interval, adjusted p, the smallest detectable effect (a dry run: the rows each would remove)."""
        import pandas as pd

        if self.dry_run:
            return pd.DataFrame([{"value": v, "removed_rows": n} for v, n in (self.raw.get("values") or {}).items()])
        return pd.DataFrame(attribution_verdicts(self.raw))


def attribute(run: RunLike, by: str = "source", *, values: Optional[List[str]] = None, seeds: Optional[int] = None,
              target: Optional[str] = None, alpha: float = 0.05, correction: str = "holm",
              budget_steps: Optional[int] = None, budget_fraction: Optional[float] = None, concurrency: int = 2,
              out: Optional[Union[str, os.PathLike]] = None, deployment: Optional[str] = None,
              dry_run: bool = False, report_to: Optional[str] = None, controls: Optional[int] = None) -> Attribution:
    """Causal attribution as ``verifily attribute RUN --by KEY`` runs it (the ``attribute`` flow; docs/attribution.md);
    ``dry_run`` returns the plan (values, arms, training runs) without training; ``report_to="mlflow"`` also logs
    the verdicts as an MLflow run nested under RUN's (docs/trackers.md)."""
    from verifily_train.cli.attribute import attribution_result, checked_plan

    check_result_tracker(report_to, "report_to")
    parent_run = load_run(run)
    parent = parent_run.path.resolve()
    seeds = DEFAULT_SEEDS if seeds is None else seeds
    plan = checked_plan(parent, by, values, seeds, target, alpha, correction, budget_steps, budget_fraction,
                        concurrency, controls)
    if dry_run:
        return Attribution(plan, dry_run=True)
    result = Attribution(attribution_result(str(parent), by, values, seeds, budget_steps, budget_fraction,
                                            concurrency, None if out is None else os.fspath(out), deployment, alpha,
                                            correction, plan["target"], plan["controls"]))
    if report_to:
        result.tracker_run_id = log_attribution(result.raw, parent_run.run_id)
    return result

