"""DatasetVersion: manifests (ours and hand-written), tamper detection, row validation, the immutable store."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from verifily_train.dataset import create_version, dataset_from_paths, list_versions, load_manifest, resolve
from verifily_train.errors import DataError, DatasetExistsError, DatasetNotFoundError, ManifestError
from verifily_train.fixtures.data import write_jsonl

ROWS = [
    {"instruction": "Give the opposite.", "input": "hot", "output": "cold", "tags": {"source": "human", "difficulty": "easy"}},
    {"instruction": "Give the opposite.", "output": "down", "tags": {"source": "synthetic", "difficulty": "hard"}},
]


def handwritten_version(folder: Path, rows=ROWS, mutate=None) -> Path:
    """A manifest written the way the Verifily platform writes one (spec §7.1), not by this tool."""
    folder.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    (folder / "train.jsonl").write_bytes(data)
    (folder / "test.jsonl").write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    manifest = {
        "dataset_id": "ds_abc123", "version": "v3", "format": "jsonl", "task": "sft", "num_rows": 2 * len(rows),
        "content_hash": "sha256:" + hashlib.sha256(data + data).hexdigest(),
        "created_at": "2026-02-08T12:00:00Z", "tag_keys": ["source", "difficulty"],
        "files": [
            {"path": "train.jsonl", "split": "train", "num_rows": len(rows), "sha256": sha},
            {"path": "test.jsonl", "split": "test", "num_rows": len(rows), "sha256": sha},
        ],
        "row_schema": {"sft": ["instruction", "input", "output"], "classification": ["text", "label"]},
        "tag_schema": {
            "source": {"type": "categorical", "values": ["human", "synthetic", "ai_contaminated"]},
            "difficulty": {"type": "categorical", "values": ["easy", "medium", "hard"]},
        },
    }
    if mutate:
        mutate(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return folder / "manifest.json"


def test_handwritten_spec_manifest_loads(tmp_path):
    dv = load_manifest(handwritten_version(tmp_path / "v3"))
    assert dv.ref == "ds_abc123@v3" and dv.task == "sft" and dv.num_rows == 4
    assert dv.tags == ["source", "difficulty"] and dv.has_split("test") and not dv.has_split("val")
    assert dv.content_hash.startswith("sha256:")


def test_content_hash_is_sha256_of_files_in_sorted_path_order(tmp_path):
    dv = load_manifest(handwritten_version(tmp_path / "v3"))
    test = (tmp_path / "v3/test.jsonl").read_bytes()
    train = (tmp_path / "v3/train.jsonl").read_bytes()
    assert dv.content_hash == "sha256:" + hashlib.sha256(test + train).hexdigest()  # "test" < "train"


@pytest.mark.parametrize("mutate, key", [
    (lambda m: m["files"][1].update(sha256="0" * 64), "files[1].sha256"),
    (lambda m: m.update(content_hash="sha256:" + "0" * 64), "content_hash"),
    (lambda m: m["files"][0].update(path="../outside.jsonl"), "files[0].path"),
    (lambda m: m["files"][0].update(path="/etc/passwd"), "files[0].path"),
    (lambda m: m["files"][0].update(path="missing.jsonl"), "files[0].path"),
    (lambda m: m["files"][0].update(split="holdout"), "files[0].split"),
    (lambda m: m["files"][0].update(num_rows=99), "files[0].num_rows"),
    (lambda m: m.update(num_rows=5), "num_rows"),
    (lambda m: m.pop("dataset_id"), "dataset_id"),
    (lambda m: m.update(task="dpo"), "task"),
    (lambda m: m.update(format="csv"), "format"),
    (lambda m: m.update(files=[]), "files"),
])
def test_bad_manifest_is_named_by_key(tmp_path, mutate, key):
    path = handwritten_version(tmp_path / "v3", mutate=mutate)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert str(info.value).startswith(f"{path}: {key}:"), str(info.value)


def test_symlink_out_of_version_folder_is_rejected(tmp_path):
    path = handwritten_version(tmp_path / "v3")
    outside = tmp_path / "elsewhere.jsonl"
    outside.write_bytes((tmp_path / "v3/train.jsonl").read_bytes())
    (tmp_path / "v3/train.jsonl").unlink()
    os.symlink(outside, tmp_path / "v3/train.jsonl")
    with pytest.raises(ManifestError, match="outside the version folder"):
        load_manifest(path)


def test_malformed_manifest_json(tmp_path):
    (tmp_path / "manifest.json").write_text('{"dataset_id": ')
    with pytest.raises(ManifestError, match="malformed JSON"):
        load_manifest(tmp_path / "manifest.json")


@pytest.mark.parametrize("row, fragment", [
    ({"instruction": "x", "tags": {"source": "human"}}, ":1: output: missing required field"),
    ({"instruction": 3, "output": "y"}, ":1: instruction: must be a string"),
    ({"instruction": "x", "output": "y", "tags": {"source": "scraped"}}, ":1: tags.source: value 'scraped'"),
    ({"instruction": "x", "output": "y", "tags": {"colour": "red"}}, ":1: tags.colour: tag key not declared"),
    ({"instruction": "x", "output": "y", "tags": ["human"]}, ":1: tags: must be an object"),
    ({"instruction": "x", "output": ""}, ":1: output: must not be empty"),
])
def test_bad_row_names_file_line_and_field(tmp_path, row, fragment):
    path = handwritten_version(tmp_path / "v3", rows=[row])
    with pytest.raises(DataError) as info:
        load_manifest(path)
    message = str(info.value)
    assert message.startswith(str(tmp_path / "v3" / "train.jsonl")) and fragment in message, message


def test_malformed_json_line_and_non_utf8_are_named(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    with pytest.raises(DataError, match=r"train.jsonl:2: malformed JSON"):
        dataset_from_paths("sft", str(train))
    train.write_bytes(json.dumps(ROWS[0]).encode() + b"\n\xff\xfe\n")
    with pytest.raises(DataError, match=r"train.jsonl:2: not valid UTF-8"):
        dataset_from_paths("sft", str(train))


def test_empty_split_is_an_error(tmp_path):
    (tmp_path / "train.jsonl").write_text("\n")
    with pytest.raises(DataError, match="has no rows"):
        dataset_from_paths("sft", str(tmp_path / "train.jsonl"))


def test_test_label_missing_from_train_names_file_and_line(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}])
    test = write_jsonl(tmp_path / "test.jsonl", [{"text": "a", "label": "pos"}, {"text": "c", "label": "meh"}])
    with pytest.raises(DataError) as info:
        dataset_from_paths("classification", str(train), test=str(test))
    assert str(info.value).startswith(f"{test}:2: label: label 'meh' does not occur in the train split")


def test_create_then_verify_round_trips(tmp_path, verifily_home, sft_splits):
    dv = create_version("ds_x", "v1", "sft", str(sft_splits["train"]), str(sft_splits["val"]), str(sft_splits["test"]))
    assert dv.ref == "ds_x@v1" and dv.num_rows == 48 + 16 + 40
    assert dv.tags == ["difficulty", "length_bucket", "source"]
    assert dv.tag_schema["source"]["values"] == ["ai_contaminated", "human", "synthetic"]
    again = resolve("ds_x@v1")
    assert again.content_hash == dv.content_hash
    assert Path(dv.manifest_path).parent == verifily_home / "datasets" / "ds_x" / "v1"


def test_data_paths_give_the_same_content_hash_as_the_store(tmp_path, sft_splits):
    stored = create_version("ds_x", "v1", "sft", str(sft_splits["train"]), str(sft_splits["val"]), str(sft_splits["test"]))
    direct = dataset_from_paths("sft", str(sft_splits["train"]), str(sft_splits["val"]), str(sft_splits["test"]))
    assert direct.content_hash == stored.content_hash and direct.num_rows == stored.num_rows


def test_store_refuses_to_overwrite_a_version(sft_splits):
    create_version("ds_x", "v1", "sft", str(sft_splits["train"]))
    with pytest.raises(DatasetExistsError, match="already exists"):
        create_version("ds_x", "v1", "sft", str(sft_splits["test"]))


def test_stored_version_is_read_only(sft_splits):
    dv = create_version("ds_x", "v1", "sft", str(sft_splits["train"]))
    folder = Path(dv.manifest_path).parent
    for path in [folder, *folder.iterdir()]:
        assert not (path.stat().st_mode & 0o222), path


def test_one_changed_byte_makes_verify_name_the_file(sft_splits):
    dv = create_version("ds_x", "v1", "sft", str(sft_splits["train"]), test=str(sft_splits["test"]))
    target = Path(dv.manifest_path).parent / "test.jsonl"
    os.chmod(target, 0o644)
    data = bytearray(target.read_bytes())
    data[10] = ord("X") if data[10] != ord("X") else ord("Y")
    target.write_bytes(bytes(data))
    with pytest.raises(ManifestError) as info:
        resolve("ds_x@v1")
    assert "files[1].sha256: does not match test.jsonl" in str(info.value)


def test_refs_latest_and_content_hash(sft_splits):
    v1 = create_version("ds_x", "v1", "sft", str(sft_splits["train"]))
    v2 = create_version("ds_x", "v2", "sft", str(sft_splits["test"]))
    assert resolve("ds_x@latest").version == "v2"
    assert resolve(f"ds_x@{v1.content_hash[:20]}").version == "v1"
    assert resolve(v2.manifest_path).version == "v2"
    assert [v["ref"] for v in list_versions()] == ["ds_x@v1", "ds_x@v2"]


@pytest.mark.parametrize("ref, fragment", [
    ("ds_nope@v1", "dataset 'ds_nope' not found"),
    ("ds_x@v9", "version 'v9' not found (versions: v1)"),
    ("ds_x@sha256:0000000000000", "no version has this content hash"),
    ("missing/manifest.json", "no such manifest"),
])
def test_unresolvable_refs_say_why(sft_splits, ref, fragment):
    create_version("ds_x", "v1", "sft", str(sft_splits["train"]))
    with pytest.raises(DatasetNotFoundError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        resolve(ref)
