"""Plain tables and markdown from a run summary: what orchestration UIs show (no Prefect here)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from dataclasses import dataclass
from typing import Any, List

SHOWN_METRICS = ("loss", "perplexity", "exact_match", "token_f1", "format_compliance", "accuracy", "macro_f1",
                 "gold_exact_match", "gold_token_f1", "baseline_loss", "train_loss", "train_steps")


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
            lead = next((m for m in ("loss", "accuracy", "exact_match") if m in metrics), None)
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


@dataclass(frozen=True)
class ArtifactSpec:
    """One orchestration-UI artifact: its kind (``table`` or ``markdown``), key, content and description."""

    kind: str
    key: str
    content: Any
    description: str


def run_artifacts(summary: dict) -> List[ArtifactSpec]:
    """What the UI shows on a completed Run (the flow's and a replay's alike)."""
    return [
        ArtifactSpec("table", "metrics", metrics_table(summary), "Overall metrics with 95% bootstrap intervals"),
        ArtifactSpec("table", "slices", slice_table(summary),
                     "Metrics by tag value (95% bootstrap intervals; delta vs overall). Correlation, not causation."),
        ArtifactSpec("markdown", "hard-examples", hard_examples_markdown(summary),
                     "Hardest test examples and the tags they concentrate in"),
        ArtifactSpec("markdown", "run", run_markdown(summary), "The Run artifact's path and reproducibility hash"),
    ]


def comparison_artifact(previous: Path, current: Path, text: str) -> ArtifactSpec:
    """``verifily compare`` of the previous dataset version's run against this one."""
    return ArtifactSpec("markdown", "comparison",
                        f"## Compared with the previous version's run\n\n{escape_markdown_html(text)}",
                        f"verifily compare {previous.name} {current.name}")
