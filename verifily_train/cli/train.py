"""``verifily train``: run the Prefect ``train`` flow in-process and print the run summary."""

from __future__ import annotations

import math
import os
import sys
from typing import List, Optional

CAVEAT = "Correlation, not causation: slices describe the model on those test rows. For causal attribution, see v2 roadmap."


def _quiet_libraries() -> None:
    # Logs still reach the Prefect API (and UI); only the console copy is silenced. A user error is then
    # one line from the CLI, and a bug keeps the traceback Python prints.
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # read by transformers at import: no per-weight loading bars, no advisory warnings in the summary
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)


def _preload_fingerprint_modules() -> None:
    """Import what the fingerprint stage needs (torch, transformers' config classes) while the server boots."""
    import torch  # noqa: F401
    from transformers import AutoConfig  # noqa: F401
    from transformers.models.auto import modeling_auto  # noqa: F401


def _fmt(value) -> str:
    if isinstance(value, float):
        return "nan" if not math.isfinite(value) else f"{value:.4f}"
    return str(value)


def _ci(entry: dict, name: str) -> str:
    low_high = entry.get("ci95", {}).get(name)
    return f" [{_fmt(low_high[0])}, {_fmt(low_high[1])}]" if low_high else ""


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
        w("  stages: " + "  ".join(f"{name} {'cached' if s['cache_hit'] else 'ran'} {s['seconds'] or 0:.1f}s"
                                   for name, s in stages.items()) + "\n")
    shown = [k for k in ("loss", "perplexity", "exact_match", "token_f1", "format_compliance", "accuracy", "macro_f1")
             if k in metrics]
    overall = summary["slices"].get("overall", {})
    w("  metrics: " + "  ".join(f"{k}={_fmt(metrics[k])}{_ci(overall, k)}" for k in shown) + "\n")
    w(f"  train_loss={_fmt(metrics.get('train_loss'))}  steps={metrics.get('train_steps')}"
      f"  truncated_rows={metrics.get('truncated_rows')}\n")
    if "baseline_loss" in metrics:
        w(f"  base model (untuned): loss={_fmt(metrics['baseline_loss'])}  "
          f"perplexity={_fmt(metrics.get('baseline_perplexity'))}  -> fine-tuned loss={_fmt(metrics.get('loss'))}\n")
    if "gold_exact_match" in metrics:
        w(f"  gold set: exact_match={_fmt(metrics['gold_exact_match'])}  token_f1={_fmt(metrics['gold_token_f1'])}"
          f"  ({metrics.get('gold_examples')} rows)\n")
    lead = shown[0] if shown else None
    for key, block in summary["slices"].get("slices", {}).items():
        w(f"\n  slices by {key} (95% bootstrap interval):\n")
        has_base = any("baseline" in e for e in block["values"])
        extra = [k for k in shown[1:] if k != "perplexity"]
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
    w(f"\n  run: {summary['path']}\n  reproducibility_hash: {record['reproducibility_hash']}\n")
    if summary.get("pushed_to"):
        w(f"  adapter pushed to {summary['pushed_to']}\n")


def _start_prefect_early():
    """Without PREFECT_API_URL a flow run first boots Prefect's temporary server (~5 s): start that
    subprocess now, so it boots on the other core while this process imports torch and transformers."""
    import threading

    if os.environ.get("PREFECT_API_URL"):
        return None

    def boot():
        from prefect.server.api.server import SubprocessASGIServer
        from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ALLOW_EPHEMERAL_MODE

        if not PREFECT_API_URL.value() and PREFECT_SERVER_ALLOW_EPHEMERAL_MODE.value():
            SubprocessASGIServer().start()  # the same singleton the flow's client uses

    thread = threading.Thread(target=boot, name="prefect-server-boot", daemon=True)
    thread.start()
    return thread


def run_train(config: Optional[str], overrides: List[str], dataset: Optional[str], refresh: bool = False) -> int:
    _quiet_libraries()
    booting = _start_prefect_early()
    from verifily_train.flows.train import train

    _preload_fingerprint_modules()
    if booting is not None:
        booting.join()  # a half-started server must not be handed to the flow
    summary = train(config=config, overrides=overrides, dataset=dataset, refresh=refresh)
    print_summary(summary)
    return 0


def run_reproduce(original) -> int:
    """Re-run a completed Run from its recorded config with the cache off; print the comparison."""
    from pathlib import Path

    from verifily_train.artifacts.reproduce import compare_reproduction, render_reproduction
    from verifily_train.artifacts.run import load_run_json
    from verifily_train.errors import RunError

    record = load_run_json(original)
    if record.get("status") != "completed":
        raise RunError(original, None, f"status is {record.get('status')!r}; only completed runs can be reproduced")
    _quiet_libraries()
    from verifily_train.flows.train import train

    summary = train(config=str(Path(original) / "config.yaml"), overrides=["cache.enabled=false"],
                    runs_dir=str(Path(original).parent))
    report = compare_reproduction(Path(original), Path(summary["path"]))
    print(render_reproduction(report))
    return 0 if report["reproduced_exactly"] else 1
