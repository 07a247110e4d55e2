"""The attribution folder of ``attribute --rows``: summary (top rows, per-tag sums), attribution.json, report.html.

Written like a Run (``artifacts/run.py``): assembled in ``.staging-<name>``, checksummed, recorded in the
ledger, made read-only and renamed into place, so a reader sees all of it or none. Its name carries a key
of its content (the merged scores and the verification settings): the same call again finds it and
writes nothing.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Dict, List, Optional

from verifily_train.artifacts.row_report import render_rows_report
from verifily_train.artifacts.run import discard, publish_run, staging_dir
from verifily_train.attribution.output import RESULT, load_attribution
from verifily_train.attribution.rows import RESULT_FILE, summarize_by_tag
from verifily_train.checksums import CHECKSUMS
from verifily_train.config import load_config
from verifily_train.dataset.rows import iter_jsonl, shown_fields
from verifily_train.dataset.store import load_for_config
from verifily_train.errors import VerifilyError
from verifily_train.fsio import atomic_write_json, atomic_write_text
from verifily_train.hashing import content_hash
from verifily_train.model.render import final_answer
from verifily_train.model.tokenize import row_hash

# what a high score means, per method (attribution/rows/plan.py METHODS; docs/attribution.md)
MEANING = {
    "tracin": "estimated rise of the target's loss caused by training on the row, as if training were SGD "
              "(negative: it lowered it)",
    "tracin_adam": "estimated rise of the target's loss caused by the AdamW steps on the row (its gradient scaled "
                   "by the run's saved second moment; negative: it lowered it)",
    "self_influence": "squared gradient norm over the snapshots: rows the model had to move most for (suspect)",
    "loss": "the row's own training loss under the final adapter: rows the model could not fit (suspect: "
            "mislabelled, swapped or off-distribution)",
    "loss_mean": "the row's training loss averaged over the snapshots (suspect when high)",
    "label_issue": "1 - cleanlab's label quality: likely mislabelled when high (in-sample: from predictions of "
                   "a model trained on these rows, not out of fold)",
}
# what each family answers (rows.SUSPECT, rows.ATTRIBUTION)
FAMILY_QUESTION = {
    "suspect rows": "which rows look wrong (hard to fit, likely mislabelled); no target is read, and a high score "
                    "says nothing about what removing the row does",
    "attribution": "which rows raised or lowered the target's loss (estimated from gradients; --verify checks "
                   "the top rows by retraining)",
}
TOP_ROWS = 10  # rows shown per direction in the report, the CLI and the Prefect table
TEXT_CHARS = 300


def attribution_key(merge_output_hash: str, settings: dict) -> str:
    """The folder's content key: the merged scores and whatever else decides its content (verification)."""
    return content_hash("rows-attribution/1", merge_output_hash, settings)


def folder_name(run: Path, target: str, key: str) -> str:
    return f"{run.name}-rows-{re.sub(r'[^A-Za-z0-9._=-]+', '-', target.replace('!=', '-not-')).strip('-')}-{key[:10]}"


def default_parent(run: Path) -> Path:
    """``<project>/attributions`` beside the tag-level attributions (the run's runs folder's parent)."""
    return run.parent.parent / "attributions"


def _row(entry, method: str, methods: List[str]) -> dict:
    return {"rank": int(entry[f"rank_{method}"]), "score": float(entry[f"score_{method}"]),
            "example_id": str(entry["example_id"]), "file": entry["file"], "line": int(entry["line"]),
            "row_hash": str(entry["row_hash"]), "tags": json.loads(entry["tags"] or "{}"),
            "text": str(entry["text"] or "")[:TEXT_CHARS], "reference": str(entry["reference"] or "")[:TEXT_CHARS],
            "ranks": {m: int(entry[f"rank_{m}"]) for m in methods if m != method},
            "scores": {m: float(entry[f"score_{m}"]) for m in methods if m != method}}


