"""Experiment trackers (``training.report_to``): the Run's identity, config and results beside the Trainer's logging.

The HF Trainer logs its own params and loss curve to each tracker it knows. For MLflow, the tracker run is
created before the stages (named by the Verifily run id) and handed to the Trainer through ``MLFLOW_RUN_ID``,
so everything lands in one MLflow run; once the Run is written, its identity (run id, dataset ref and content
hash, reproducibility hash) and config are added as tags and params, its final and per-slice metrics as
metrics, run.json and report.html as artifacts. A replayed Run (no Trainer ran) gets the loss curve from its
trainer_log.jsonl. docs/trackers.md.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

from verifily_train.artifacts.results import attribution_verdicts, comparison_cells
from verifily_train.config.hashing import config_to_dict
from verifily_train.config.schema import TrainConfig, trackers
from verifily_train.errors import EnvironmentProblem, VerifilyError

UNSAFE_NAME = re.compile(r"[^\w\-. :/]")  # MLflow names: alphanumerics, _ - . space : /
PARAM_VALUE_LIMIT = 500  # MLflow refuses long param values; the full config is config.yaml in the artifacts
BATCH = 100  # MLflow's log_batch takes at most 100 params (1000 metrics) per call


def metric_name(*parts: str) -> str:
    """``slice/source:human/loss``: each part with what MLflow refuses in a name replaced by ``_``."""
    return "/".join(UNSAFE_NAME.sub("_", str(part)) for part in parts)


def flat_config(cfg: TrainConfig) -> Dict[str, str]:
    """``config.training.learning_rate`` -> its value, as MLflow params (strings, shortened)."""
    out: Dict[str, str] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}", inner)
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            out[prefix] = text if len(text) <= PARAM_VALUE_LIMIT else text[:PARAM_VALUE_LIMIT - 3] + "..."

    walk("config", config_to_dict(cfg))
    return out


def run_tags(summary: dict) -> Dict[str, str]:
    """The Verifily identity of a Run, as tracker tags."""
    record = summary["record"]
    dataset = record["job"].get("dataset_version") or {}
    tags = {"verifily.run_id": summary["run_id"], "verifily.run_path": str(summary["path"]),
            "verifily.dataset_ref": dataset.get("ref"), "verifily.dataset_content_hash": dataset.get("content_hash"),
            "verifily.reproducibility_hash": record.get("reproducibility_hash"),
            "verifily.config_hash": record.get("config_hash"), "verifily.integrity_root": summary.get("integrity_root"),
            "verifily.train_cached": _train_cached(record)}
    return {k: str(v) for k, v in tags.items() if v is not None}


def _train_cached(record: dict) -> str:
    """"true" when the train stage was read from the cache (a replay): no Trainer logged to the tracker."""
    return "true" if ((record.get("stages") or {}).get("train") or {}).get("cache_hit") else "false"


def _number(value) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if value == value and abs(value) != float("inf") else None


def run_metrics(summary: dict) -> Dict[str, float]:
    """``final/<metric>`` for run.json's flat metrics, ``slice/<key>:<value>/<metric>`` (and ``/n``) per slice."""
    out = {metric_name("final", k): v for k, v in ((k, _number(v)) for k, v in summary["record"]["metrics"].items())
           if v is not None}
    slices_file = Path(summary["path"]) / "slices.json"
    slices = json.loads(slices_file.read_text(encoding="utf-8")) if slices_file.is_file() else {}
    for key, block in (slices.get("slices") or {}).items():
        for entry in block.get("values", []):
            where = f"{key}:{entry.get('value')}"
            for name, value in (entry.get("metrics") or {}).items():
                if name not in ("examples", "tokens") and _number(value) is not None:
                    out[metric_name("slice", where, name)] = float(value)
            if _number(entry.get("n")) is not None:
                out[metric_name("slice", where, "n")] = float(entry["n"])
    return out


def trainer_curve(run_path: Path) -> Iterator[Tuple[str, float, int]]:
    """(name, value, step) of every number the Trainer logged (trainer_log.jsonl), as the Trainer names them."""
    log = Path(run_path) / "trainer_log.jsonl"
    if not log.is_file():
        return
    with open(log, encoding="utf-8") as handle:
        for line in handle:
            entry = json.loads(line) if line.strip() else {}
            step = int(entry.get("step") or 0)
            for name, value in entry.items():
                if name != "step" and _number(value) is not None:
                    yield metric_name(name), float(value), step


