"""Plain tables and markdown from a run summary: what orchestration UIs show (no Prefect here)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from dataclasses import dataclass
from typing import Any, List

from verifily_train.config.metricspec import all_names, lead_metric

# the evaluation metrics in the table's order, then the gold set's, the baseline's and training's headline figures
SHOWN_METRICS = all_names() + ("gold_exact_match", "gold_token_f1", "baseline_loss", "train_loss", "train_steps")


def _num(value):
    if isinstance(value, float):
        return round(value, 4) if math.isfinite(value) else None
    return value


def metrics_table(summary: dict) -> List[dict]:
    """One row per overall metric with its 95% bootstrap interval where one exists."""
    metrics = summary["record"]["metrics"]
    ci = summary["slices"].get("overall", {}).get("ci95", {})
    rows = []
    for name in SHOWN_METRICS:
        if name in metrics:
            low, high = ci.get(name) or (None, None)
            rows.append({"metric": name, "value": _num(metrics[name]), "ci95_low": _num(low), "ci95_high": _num(high)})
    return rows


def ordered_slices(summary: dict) -> List[tuple]:
    """(tag key, block) of the slice stage's output in the config's ``eval.slice_by_tags`` order (the stored
    manifest's keys are sorted), then any other key: a run and its replay show them alike."""
    blocks = summary["slices"].get("slices", {}) or {}
    config = (summary.get("record") or {}).get("job", {}).get("config") or {}
    wanted = [k for k in ((config.get("eval") or {}).get("slice_by_tags") or []) if k in blocks]
    return [(k, blocks[k]) for k in wanted] + [(k, blocks[k]) for k in sorted(blocks) if k not in wanted]


def slice_table(summary: dict) -> List[dict]:
    """One row per (tag key, value): n, the task's lead metric with its interval, and the delta to overall."""
    rows = []
    for key, block in ordered_slices(summary):
        for entry in block["values"]:
            metrics = entry["metrics"]
            lead = lead_metric(metrics)
            if lead is None:
                continue
            low, high = entry.get("ci95", {}).get(lead) or (None, None)
            rows.append({"tag": key, "value": entry["value"], "n": entry["n"], "metric": lead,
                         "score": _num(metrics[lead]), "ci95_low": _num(low), "ci95_high": _num(high),
                         "delta_vs_overall": _num(entry["delta"].get(lead)), "low_n": bool(entry["low_confidence"])})
    return rows


def escape_markdown_html(text: str) -> str:
    """``<tag>``, ``<|im_start|>`` as text: a markdown renderer (the Prefect UI's) drops what looks like HTML."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _cell(value) -> str:
    text = json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list)) else str(value)
    text = escape_markdown_html(text.replace("|", "\\|").replace("\n", " "))
    return text if len(text) <= 80 else text[:77] + "..."


def markdown_table(rows: List[dict]) -> str:
    if not rows:
        return "_none_\n"
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(r.get(h, "")) for h in header) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def hard_examples_markdown(summary: dict, limit: int = 10) -> str:
    """The headline and the first ``limit`` hard examples (rank, id, tags, score, reference, prediction)."""
    hard = summary["hard_examples"]
    path = Path(summary["path"]) / hard.get("file", "hard_examples.jsonl")
    rows = []
    if path.is_file():
        with open(path, encoding="utf-8") as handle:
            for line, _ in zip(handle, range(limit)):
                ex = json.loads(line)
                score = {k: _num(ex[k]) for k in ("loss", "token_f1", "prob_true") if k in ex}
                rows.append({"rank": ex["rank"], "example_id": ex["example_id"], "tags": ex["tags"], **score,
                             "reference": ex.get("reference"), "prediction": ex.get("prediction")})
    headline = hard.get("headline") or "no hard-example concentration by tag"
    return (f"## Hard examples\n\n**{headline}**\n\n{hard.get('count', 0)} listed in `hard_examples.jsonl`; "
            f"the first {len(rows)}:\n\n" + markdown_table(rows))


def run_markdown(summary: dict) -> str:
    record = summary["record"]
    return (f"## Run `{summary['run_id']}`\n\n- path: `{summary['path']}`\n"
            f"- reproducibility_hash: `{record['reproducibility_hash']}`\n"
            f"- config_hash: `{record['job']['config_hash']}`\n"
            f"- dataset: `{record['job']['dataset_version'].get('ref')}` "
            f"(`{record['job']['dataset_version'].get('content_hash', '')}`)\n"
            f"- base model: `{record['job']['base_model']}`, {record['job']['device']}, {record['precision']}\n"
            f"- verify: `verifily runs verify {summary['path']}`\n")


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def stage_log_line(name: str, manifest: dict) -> str:
    """One line per finished stage for the flow run's logs: computed or cached, seconds, and what it found."""
    how = "cached" if manifest.get("cache_hit") else "ran"
    head = f"{name}: {how} in {manifest.get('seconds') or 0:.1f}s"
    if name == "validate":
        ds = manifest.get("dataset") or {}
        detail = f"dataset {ds.get('ref')} ({ds.get('num_rows', '?')} rows, content hash {str(ds.get('content_hash'))[:12]})"
    elif name == "tokenize":
        detail = ", ".join(f"{split} {info.get('rows')} rows" for split, info in (manifest.get("splits") or {}).items())
        if manifest.get("truncated_rows"):
            detail += f"; {manifest['truncated_rows']} truncated"
    elif name == "train":
        detail = (f"train_loss {_short(manifest.get('train_loss'))} after {manifest.get('global_step')} steps "
                  f"({manifest.get('device')}, {manifest.get('precision')})")
    elif name in ("evaluate", "baseline"):
        if manifest.get("skipped"):
            detail = f"skipped: {manifest.get('note')}"
        else:
            metrics = manifest.get("metrics") or {}
            shown = [k for k in SHOWN_METRICS if k in metrics and not k.startswith(("baseline_", "train_"))]
            detail = f"{manifest.get('split')} split: " + ", ".join(f"{k} {_short(metrics[k])}" for k in shown)
    elif name == "slice":
        blocks = manifest.get("slices") or {}
        detail = "; ".join(f"by {k}: {len(b.get('values', []))} values" for k, b in blocks.items()) or "no slices"
    elif name == "hard_examples":
        detail = f"{manifest.get('count', 0)} listed; {manifest.get('headline') or 'no headline'}"
    else:
        detail = ""
    return f"{head}: {detail}" if detail else head


def final_log_lines(summary: dict) -> List[str]:
    """The flow run's closing log lines: the final metrics, the slices' lead metric, where the Run is."""
    metrics = summary["record"]["metrics"]
    lines = ["final metrics: " + ", ".join(f"{row['metric']} {_short(row['value'])}"
                                           + (f" [{_short(row['ci95_low'])}, {_short(row['ci95_high'])}]"
                                              if row["ci95_low"] is not None else "")
                                           for row in metrics_table(summary))]
    for key, block in ordered_slices(summary):
        cells = [f"{e['value']} {_short(e['metrics'].get(lead))}" for e in block["values"]
                 for lead in [lead_metric(e["metrics"])]
                 if lead]
        if cells:
            lead = lead_metric(block["values"][0]["metrics"]) or ""
            lines.append(f"{lead} by {key}: " + ", ".join(cells))
    if "baseline_loss" in metrics:
        lines.append(f"base model loss {_short(metrics['baseline_loss'])} -> fine-tuned {_short(metrics.get('loss'))}")
    lines.append(f"run {summary['run_id']}: {Path(summary['path']).resolve()} (report.html inside)")
    return lines


LOSS_CURVE_ROWS = 500  # the most rows the loss-curve table holds (evenly thinned beyond that)


def loss_curve_rows(run_path) -> List[dict]:
    """The Trainer's logged losses (trainer_log.jsonl): one row per logged step with ``loss`` and, where the
    validation split was scored at that step, ``eval_loss``."""
    path = Path(run_path) / "trainer_log.jsonl"
    if not path.is_file():
        return []
    by_step: dict = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        entry = json.loads(line) if line.strip() else {}
        if "step" not in entry or not any(k in entry for k in ("loss", "eval_loss")):
            continue
        row = by_step.setdefault(entry["step"], {"step": entry["step"], "epoch": _num(entry.get("epoch")),
                                                 "loss": None, "eval_loss": None})
        for key in ("loss", "eval_loss"):
            if key in entry:
                row[key] = _num(entry[key])
    rows = [by_step[k] for k in sorted(by_step)]
    if len(rows) > LOSS_CURVE_ROWS:
        stride = math.ceil(len(rows) / LOSS_CURVE_ROWS)
        rows = rows[::stride] + ([rows[-1]] if (len(rows) - 1) % stride else [])
    return rows


@dataclass(frozen=True)
class ArtifactSpec:
    """One orchestration-UI artifact: its kind (``table`` or ``markdown``), key, content and description."""

    kind: str
    key: str
    content: Any
    description: str


def run_artifacts(summary: dict) -> List[ArtifactSpec]:
    """What the UI shows on a completed Run (the flow's and a replay's alike)."""
    curve = loss_curve_rows(summary["path"])
    return [
        ArtifactSpec("table", "metrics", metrics_table(summary), "Overall metrics with 95% bootstrap intervals"),
        ArtifactSpec("table", "slices", slice_table(summary),
                     "Metrics by tag value (95% bootstrap intervals; delta vs overall). Correlation, not causation."),
        ArtifactSpec("markdown", "hard-examples", hard_examples_markdown(summary),
                     "Hardest test examples and the tags they concentrate in"),
        ArtifactSpec("markdown", "run", run_markdown(summary), "The Run artifact's path and reproducibility hash"),
    ] + ([ArtifactSpec("table", "loss-curve", curve, "Training loss (and validation loss where scored) per "
                                                      "logged step, from the Run's trainer_log.jsonl")]
         if curve else [])


def comparison_artifact(previous: Path, current: Path, text: str) -> ArtifactSpec:
    """``verifily compare`` of the previous dataset version's run against this one."""
    return ArtifactSpec("markdown", "comparison",
                        f"## Compared with the previous version's run\n\n{escape_markdown_html(text)}",
                        f"verifily compare {previous.name} {current.name}")
