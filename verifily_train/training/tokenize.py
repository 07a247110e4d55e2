"""Tokenize a DatasetVersion's splits into parquet files of token ids, with per-example metadata."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from verifily_train.config.schema import PromptSection
from verifily_train.dataset.rows import iter_jsonl, label_of
from verifily_train.dataset.version import DatasetVersion
from verifily_train.errors import ModelError
from verifily_train.training.models import KIND_CAUSAL, KIND_SEQ2SEQ, ModelSpec


def render_prompt(row: dict, prompt: PromptSection) -> str:
    """The SFT prompt: ``template`` when the row has a non-empty input, else ``template_no_input``."""
    inp = row.get("input") or ""
    if str(inp).strip():
        return prompt.template.format(instruction=row["instruction"], input=inp)
    return prompt.template_no_input.format(instruction=row["instruction"], input="")


def example_id(row: dict, split: str, lineno: int) -> str:
    """A row's own ``id`` when it has one, else ``split:line``."""
    rid = row.get("id")
    return str(rid) if isinstance(rid, (str, int)) and not isinstance(rid, bool) else f"{split}:{lineno}"


def _truncate_causal(prompt_ids: List[int], target_ids: List[int], max_len: int) -> Tuple[List[int], List[int], bool]:
    """Fit prompt + target into ``max_len``; the target keeps at least half the window so loss is never empty."""
    if len(prompt_ids) + len(target_ids) <= max_len:
        return prompt_ids, target_ids, False
    keep_target = min(len(target_ids), max(max_len - len(prompt_ids), max_len // 2))
    return prompt_ids[: max_len - keep_target], target_ids[:keep_target], True


@dataclass
class TokenizedExample:
    example_id: str
    split: str
    line: int
    input_ids: List[int]
    labels: List[int]
    label: int
    truncated: bool
    tags: Dict[str, str]
    text: str
    reference: str
    row_hash: str = ""


def tokenize_row(row: dict, split: str, lineno: int, spec: ModelSpec, tok, task: str, prompt: PromptSection,
                 max_len: int, label_ids: Dict[str, int]) -> TokenizedExample:
    """One row to token ids (and loss labels) for the model kind."""
    tags = {str(k): str(v) for k, v in (row.get("tags") or {}).items()}
    eid = example_id(row, split, lineno)
    example = _tokenize_row(row, split, lineno, spec, tok, task, prompt, max_len, label_ids, tags, eid)
    example.row_hash = row_hash(row)
    return example


def row_hash(row: dict) -> str:
    """SHA-256 of the row's canonical JSON: the same row in two dataset versions has the same hash."""
    import hashlib

    return hashlib.sha256(json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
                          .encode("utf-8")).hexdigest()


def _tokenize_row(row: dict, split: str, lineno: int, spec: ModelSpec, tok, task: str, prompt: PromptSection,
                  max_len: int, label_ids: Dict[str, int], tags: Dict[str, str], eid: str) -> TokenizedExample:
    if task == "classification":
        enc = tok(row["text"], add_special_tokens=True)["input_ids"]
        truncated = len(enc) > max_len
        return TokenizedExample(eid, split, lineno, enc[:max_len], [], label_ids[label_of(row)], truncated, tags,
                                row["text"], label_of(row))
    prompt_text = render_prompt(row, prompt)
    prompt_ids = tok(prompt_text, add_special_tokens=True)["input_ids"]
    target_ids = tok(row["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    if spec.kind == KIND_CAUSAL:
        p_ids, t_ids, truncated = _truncate_causal(prompt_ids, target_ids, max_len)
        # loss only on the response: prompt positions are masked with -100
        return TokenizedExample(eid, split, lineno, p_ids + t_ids, [-100] * len(p_ids) + t_ids, -1, truncated, tags,
                                prompt_text, row["output"])
    truncated = len(prompt_ids) > max_len or len(target_ids) > max_len
    return TokenizedExample(eid, split, lineno, prompt_ids[:max_len], target_ids[:max_len], -1, truncated, tags,
                            prompt_text, row["output"])


def collect_labels(dv: DatasetVersion) -> List[str]:
    """The classification label set: every label of the train split, sorted."""
    labels = set()
    for f in dv.split_files("train"):
        for _, row in iter_jsonl(Path(f.abs_path), f.abs_path):
            labels.add(label_of(row))
    return sorted(labels)


def choose_eval_split(dv: DatasetVersion) -> Tuple[Optional[str], str]:
    """Test when present, else val (said so), else none (said so) -- spec open question 5."""
    if dv.has_split("test"):
        return "test", "evaluated on the test split"
    if dv.has_split("val"):
        return "val", "no test split: evaluated on the val split instead"
    return None, "no test or val split: evaluation skipped"


def write_split(examples: List[TokenizedExample], path: Path) -> None:
    """One parquet file per split: token ids plus everything a report needs about the row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "example_id": [e.example_id for e in examples],
        "split": [e.split for e in examples],
        "line": pa.array([e.line for e in examples], pa.int32()),
        "input_ids": pa.array([e.input_ids for e in examples], pa.list_(pa.int32())),
        "labels": pa.array([e.labels for e in examples], pa.list_(pa.int32())),
        "label": pa.array([e.label for e in examples], pa.int32()),
        "truncated": [e.truncated for e in examples],
        "tags": [json.dumps(e.tags, sort_keys=True) for e in examples],
        "text": [e.text for e in examples],
        "reference": [e.reference for e in examples],
        "row_hash": [e.row_hash for e in examples],
    })
    pq.write_table(table, path)


def tokenize_dataset(dv: DatasetVersion, spec: ModelSpec, tok, task: str, prompt: PromptSection, max_len: int,
                     out_dir: Path) -> dict:
    """Tokenize every split into ``out_dir/<split>.parquet``; returns the stage manifest."""
    if spec.kind in (KIND_CAUSAL, KIND_SEQ2SEQ) and tok.eos_token_id is None:
        raise ModelError(spec.source, "base_model", "tokenizer has no eos token, needed to end SFT targets")
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = collect_labels(dv) if task == "classification" else []
    label_ids = {name: i for i, name in enumerate(labels)}
    splits = {}
    for split in ("train", "val", "test"):
        files = dv.split_files(split)
        if not files:
            continue
        examples = []
        for f in files:
            for lineno, row in iter_jsonl(Path(f.abs_path), f.abs_path):
                examples.append(tokenize_row(row, split, lineno, spec, tok, task, prompt, max_len, label_ids))
        name = f"{split}.parquet"
        write_split(examples, out_dir / name)
        splits[split] = {
            "file": name,
            "rows": len(examples),
            "truncated": sum(e.truncated for e in examples),
            "tokens": sum(len(e.input_ids) + (len(e.labels) if spec.kind == KIND_SEQ2SEQ else 0) for e in examples),
        }
    eval_split, eval_note = choose_eval_split(dv)
    return {
        "stage": "tokenize",
        "splits": splits,
        "labels": labels,
        "eval_split": eval_split,
        "eval_note": eval_note,
        "truncated_rows": sum(s["truncated"] for s in splits.values()),
        "max_seq_length": max_len,
    }


class TokenizedSplit:
    """A torch-style dataset over one split's parquet file (what the Trainer and evaluation read)."""

    def __init__(self, path: Path, task: str):
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        self.columns = table.to_pydict()
        self.task = task

    def __len__(self) -> int:
        return len(self.columns["input_ids"])

    def __getitem__(self, i: int) -> dict:
        item = {"input_ids": self.columns["input_ids"][i]}
        if self.task == "classification":
            item["labels"] = self.columns["label"][i]
        else:
            item["labels"] = self.columns["labels"][i]
        return item
