"""Bad input catalogue: each row is one bad input a user can give. Every one must end in one clear line
naming the place, exit code 2, no traceback, nothing under runs/ claiming completion, and the dataset
store unchanged."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import edit_config, cli_env, write_config
from verifily_train.hashing import hash_tree

pytestmark = pytest.mark.slow


def _sft(folder: Path, models, **sections) -> dict:
    from verifily_train.fixtures.data import write_splits

    splits = write_splits(folder / "data", "sft", {"train": 24, "val": 8, "test": 8}, seed=3)
    write_config(folder, "sft", models["llama"], splits, **sections)
    return splits


def _cls(folder: Path, models, **sections) -> dict:
    from verifily_train.fixtures.data import write_splits

    splits = write_splits(folder / "data", "classification", {"train": 24, "test": 8}, seed=4)
    write_config(folder, "classification", models["bert"], splits, **sections)
    return splits


_edit_config = edit_config


def _store_version(folder: Path, models, mutate=None) -> Path:
    """A platform-written (hand-made) version in the store, referenced by the config."""
    home = Path(os.environ["VERIFILY_HOME"])
    splits = _sft(folder, models)
    version = home / "datasets" / "ds_bad" / "v1"
    version.mkdir(parents=True)
    data = splits["train"].read_bytes()
    (version / "train.jsonl").write_bytes(data)
    manifest = {"dataset_id": "ds_bad", "version": "v1", "format": "jsonl", "task": "sft",
                "content_hash": "sha256:" + hashlib.sha256(data).hexdigest(), "created_at": "2026-01-01T00:00:00Z",
                "files": [{"path": "train.jsonl", "split": "train", "sha256": hashlib.sha256(data).hexdigest()}],
                "tag_schema": {"source": {"type": "categorical", "values": ["human", "synthetic", "ai_contaminated"]},
                               "difficulty": {"type": "categorical", "values": ["easy", "medium", "hard"]},
                               "length_bucket": {"type": "categorical", "values": ["short", "medium", "long"]}}}
    if mutate:
        mutate(manifest, version)
    (version / "manifest.json").write_text(json.dumps(manifest))
    cfg = yaml.safe_load((folder / "train.yaml").read_text())
    cfg.pop("data_paths")
    cfg["dataset_version"] = "ds_bad@v1"
    (folder / "train.yaml").write_text(yaml.safe_dump(cfg))
    return version


def _append(path: Path, text: bytes) -> None:
    path.write_bytes(path.read_bytes() + text)


def _traversal(m, v):
    m["files"][0]["path"] = "../../etc/passwd"


def _symlink(m, v):
    outside = v.parent / "outside.jsonl"
    outside.write_bytes((v / "train.jsonl").read_bytes())
    (v / "train.jsonl").unlink()
    os.symlink(outside, v / "train.jsonl")


def _bad_tag_value(m, v):
    rows = (v / "train.jsonl").read_text().splitlines()
    row = json.loads(rows[0])
    row["tags"]["source"] = "scraped"
    rows[0] = json.dumps(row)
    data = ("\n".join(rows) + "\n").encode()
    (v / "train.jsonl").write_bytes(data)
    m["files"][0]["sha256"] = hashlib.sha256(data).hexdigest()
    m["content_hash"] = "sha256:" + hashlib.sha256(data).hexdigest()


def _cases():
    c = {}
    c["malformed JSON line"] = (_sft, lambda f, s, m: _append(s["train"], b"{not json\n"), "train.jsonl:25: malformed JSON")
    c["missing field"] = (_sft, lambda f, s, m: _append(s["train"], b'{"instruction": "x"}\n'), "train.jsonl:25: output: missing required field")
    c["wrong type"] = (_sft, lambda f, s, m: _append(s["train"], b'{"instruction": 5, "output": "y"}\n'), "instruction: must be a string")
    c["empty split"] = (_sft, lambda f, s, m: s["test"].write_text(""), "split test has no rows")
    c["non-UTF-8 text"] = (_sft, lambda f, s, m: _append(s["train"], b'{"instruction": "\xff\xfe", "output": "y"}\n'), "train.jsonl:25: not valid UTF-8")
    c["JSON line that is not an object"] = (_sft, lambda f, s, m: _append(s["val"], b"[1, 2]\n"), "val.jsonl:9: each line must be a JSON object")
    c["empty output"] = (_sft, lambda f, s, m: _append(s["train"], b'{"instruction": "x", "output": ""}\n'), "output: must not be empty")
    c["tags not an object"] = (_sft, lambda f, s, m: _append(s["train"], b'{"instruction": "x", "output": "y", "tags": "human"}\n'), "tags: must be an object")
    c["label missing from train"] = (_cls, lambda f, s, m: _append(s["test"], b'{"text": "odd", "label": "sarcastic"}\n'), "label 'sarcastic' does not occur in the train split")
    c["classification label of wrong type"] = (_cls, lambda f, s, m: _append(s["train"], b'{"text": "a", "label": [1]}\n'), "label: must be a string or integer label")
    c["unknown tag key in slice_by_tags"] = (_sft, lambda f, s, m: _edit_config(f, eval__slice_by_tags=["region"]), "tag key 'region' is not in the dataset")
    c["tag value outside tag_schema"] = (_sft, lambda f, s, m: _store_version(f, m, _bad_tag_value), "tags.source: value 'scraped' is not one of")
    c["manifest hash mismatch"] = (_sft, lambda f, s, m: _store_version(f, m, lambda mf, v: mf["files"][0].update(sha256="0" * 64)), "files[0].sha256: does not match train.jsonl")
    c["content hash mismatch"] = (_sft, lambda f, s, m: _store_version(f, m, lambda mf, v: mf.update(content_hash="sha256:" + "1" * 64)), "content_hash: does not match")
    c["path traversal in manifest"] = (_sft, lambda f, s, m: _store_version(f, m, _traversal), "escapes the version folder")
    c["symlink out of the version folder"] = (_sft, lambda f, s, m: _store_version(f, m, _symlink), "leads outside the version folder")
    c["duplicate file in manifest"] = (_sft, lambda f, s, m: _store_version(f, m, lambda mf, v: mf["files"].append(dict(mf["files"][0]))), "is listed twice")
    c["manifest row count wrong"] = (_sft, lambda f, s, m: _store_version(f, m, lambda mf, v: mf["files"][0].update(num_rows=3)), "files[0].num_rows: says 3")
    c["dataset task differs from config"] = (_sft, lambda f, s, m: _store_version(f, m, lambda mf, v: mf.update(task="classification")), "the dataset is for task 'classification'")
    c["unknown dataset version"] = (_sft, lambda f, s, m: (_store_version(f, m), _edit_config(f, dataset_version="ds_bad@v9")), "version 'v9' not found")
    c["nonexistent model path"] = (_sft, lambda f, s, m: _edit_config(f, base_model=str(f / "no-such-model")), "no such model folder")
    c["model of the wrong kind"] = (_sft, lambda f, s, m: _edit_config(f, base_model=str(m["bert"])), "model type 'bert' is neither a CausalLM nor a Seq2SeqLM")
    c["missing GGUF file"] = (_sft, lambda f, s, m: _edit_config(f, base_model=str(f / "model.gguf")), "GGUF file not found")
    c["invalid config value"] = (_sft, lambda f, s, m: _edit_config(f, lora__r=0), "lora.r: must be >= 1")
    c["unknown config key"] = (_sft, lambda f, s, m: _edit_config(f, training__epochs=2), "training.epochs: unknown key")
    c["wrong config type"] = (_sft, lambda f, s, m: _edit_config(f, training__batch_size="eight"), "training.batch_size")
    c["YAML syntax error"] = (_sft, lambda f, s, m: (f / "train.yaml").write_text("task: sft\nbase_model: [oops\n"), "YAML syntax error")
    c["both fp16 and bf16"] = (_sft, lambda f, s, m: _edit_config(f, compute__fp16=True), "fp16 and bf16 cannot both be true")
    c["bad format regex"] = (_sft, lambda f, s, m: _edit_config(f, eval__format="regex:("), "eval.format: invalid regular expression")
    c["missing gold set"] = (_sft, lambda f, s, m: _edit_config(f, eval__gold_set="gold.jsonl"), "eval.gold_set: file not found")
    c["bad prompt template"] = (_sft, lambda f, s, m: _edit_config(f, prompt__template="{instruction} {context}"), "prompt.template: bad template")
    c["train path is a folder"] = (_sft, lambda f, s, m: _edit_config(f, data_paths__train=str(f)), "data_paths.train: file not found")
    c["output dir is a file"] = (_sft, lambda f, s, m: ((f / "runs-file").write_text("x"), _edit_config(f, output__dir="runs-file")), "output.dir: exists and is not a folder")
    c["push to hub while offline"] = (_sft, lambda f, s, m: _edit_config(f, output__push_to_hub=True, output__hub_model_id="me/x"), "HF_HUB_OFFLINE is set")
    return c


CASES = _cases()


def _state(folder: Path) -> tuple:
    home = Path(os.environ["VERIFILY_HOME"])
    store = hash_tree(home / "datasets") if (home / "datasets").exists() else None
    return store


def _completed_runs(folder: Path) -> list:
    """Anything under the runs folder that claims completion (cache entries of finished stages are fine)."""
    runs = folder / "runs"
    if not runs.is_dir():
        return []
    out = [p for p in runs.rglob("run.json") if json.loads(p.read_text()).get("status") == "completed"]
    return out + list(runs.rglob("checksums.sha256"))


def test_the_catalogue_has_at_least_30_distinct_bad_inputs():
    assert len(CASES) >= 30


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_clear_line(name, tmp_path, models):
    make, breaker, fragment = CASES[name]
    splits = make(tmp_path, models)
    breaker(tmp_path, splits, models)
    before = _state(tmp_path)
    result = subprocess.run([sys.executable, "-m", "verifily_train.cli.main", "train", "-c", "train.yaml"],
                            cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0], lines[0]
    assert _completed_runs(tmp_path) == []
    assert _state(tmp_path) == before, "the dataset store changed"


def test_a_row_longer_than_max_seq_length_is_truncated_and_counted(tmp_path, models):
    """Not an error: counted in the tokenize stage's manifest."""
    from verifily_train.pipeline import runner as stages
    from verifily_train.pipeline.fingerprint import fingerprint_stage
    from verifily_train.config import load_config

    # 24, not less: the Alpaca template's own tokens (10 here) are never cut, so a smaller window leaves some
    # rows no room for an answer, which is an error (tests/test_chat_sft.py)
    splits = _sft(tmp_path, models, training={"max_seq_length": 24})
    long_row = {"instruction": "Repeat the colors exactly.", "input": " ".join(["red"] * 40), "output": "red " * 30,
                "tags": {"source": "human", "difficulty": "hard", "length_bucket": "long"}}
    _append(splits["train"], (json.dumps(long_row) + "\n").encode())
    cfg = load_config(tmp_path / "train.yaml")
    fp = fingerprint_stage(cfg, tmp_path / "cache")
    (tmp_path / "tok").mkdir()
    tokenized = stages.run_uncached("tokenize", cfg, fp, tmp_path / "tok", tmp_path)
    assert tokenized["splits"]["train"]["truncated"] >= 1 and tokenized["splits"]["train"]["answer_cut"] >= 1
    assert tokenized["truncated_rows"] == sum(s["truncated"] for s in tokenized["splits"].values())


def test_several_problems_are_reported_at_once_before_any_model_loads(tmp_path, models):
    _sft(tmp_path, models)
    _edit_config(tmp_path, lora__r=0, training__learning_rate=-1.0, base_model=str(tmp_path / "missing-model"),
                 eval__slice_by_tags=["region"])
    result = subprocess.run([sys.executable, "-m", "verifily_train.cli.main", "train", "-c", "train.yaml"],
                            cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 4 and all(l.startswith("error: ") for l in lines), result.stderr
    text = result.stderr
    assert "lora.r" in text and "training.learning_rate" in text and "no such model folder" in text and "region" in text


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, 16 * 1024))


def test_full_disk_is_one_clear_line_and_claims_nothing(tmp_path, models, prefect_api):
    _sft(tmp_path, models)
    result = subprocess.run([sys.executable, "-m", "verifily_train.cli.main", "train", "-c", "train.yaml"],
                            cwd=tmp_path, env=cli_env({"PREFECT_API_URL": prefect_api}), capture_output=True,
                            text=True, timeout=300, preexec_fn=_limit_file_size)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [l for l in result.stderr.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1 and "no space left" in lines[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert _completed_runs(tmp_path) == []
