"""The evaluation metrics, one ``MetricSpec`` each: name, tasks, how rows aggregate, column, direction, test.

Why in ``config/``: ``config/schema.py`` reads the names (``eval.metrics``' defaults and the names it accepts),
and config sits below evaluation in the layers (tests/layering.py), so the table is plain data at the lowest
layer that needs it; it imports nothing. How a metric is computed lives in ``evaluation/``, once per ``kind``
(``metrics.POINT``, ``bootstrap.STATISTIC``; significance tests every per-row kind alike), and a generation
metric's per-row scorer is registered under its column in ``evaluation/text_metrics.ROW_SCORERS``.
Evaluation, slices, bootstrap intervals, compare's tests, attribution and the printed summary all read this
table, in its order: adding a metric is one entry here and its function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Tuple

# How a metric's rows aggregate; evaluation implements each kind once (a point value, a resampling statistic)
ROW_MEAN = "row_mean"  # the mean of a per-row score held in ``column``
LABEL_MATCH = "label_match"  # the share of rows whose ``pred_id`` is their ``label_id`` (per row: ``column``)
TOKEN_WEIGHTED = "token_weighted"  # sum(loss_sum) / sum(n_tokens) over the rows: the response-token loss
EXP_OF = "exp_of"  # exp(min(x, 50)) of the metric named in ``function_of``
MACRO_F1 = "macro_f1"  # macro-F1 over the labels present in label_id or pred_id
KINDS = (ROW_MEAN, LABEL_MATCH, TOKEN_WEIGHTED, EXP_OF, MACRO_F1)
PER_ROW_KINDS = (ROW_MEAN, LABEL_MATCH)  # the metric is the mean of a per-row score (a swap test per row)


@dataclass(frozen=True)
class MetricSpec:
    name: str  # the eval.metrics name and the key in metrics.json, slices.json and the summary
    tasks: Tuple[str, ...]  # the tasks it applies to (sft, classification)
    kind: str  # one of KINDS
    column: Optional[str] = None  # predictions.parquet column of its per-row score (None: no per-row score)
    lower_is_better: bool = False
    function_of: Optional[str] = None  # a monotone function of that metric: one test and one star for both
    generation: bool = False  # scored on generated text: naming it in eval.metrics turns generation on
    attributed: bool = False  # verifily attribute reports its per-row effect (``column``) beside the verdict
    leads: bool = False  # may head a table of one run's metrics (slices, comparisons): the first present leads


METRICS: Tuple[MetricSpec, ...] = (
    MetricSpec("loss", ("sft",), TOKEN_WEIGHTED, column="loss", lower_is_better=True, attributed=True, leads=True),
    MetricSpec("perplexity", ("sft",), EXP_OF, column="perplexity", lower_is_better=True, function_of="loss"),
    MetricSpec("exact_match", ("sft",), ROW_MEAN, column="exact_match", generation=True, attributed=True,
               leads=True),
    MetricSpec("token_f1", ("sft",), ROW_MEAN, column="token_f1", generation=True, attributed=True),
    MetricSpec("format_compliance", ("sft",), ROW_MEAN, column="format_ok", generation=True),
    MetricSpec("accuracy", ("classification",), LABEL_MATCH, column="correct", attributed=True, leads=True),
    MetricSpec("macro_f1", ("classification",), MACRO_F1),
)


def metric(name: str) -> Optional[MetricSpec]:
    """The table's entry for ``name`` (None for a name it does not hold, e.g. ``examples`` or ``gold_token_f1``)."""
    return next((spec for spec in METRICS if spec.name == name), None)


def all_names() -> Tuple[str, ...]:
    """Every metric's name, in table order (the order the summary shows them in)."""
    return tuple(spec.name for spec in METRICS)


def metrics_for(task: str) -> Tuple[MetricSpec, ...]:
    """The metrics of one task, in table order (the order they are computed and shown in)."""
    return tuple(spec for spec in METRICS if task in spec.tasks)


def names_for(task: str) -> Tuple[str, ...]:
    """The names ``eval.metrics`` accepts for ``task`` (every one is also a default)."""
    return tuple(spec.name for spec in metrics_for(task))


def generation_metrics() -> Tuple[MetricSpec, ...]:
    """The metrics scored on generated text, in table order."""
    return tuple(spec for spec in METRICS if spec.generation)


def attributed_metrics() -> Tuple[MetricSpec, ...]:
    """The metrics whose per-row effect ``verifily attribute`` reports, in table order."""
    return tuple(spec for spec in METRICS if spec.attributed)


def lead_metric(names: Iterable[str]) -> Optional[str]:
    """The metric a table over ``names`` leads with: the first in table order that may lead (loss for SFT, whose
    evaluation always gives it, accuracy for classification), or None."""
    present = set(names)
    return next((spec.name for spec in METRICS if spec.leads and spec.name in present), None)


def lower_is_better(name: str) -> bool:
    """Whether a lower value of ``name`` is better (a name outside the table, such as a gold-set score, is not)."""
    spec = metric(name)
    return spec is not None and spec.lower_is_better


def tested_as(name: str) -> str:
    """The metric whose test (and star) ``name`` shares: itself unless it is a monotone function of another."""
    spec = metric(name)
    return spec.function_of if spec is not None and spec.function_of else name
