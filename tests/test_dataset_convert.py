"""`dataset create` from where teams keep rows: Parquet, CSV, and datasets' save_to_disk folders."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import assert_user_error, run_cli
from verifily_train.dataset import create_version, load_manifest
from verifily_train.errors import DataError
from verifily_train.fixtures.data import make_conversations, make_rows, write_jsonl


def _parquet(path: Path, rows: list) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _csv(path: Path, rows: list) -> Path:
    """Tags flattened into ``tags.<key>`` columns, as a spreadsheet export has them."""
    keys = sorted({k for r in rows for k in r["tags"]})
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["instruction", "input", "output"] + [f"tags.{k}" for k in keys])
        for r in rows:
            writer.writerow([r["instruction"], r["input"], r["output"]] + [r["tags"].get(k, "") for k in keys])
    return path


def _jsonl_hash(tmp_path: Path, rows: list, name: str) -> str:
    return create_version("ds_ref", name, "sft", str(write_jsonl(tmp_path / f"{name}.jsonl", rows))).content_hash


def test_parquet_split_becomes_the_same_version_as_its_jsonl_on_every_conversion(tmp_path, verifily_home):
    rows = make_rows("sft", 30, 1)
    source = _parquet(tmp_path / "train.parquet", rows)  # tags as an Arrow struct
    first = create_version("ds_pq", "v1", "sft", str(source))
    second = create_version("ds_pq", "v2", "sft", str(source))
    assert first.content_hash == second.content_hash == _jsonl_hash(tmp_path, rows, "ref")
    assert first.num_rows == 30 and first.tags == ["difficulty", "length_bucket", "source"]
    manifest = json.loads(Path(first.manifest_path).read_text())
    assert manifest["converted_from"] == [{"format": "parquet", "name": "train.parquet", "rows": 30, "split": "train"}]
    assert load_manifest(first.manifest_path).content_hash == first.content_hash  # the stored JSONL verifies


def test_csv_split_with_flattened_tag_columns_converts_deterministically(tmp_path, verifily_home):
    rows = make_rows("sft", 20, 2)
    rows[0] = dict(rows[0], input="")  # an empty cell: no input
    source = _csv(tmp_path / "train.csv", rows)
    first = create_version("ds_csv", "v1", "sft", str(source), test=str(source))
    second = create_version("ds_csv", "v2", "sft", str(source), test=str(source))
    assert first.content_hash == second.content_hash
    stored = [json.loads(l) for l in (Path(first.data_path) / "train.jsonl").read_text().splitlines()]
    assert stored[0] == {k: v for k, v in rows[0].items() if k != "input"}
    assert stored[1:] == rows[1:]


def test_save_to_disk_folder_and_dataset_dict_become_versions(tmp_path, verifily_home):
    from datasets import Dataset, DatasetDict

    rows = {"train": make_rows("sft", 24, 3), "validation": make_rows("sft", 8, 4), "test": make_rows("sft", 8, 5)}
    single = tmp_path / "single"
    Dataset.from_list(rows["train"]).save_to_disk(str(single))
    one = create_version("ds_disk", "v1", "sft", str(single))
    assert one.content_hash == create_version("ds_disk", "v2", "sft", str(single)).content_hash
    assert one.content_hash == _jsonl_hash(tmp_path, rows["train"], "ref")

    folder = tmp_path / "dict"
    DatasetDict({k: Dataset.from_list(v) for k, v in rows.items()}).save_to_disk(str(folder))
    a = create_version("ds_dict", "v1", "sft", str(folder))
    b = create_version("ds_dict", "v2", "sft", str(folder))
    assert a.content_hash == b.content_hash
    assert {f.split: f.num_rows for f in a.files} == {"train": 24, "val": 8, "test": 8}
    partial = tmp_path / "partial"
    DatasetDict({"train": Dataset.from_list(rows["train"])}).save_to_disk(str(partial))
    with pytest.raises(DataError, match=r"partial: --test: the DatasetDict has no test split"):
        create_version("ds_dict", "v3", "sft", str(partial), test=str(partial))


def test_messages_column_in_parquet_is_a_conversation(tmp_path, verifily_home):
    rows = make_conversations(6, 1)
    dv = create_version("ds_conv", "v1", "sft", str(_parquet(tmp_path / "conv.parquet", rows)))
    assert dv.row_schema == {"sft": ["messages"]}
    stored = [json.loads(l) for l in (Path(dv.data_path) / "train.jsonl").read_text().splitlines()]
    assert stored == rows


def test_missing_column_is_one_line_naming_file_and_column(tmp_path, verifily_home):
    rows = [{"instruction": r["instruction"], "input": r["input"]} for r in make_rows("sft", 3, 1)]
    source = _parquet(tmp_path / "train.parquet", rows)
    with pytest.raises(DataError) as info:
        create_version("ds_bad", "v1", "sft", str(source))
    assert str(info.value) == (f"{source}: output: missing column for task sft (or a messages, prompt/completion or text column); "
                               "columns: instruction, input")
    result = run_cli("dataset", "create", "--id", "ds_bad", "--version", "v1", "--task", "classification",
                     "--train", str(source), cwd=tmp_path)
    assert_user_error(result, "train.parquet: text: missing column for task classification")


def test_bad_value_names_the_source_row(tmp_path, verifily_home):
    rows = make_rows("sft", 4, 1)
    rows[2] = dict(rows[2], output="")
    with pytest.raises(DataError, match=r"train.parquet: row 3: output: must not be empty"):
        create_version("ds_bad", "v1", "sft", str(_parquet(tmp_path / "train.parquet", rows)))
    source = _csv(tmp_path / "train.csv", rows)
    with pytest.raises(DataError, match=r"train.csv:4: output: missing required field"):  # header is line 1
        create_version("ds_bad", "v1", "sft", str(source))


def test_cli_creates_a_version_from_a_dataset_dict(tmp_path):
    from datasets import Dataset, DatasetDict

    folder = tmp_path / "dict"
    DatasetDict({"train": Dataset.from_list(make_rows("sft", 10, 1)),
                 "test": Dataset.from_list(make_rows("sft", 4, 2))}).save_to_disk(str(folder))
    result = run_cli("dataset", "create", "--id", "ds_cli", "--version", "v1", "--task", "sft", "--train", str(folder),
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "created ds_cli@v1  14 rows" in result.stdout