def summarize(merged: dict, top: int = TOP_ROWS, run: Optional[Path] = None) -> dict:
    """Per family (suspect rows, attribution): its default method's top rows and per tag key the per-value sums.

    The top-level ``default_method``, ``most_harmful``, ``most_helpful`` and ``by_tag`` are those of the call's
    default method (what ``dataset derive --drop-top`` and ``--verify`` rank by). With the parent ``run``, an SFT
    row's ``text`` is its own fields (instruction and input, the prompt, the last user turn) and ``answer`` its
    reply, read from the Run's dataset, instead of the rendered chat template."""
    import pandas as pd

    table = pd.read_parquet(Path(merged["dir"]) / merged["file"])
    method, methods = merged["default_method"], list(merged["methods"])
    keys = sorted({k for tags in table["tags"] for k in json.loads(tags or "{}")})
    families = {}
    for family, entry in (merged.get("families") or {}).items():
        families[family] = dict(entry, question=FAMILY_QUESTION.get(family, ""),
                                meaning=MEANING.get(entry["default"], ""),
                                **_ranked(table, entry["default"], methods, keys, top))
    result = dict({"default_method": method, "methods": methods, "train_rows": int(len(table)),
                   "meaning": MEANING.get(method, ""), "orientation": merged["orientation"], "families": families},
                  **_ranked(table, method, methods, keys, top))
    if run is not None:
        shown = [r for part in [result] + list(families.values()) for key in ("most_harmful", "most_helpful")
                 for r in part[key]]
        own = train_row_fields(Path(run), {r["row_hash"] for r in shown})
        for r in shown:
            if r["row_hash"] in own:
                r.update(own[r["row_hash"]])
    return result


def train_row_fields(run: Path, row_hashes) -> Dict[str, dict]:
    """Per wanted row hash of an SFT Run's train split: ``text``, the row's own fields as a reader wants them, and
    ``answer``, its reply (none for a plain text row). Rows the Run's dataset no longer holds are left out."""
    wanted, found = set(row_hashes), {}
    try:
        cfg = load_config(str(run / "config.yaml"))
        if cfg.task != "sft" or not wanted:
            return {}
        dv = load_for_config(cfg.dataset_version, cfg.data_paths, cfg.task)
        for f in dv.split_files("train"):
            for _, row in iter_jsonl(Path(f.abs_path), f.abs_path):
                digest = row_hash(row)
                if digest in wanted and digest not in found:
                    fields = shown_fields(row, limit=TEXT_CHARS)
                    text = next(iter(fields.values())) if len(fields) == 1 else " | ".join(
                        f"{k}: {v}" for k, v in fields.items())
                    found[digest] = {"text": text, "answer": "" if "text" in fields else
                                     str(final_answer(row) or "")[:TEXT_CHARS]}
    except (VerifilyError, OSError, ValueError):  # the dataset moved or changed: the stored text stays
        return found
    return found


def _ranked(table, method: str, methods: List[str], keys: List[str], top: int) -> dict:
    ranked = table.sort_values(f"rank_{method}", kind="stable")
    return {"most_harmful": [_row(r, method, methods) for _, r in ranked.head(top).iterrows()],
            "most_helpful": [_row(r, method, methods) for _, r in ranked.tail(top).iloc[::-1].iterrows()],
            "by_tag": {k: summarize_by_tag(table, method, k) for k in keys}}


def existing(folder: Path) -> Optional[dict]:
    """The attribution.json of a complete folder (checksums written last), checked against its checksums (a
    changed byte is a ``RunError`` naming the file); None when the folder is not complete."""
    if (folder / CHECKSUMS).is_file() and (folder / RESULT).is_file():
        return load_attribution(folder)
    return None


def publish(folder: Path, merged: dict, result: dict) -> Path:
    """Stage, checksum, ledger, read-only, rename: the immutable attribution folder."""
    staging = staging_dir(folder.parent, folder.name)
    try:
        shutil.copyfile(Path(merged["dir"]) / merged["file"], staging / RESULT_FILE)
        atomic_write_json(staging / "attribution.json", result)
        atomic_write_text(staging / "report.html", render_rows_report(result))
        return publish_run(staging, folder)
    except BaseException:
        discard(staging)
        raise


def table_artifact_rows(result: dict) -> List[Dict[str, object]]:
    """The Prefect table: the most harmful rows, then the most helpful, with their score and text."""
    out = []
    for direction, rows in (("harmful", result["most_harmful"]), ("helpful", result["most_helpful"])):
        for r in rows:
            out.append({"direction": direction, "rank": r["rank"], f"score_{result['default_method']}": round(r["score"], 6),
                        "row": r["example_id"], "where": f"{r['file']}:{r['line']}",
                        "tags": ", ".join(f"{k}:{v}" for k, v in sorted(r["tags"].items())),
                        "text": r["text"][:120], "answer": str(r.get("answer", r.get("reference", "")))[:60]})
    return out