class Tracking:
    """The trackers of one Run; this base tracks nothing (``training.report_to: none``)."""

    def stages_begin(self) -> None:
        """Before the stages: hand the tracker run to the Trainer."""

    def stages_end(self) -> None:
        """After the stages, whatever happened: take it back."""

    def failed(self) -> None:
        """The Run failed."""

    def completed(self, summary: dict) -> List[str]:
        """The Run is written: log its identity and results; problems as warnings (the Run stands)."""
        return []


def configured_experiment(client) -> str:
    """The experiment id MLflow's environment names (``MLFLOW_EXPERIMENT_NAME``, created if new), else Default."""
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME")
    if name:
        found = client.get_experiment_by_name(name)
        return found.experiment_id if found else client.create_experiment(name)
    return os.environ.get("MLFLOW_EXPERIMENT_ID") or "0"  # MLflow's Default experiment


class MlflowTracking(Tracking):
    """One MLflow run per Verifily Run (``MLFLOW_TRACKING_URI``, ``MLFLOW_EXPERIMENT_NAME`` as the Trainer reads them)."""

    def __init__(self, cfg: TrainConfig, run_id: str):
        from mlflow.tracking import MlflowClient

        self.cfg = cfg
        self.client = MlflowClient()
        self.given = os.environ.get("MLFLOW_RUN_ID")  # the user's own run to log into: used as it is
        if self.given:
            self.mlflow_run_id = self.given
        else:
            from mlflow.exceptions import MlflowException

            try:
                run = self.client.create_run(configured_experiment(self.client), run_name=run_id,
                                             tags={"verifily.run_id": run_id})
            except MlflowException as err:  # before any stage: a store that refuses is the user's to fix
                raise EnvironmentProblem(None, "training.report_to", f"MLflow ({self.client.tracking_uri}) refused a "
                                                                     f"new run: {str(err).splitlines()[0][:200]}") from err
            self.mlflow_run_id = run.info.run_id
        self._previous_env: Optional[str] = None

    def stages_begin(self) -> None:
        self._previous_env = os.environ.get("MLFLOW_RUN_ID")
        os.environ["MLFLOW_RUN_ID"] = self.mlflow_run_id  # the Trainer (and a DDP launch's ranks) resume this run

    def stages_end(self) -> None:
        if self._previous_env is None:
            os.environ.pop("MLFLOW_RUN_ID", None)
        else:
            os.environ["MLFLOW_RUN_ID"] = self._previous_env

    def failed(self) -> None:
        if not self.given:
            self.client.set_terminated(self.mlflow_run_id, "FAILED")

    def completed(self, summary: dict) -> List[str]:
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.exceptions import MlflowException

        run_id, now = self.mlflow_run_id, _millis()
        try:
            tags = [RunTag(k, v) for k, v in run_tags(summary).items()]
            params = [Param(k, v) for k, v in flat_config(self.cfg).items()]
            metrics = [Metric(k, v, now, 0) for k, v in run_metrics(summary).items()]
            if not self.client.get_metric_history(run_id, "loss"):  # no Trainer ran (a replay, a cached train stage)
                metrics += [Metric(k, v, now, step) for k, v, step in trainer_curve(Path(summary["path"]))]
            self.client.log_batch(run_id, tags=tags)
            for start in range(0, len(params), BATCH):
                self.client.log_batch(run_id, params=params[start:start + BATCH])
            for start in range(0, len(metrics), 1000):
                self.client.log_batch(run_id, metrics=metrics[start:start + 1000])
            for name in ("run.json", "report.html", "config.yaml"):
                if (Path(summary["path"]) / name).is_file():
                    self.client.log_artifact(run_id, str(Path(summary["path"]) / name))
            if not self.given:
                self.client.set_terminated(run_id, "FINISHED")
        except (MlflowException, OSError) as err:  # the Run is complete and verifiable: the tracker's gap is a warning
            return [f"MLflow run {run_id} did not take the Run's results: {str(err).splitlines()[0][:200]}"]
        return []


def _millis() -> int:
    import time

    return int(time.time() * 1000)


def start_tracking(cfg: TrainConfig, run_id: str) -> Tracking:
    """The trackers ``training.report_to`` names that Verifily logs to itself (MLflow); the others the Trainer
    logs to alone."""
    return MlflowTracking(cfg, run_id) if "mlflow" in trackers(cfg.training) else Tracking()


RESULT_TRACKERS = ("mlflow",)  # the trackers `compare` and `attribute` can log to (--report-to)


