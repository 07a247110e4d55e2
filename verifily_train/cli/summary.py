"""The run summary ``verifily train`` (and replay, reproduce, demo) prints: metrics with intervals, stages, slice
tables, the hard-example headline, the Run's path and its hashes."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Optional

from verifily_train.artifacts.run import integrity_root, load_run_json
from verifily_train.artifacts.tables import ordered_slices
from verifily_train.config.metricspec import all_names, metric

CAVEAT = ("Correlation, not causation: slices describe the model on those test rows. For causal attribution: "
          "verifily attribute RUN --by <tag>.")


def _fmt(value) -> str:
    if isinstance(value, float):
        return "nan" if not math.isfinite(value) else f"{value:.4f}"
    return str(value)


def _ci(entry: dict, name: str) -> str:
    low_high = entry.get("ci95", {}).get(name)
    return f" [{_fmt(low_high[0])}, {_fmt(low_high[1])}]" if low_high else ""


def render_line(prompt: Optional[dict], check: Optional[dict]) -> Optional[str]:
    """One line on how SFT rows were rendered and what the render check found (None for classification)."""
    if not prompt or not check:
        return None
    how = (f"chat template {prompt['chat_template_sha256'][:12]}" if prompt["format"] == "chat"
           else "prompt.template")
    ends = "/".join(prompt.get("end_of_turn") or []) or "EOS"
    dropped = f", {check['dropped']} dropped" if check["dropped"] else ""
    return (f"prompt: {how}; render check: {check['rows']} rows, each supervises its answer and {ends}"
            f"{dropped}, {check['answer_cut']} answers shortened")


def _stage_word(name: str, stage: dict, metrics: dict) -> str:
    """``train ran 3.1s``, ``tokenize cached 0.0s``; ``baseline skipped`` where no base model was evaluated
    (classification, eval.baseline: false), not "ran 0.0s"."""
    if name == "baseline" and "baseline_loss" not in metrics:
        return "baseline skipped"
    return f"{name} {'cached' if stage['cache_hit'] else 'ran'} {stage['seconds'] or 0:.1f}s"


def print_summary(summary: dict, out=sys.stdout) -> None:
    """Overall metrics with intervals, slice table, hard-example headline, path and reproducibility hash."""
    record = summary["record"]
    metrics = record["metrics"]
    w = out.write
    w(f"\nRun {summary['run_id']} completed in {record['duration_seconds']:.1f}s "
      f"({record['job']['device']}, {record['precision']})\n")
    for warning in record.get("warnings", []):
        w(f"  warning: {warning}\n")
    w(f"  {record['evaluation']['note']}\n")
    stages = record.get("stages", {})
    if stages:
        w("  stages: " + "  ".join(_stage_word(name, s, metrics) for name, s in stages.items()) + "\n")
    shown = [name for name in all_names() if name in metrics]
    overall = summary["slices"].get("overall", {})
    w("  metrics: " + "  ".join(f"{k}={_fmt(metrics[k])}{_ci(overall, k)}" for k in shown) + "\n")
    w(f"  train_loss={_fmt(metrics.get('train_loss'))}  steps={metrics.get('train_steps')}"
      f"  truncated_rows={metrics.get('truncated_rows')}\n")
    line = render_line(record.get("prompt"), record.get("render_check"))
    if line:
        w(f"  {line}\n")
    if "baseline_loss" in metrics:
        w(f"  base model (untuned): loss={_fmt(metrics['baseline_loss'])}  "
          f"perplexity={_fmt(metrics.get('baseline_perplexity'))}  -> fine-tuned loss={_fmt(metrics.get('loss'))}\n")
    if "gold_exact_match" in metrics:
        w(f"  gold set: exact_match={_fmt(metrics['gold_exact_match'])}  token_f1={_fmt(metrics['gold_token_f1'])}"
          f"  ({metrics.get('gold_examples')} rows)\n")
    lead = shown[0] if shown else None
    for key, block in ordered_slices(summary):
        w(f"\n  slices by {key} (95% bootstrap interval):\n")
        has_base = any("baseline" in e for e in block["values"])
        extra = [k for k in shown[1:] if metric(k).function_of is None]  # perplexity moves with loss: not beside it
        rows = [["value", "n", f"{lead} [95% CI]", f"Δ{lead}"] + extra + ([f"base {lead}"] if has_base else [])]
        for entry in block["values"]:
            m = entry["metrics"]
            flag = " (low n)" if entry["low_confidence"] else ""
            rows.append([f"{entry['value']}{flag}", str(entry["n"]), f"{_fmt(m.get(lead))}{_ci(entry, lead)}",
                         f"{entry['delta'].get(lead, float('nan')):+.4f}"] + [_fmt(m.get(k)) for k in extra] +
                        ([_fmt(entry.get("baseline", {}).get(lead))] if has_base else []))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            w("    " + "  ".join(c.ljust(wd) for c, wd in zip(r, widths)).rstrip() + "\n")
    headline = summary["hard_examples"].get("headline")
    if headline:
        w(f"\n  hard examples: {headline} (hard_examples.jsonl)\n")
    if summary["slices"].get("slices"):
        w(f"  {CAVEAT}\n")
    w(f"\n  run: {summary['path']}\n")
    if (Path(summary["path"]) / "report.html").is_file():
        w(f"  report: {Path(summary['path']) / 'report.html'}  (open in a browser)\n")
    w(f"  reproducibility_hash: {record['reproducibility_hash']}\n")
    if summary.get("integrity_root"):  # kept elsewhere, it verifies the Run anywhere: verifily runs verify RUN --root
        w(f"  integrity_root: {summary['integrity_root']}\n")
    if summary.get("pushed_to"):
        w(f"  adapter pushed to {summary['pushed_to']}\n")


def summary_from_run(path: str) -> dict:
    """What :func:`print_summary` needs, read back from a published Run's files."""
    record = load_run_json(Path(path))
    slices = json.loads((Path(path) / "slices.json").read_text(encoding="utf-8"))
    return {"run_id": record["run_id"], "path": path, "record": record, "slices": slices,
            "hard_examples": {"headline": record.get("hard_examples_headline")},
            "integrity_root": integrity_root(Path(path) / "checksums.sha256")}
