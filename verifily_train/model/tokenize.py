"""Tokenize a DatasetVersion's splits into parquet files of token ids, with per-example metadata (rendering: ``render``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from verifily_train.config.schema import PromptSection
from verifily_train.dataset.rows import iter_jsonl, label_of, tag_text
from verifily_train.dataset.version import SPLITS, DatasetVersion
from verifily_train.errors import DataError
from verifily_train.model.loading import KIND_SEQ2SEQ, ModelSpec
from verifily_train.model.render import RowRenderer, final_answer, render_prompt  # noqa: F401  (render_prompt: re-exported)


def example_id(row: dict, split: str, lineno: int) -> str:
    """A row's own ``id`` when it has one, else ``split:line``."""
    rid = row.get("id")
    return str(rid) if isinstance(rid, (str, int)) and not isinstance(rid, bool) else f"{split}:{lineno}"


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
    prompt_len: int = 0  # leading input_ids that form the generation prompt of the final answer
    answer_cut: bool = False  # the training target was shortened to fit (its end token kept)


def row_hash(row: dict) -> str:
    """SHA-256 of the row's canonical JSON: the same row in two dataset versions has the same hash."""
    import hashlib

    return hashlib.sha256(json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
                          .encode("utf-8")).hexdigest()


def tokenize_row(row: dict, split: str, lineno: int, spec: ModelSpec, tok, task: str, max_len: int,
                 label_ids: Dict[str, int], renderer: Optional[RowRenderer], where: str) -> Optional[TokenizedExample]:
    """One row to token ids (and loss labels) for the model kind; None when nothing in it can be supervised."""
    tags = {str(k): tag_text(v) for k, v in (row.get("tags") or {}).items()}  # NFC: one value, one slice
    eid = example_id(row, split, lineno)
    if task == "classification":
        enc = tok(row["text"], add_special_tokens=True)["input_ids"]
        example = TokenizedExample(eid, split, lineno, enc[:max_len], [], label_ids[label_of(row)], len(enc) > max_len,
                                   tags, row["text"], label_of(row), prompt_len=min(len(enc), max_len))
    else:
        _, fitted = renderer.fit(row, where)
        if fitted.encoded is None:
            return None
        enc = fitted.encoded
        # the reference is the whole answer, even when the training target had to be shortened
        example = TokenizedExample(eid, split, lineno, enc.input_ids, enc.labels, -1, fitted.truncated, tags,
                                   enc.prompt_text, final_answer(row), prompt_len=enc.prompt_len,
                                   answer_cut=fitted.answer_cut)
    example.row_hash = row_hash(row)
    return example


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
        "prompt_len": pa.array([e.prompt_len for e in examples], pa.int32()),
        "answer_cut": [e.answer_cut for e in examples],
    })
    pq.write_table(table, path)


def tokenize_dataset(dv: DatasetVersion, spec: ModelSpec, tok, task: str, prompt: PromptSection, max_len: int,
                     out_dir: Path) -> dict:
    """Tokenize every split into ``out_dir/<split>.parquet``, render-checking each row; returns the stage manifest."""
    renderer = RowRenderer(spec, tok, prompt, max_len) if task == "sft" else None
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = collect_labels(dv) if task == "classification" else []
    label_ids = {name: i for i, name in enumerate(labels)}
    splits, first = {}, None
    for split in SPLITS:
        files = dv.split_files(split)
        if not files:
            continue
        examples, dropped = [], 0
        for f in files:
            for lineno, row in iter_jsonl(Path(f.abs_path), f.abs_path):
                where = f"{f.abs_path}:{lineno}"
                example = tokenize_row(row, split, lineno, spec, tok, task, max_len, label_ids, renderer, where)
                if example is None:
                    if prompt.unsupervised_rows != "drop":
                        raise DataError(where, None, renderer.unsupervised_problem(renderer.fit(row, where)[1]))
                    dropped += 1
                    continue
                examples.append(example)
        if not examples:
            raise DataError(files[0].abs_path, None, f"split {split}: every row was dropped (prompt.unsupervised_rows: drop)")
        first = first or examples[0]
        name = f"{split}.parquet"
        write_split(examples, out_dir / name)
        splits[split] = {
            "file": name,
            "rows": len(examples),
            "truncated": sum(e.truncated for e in examples),
            "answer_cut": sum(e.answer_cut for e in examples),
            "dropped": dropped,
            "tokens": sum(len(e.input_ids) + (len(e.labels) if spec.kind == KIND_SEQ2SEQ else 0) for e in examples),
        }
    eval_split, eval_note = choose_eval_split(dv)
    manifest = {
        "stage": "tokenize",
        "splits": splits,
        "labels": labels,
        "eval_split": eval_split,
        "eval_note": eval_note,
        "truncated_rows": sum(s["truncated"] for s in splits.values()),
        "max_seq_length": max_len,
        "prompt": None,
        "render_check": None,
        "stop_token_ids": [tok.eos_token_id] if tok.eos_token_id is not None else [],
        "warnings": [],
    }
    if renderer is not None:
        manifest.update(render_report(renderer, tok, first, splits, prompt, max_len))
    return manifest


def render_report(renderer: RowRenderer, tok, example: TokenizedExample, splits: Dict[str, dict],
                  prompt: PromptSection, max_len: int) -> dict:
    """The rendering as the Run records it (an example row, the template hash), the render check's counts and warnings."""
    supervised = [t for t, label in zip(example.input_ids, example.labels) if label != -100]
    if renderer.spec.kind == KIND_SEQ2SEQ:
        supervised = list(example.labels)
    end_tokens = sorted({t for t in supervised if t in renderer.end_ids})
    described = dict(renderer.describe(), end_of_turn=tok.convert_ids_to_tokens(end_tokens), example={
        "example_id": example.example_id,
        "text": tok.decode(example.input_ids, skip_special_tokens=False),
        "supervised": tok.decode(supervised, skip_special_tokens=False),
    })
    rows = sum(s["rows"] for s in splits.values())
    dropped = sum(s["dropped"] for s in splits.values())
    check = {"rows": rows, "end_token_supervised": rows, "dropped": dropped,
             "answer_cut": sum(s["answer_cut"] for s in splits.values()),
             "unsupervised_rows": prompt.unsupervised_rows}
    warnings = []
    truncated = {name: s["truncated"] for name, s in splits.items() if s["truncated"]}
    if truncated:
        per = ", ".join(f"{name} {n} of {splits[name]['rows']}" for name, n in truncated.items())
        warnings.append(f"{sum(truncated.values())} rows longer than training.max_seq_length={max_len} were cut ({per}): "
                        f"user content at its {prompt.truncation}, the assistant header and the answer's end token "
                        f"kept; {check['answer_cut']} answers shortened")
    if dropped:
        per = ", ".join(f"{name} {s['dropped']}" for name, s in splits.items() if s["dropped"])
        warnings.append(f"{dropped} rows dropped ({per}): their answer could not keep one token within "
                        f"training.max_seq_length={max_len} (prompt.unsupervised_rows: drop)")
    return {"prompt": described, "render_check": check, "warnings": warnings,
            "stop_token_ids": sorted({tok.eos_token_id, *end_tokens})}


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