def check_result_tracker(name: Optional[str], flag: str = "--report-to") -> None:
    """A tracker ``compare`` / ``attribute`` can log to, and its package installed; one line otherwise."""
    if name is None:
        return
    if name not in RESULT_TRACKERS:
        raise VerifilyError(None, flag, f"must be one of {', '.join(RESULT_TRACKERS)}; got {name!r}")
    import importlib.util

    if importlib.util.find_spec(name) is None:
        raise EnvironmentProblem(None, flag, f"{name} needs the {name} package: pip install {name}")


def _results_run(name: str, verifily_run_id: str, tags: Dict[str, str]):
    """A new MLflow run for a result about ``verifily_run_id``: in the experiment of that Run's MLflow run and
    nested under it when one was logged, else in the configured experiment (as training picks it)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    found = client.search_runs(experiments, filter_string=f"tags.`verifily.run_id` = '{verifily_run_id}'",
                               order_by=["attribute.start_time ASC"], max_results=1) if experiments else []
    tags = dict(tags)
    if found:
        experiment = found[0].info.experiment_id
        tags["mlflow.parentRunId"] = found[0].info.run_id
    else:
        experiment = configured_experiment(client)
    return client, client.create_run(experiment, run_name=name, tags=tags).info.run_id


def _log_result(client, run_id: str, metrics: Dict[str, float], artifact_name: str, payload: dict,
                extra_text: Optional[Tuple[str, str]] = None) -> None:
    import tempfile

    from mlflow.entities import Metric

    now = _millis()
    items = [Metric(k, v, now, 0) for k, v in metrics.items()]
    for start in range(0, len(items), 1000):
        client.log_batch(run_id, metrics=items[start:start + 1000])
    with tempfile.TemporaryDirectory(prefix="verifily-tracker-") as folder:
        path = Path(folder) / artifact_name
        path.write_text(json.dumps(payload, indent=2, default=str), encoding="utf-8")
        client.log_artifact(run_id, str(path))
        if extra_text:
            extra = Path(folder) / extra_text[0]
            extra.write_text(extra_text[1], encoding="utf-8")
            client.log_artifact(run_id, str(extra))
    client.set_terminated(run_id, "FINISHED")


def log_comparison(result: dict, text: str) -> str:
    """``compare A B`` as an MLflow run nested under B's: ``delta/<metric>``, ``p_adjusted/<metric>``,
    ``significant/<metric>`` overall and ``.../slice/<key>:<value>/<metric>`` per slice; comparison.json and the
    table as artifacts. Returns the MLflow run id."""
    client, run_id = _results_run(f"compare {result['run_a']} {result['run_b']}", result["run_b"],
                                  {"verifily.compare.a": str(result["run_a"]), "verifily.compare.b": str(result["run_b"]),
                                   "verifily.kind": "compare"})
    metrics: Dict[str, float] = {}
    for row in comparison_cells(result):
        where = [] if row["key"] == "overall" else ["slice", f"{row['key']}:{row['value']}"]
        for field in ("delta", "p_adjusted"):
            if _number(row[field]) is not None:
                metrics[metric_name(field, *where, row["metric"])] = float(row[field])
        metrics[metric_name("significant", *where, row["metric"])] = 1.0 if row["significant"] else 0.0
    _log_result(client, run_id, metrics, "comparison.json", result, ("comparison.txt", text))
    return run_id


def log_attribution(result: dict, parent_run_id: str) -> str:
    """``attribute RUN --by KEY`` as an MLflow run nested under RUN's: ``effect/<key>:<value>``,
    ``p_adjusted/<key>:<value>`` and a ``verdict/<key>:<value>`` tag per value; attribution.json as an artifact.
    Returns the MLflow run id."""
    by = result.get("by")
    rows = attribution_verdicts(result)
    tags = {"verifily.kind": "attribute", "verifily.attribute.by": str(by), "verifily.attribute.parent": parent_run_id}
    tags.update({metric_name("verdict", f"{by}:{row['value']}"): str(row["verdict"]) for row in rows})
    client, run_id = _results_run(f"attribute {parent_run_id} by {by}", parent_run_id, tags)
    metrics = {metric_name(field, f"{by}:{row['value']}"): float(row[field]) for row in rows
               for field in ("effect", "p_adjusted", "mde") if _number(row[field]) is not None}
    _log_result(client, run_id, metrics, "attribution.json", result)
    return run_id
