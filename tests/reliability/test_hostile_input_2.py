"""Hostile and odd input, round two (issue 40), grouped by the issue's classes. Every refusal is one clear
line naming the file, line, key or flag, exit 2, no traceback, nothing half-written. No test here trains:
the Runs are hand-built and sealed (checksummed, their root in the ledger) as ``publish_run`` seals one, and
the commands run in this process, so the file stays fast.

Classes: 1 integrity an auditor relies on; 2 writes that must not destroy; 3 guarded parsers in the row
formats; 4 bounded inputs; 5 silent wrong answers; 6 errors that blamed the wrong thing; 7 the Prefect API
down or silent.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import assert_user_error
from verifily_train.fixtures.runs import seal_run


def _cli(capsys, *args: str) -> subprocess.CompletedProcess:
    """``verifily ARGS`` in this process: exit code and output, as ``run_cli`` gives them."""
    from verifily_train.cli.main import main

    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, out, err)


def _frame(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n_tokens = rng.integers(4, 12, n)
    return pd.DataFrame({
        "example_id": [f"test:{i + 1}" for i in range(n)], "row_hash": [f"h{i}" for i in range(n)],
        "tag.source": [("human", "synthetic")[i % 2] for i in range(n)],
        "loss_sum": n_tokens * rng.gamma(4.0, 0.5, n), "n_tokens": n_tokens,
        "exact_match": (rng.random(n) < 0.4).astype(float), "token_f1": rng.beta(2, 2, n),
        "format_ok": (rng.random(n) < 0.8).astype(float)})


def _run(folder: Path, seed: int = 0, seal: bool = True) -> Path:
    """A completed SFT Run built by hand (predictions, run.json, config.yaml), sealed like a published one."""
    folder.mkdir(parents=True)
    _frame(24, seed).to_parquet(folder / "predictions.parquet", index=False)
    (folder / "config.yaml").write_text(yaml.safe_dump({"task": "sft", "base_model": "org/m",
                                                        "data_paths": {"train": "t.jsonl"}}))
    (folder / "run.json").write_text(json.dumps({
        "run_id": folder.name, "status": "completed", "metrics": {"loss": 4.83, "train_loss": 1.0},
        "job": {"task": "sft", "dataset_version": {"ref": "data@v1"}, "config": {"seed": 0}, "device": "cpu"},
        "precision": "fp32", "quantization": "none", "model_identity": "sha256:" + "ab" * 32}))
    if seal:
        seal_run(folder)
    return folder


def _tamper_metrics(run: Path, rewrite_checksum: bool = False) -> None:
    """run.json's loss 4.83 -> 0.0042 (and, as a careful tamperer would, its checksum line)."""
    from verifily_train.hashing import sha256_file

    record = json.loads((run / "run.json").read_text())
    record["metrics"]["loss"] = 0.0042
    (run / "run.json").write_text(json.dumps(record))
    if rewrite_checksum:
        listing = run / "checksums.sha256"
        lines = [f"{sha256_file(run / 'run.json')}  run.json" if line.endswith("  run.json") else line
                 for line in listing.read_text().splitlines()]
        listing.write_text("\n".join(lines) + "\n")


# class 1: integrity an auditor relies on -------------------------------------------------------------------

CONSUMERS = {
    "reproduce": lambda run, other: ["reproduce", str(run)],
    "compare": lambda run, other: ["compare", str(other), str(run)],
    "attribute": lambda run, other: ["attribute", str(run), "--dry-run"],
    "attribute --rows": lambda run, other: ["attribute", str(run), "--rows"],
    "dataset derive": lambda run, other: ["dataset", "derive", str(run), "--drop-top", "1"],
}


@pytest.mark.parametrize("careful", [False, True], ids=["edited", "edited-with-its-checksum"])
@pytest.mark.parametrize("command", sorted(CONSUMERS))
def test_every_consumer_refuses_a_tampered_run(tmp_path, capsys, command, careful):
    other = _run(tmp_path / "run_other", seed=1)
    run = _run(tmp_path / "run_tampered")
    _tamper_metrics(run, rewrite_checksum=careful)
    result = _cli(capsys, *CONSUMERS[command](run, other))
    fragments = ("checksums.sha256", "does not match its ledger entry") if careful else ("run.json", "sha256 mismatch")
    line = assert_user_error(result, *fragments, "refuses a Run that fails `verifily runs verify`")
    assert command.split()[0] in line and "reproduced" not in result.stdout


def test_a_run_from_another_machine_is_checked_against_its_own_checksums(tmp_path, capsys):  # designed here
    from verifily_train.artifacts.run import verify_before_use

    run = _run(tmp_path / "run_elsewhere", seal=False)
    from verifily_train.checksums import write_checksums

    write_checksums(run)  # checksummed, but this machine's ledger never saw it
    assert verify_before_use(run, "compare")["status"] == "completed"
    _tamper_metrics(run)
    assert_user_error(_cli(capsys, "compare", str(run), str(run)), "run.json", "sha256 mismatch")


def test_a_completed_run_without_checksums_is_not_read(tmp_path, capsys):  # designed here: the listing deleted
    run = _run(tmp_path / "run_bare", seal=False)
    assert_user_error(_cli(capsys, "reproduce", str(run)), "no checksums.sha256", "reproduce refuses")


@pytest.mark.parametrize("spelling", ["upper", "padded", "bare", "tab-and-upper"])
def test_runs_verify_root_is_normalised_not_a_false_alarm(tmp_path, capsys, spelling):
    run = _run(tmp_path / "run_ok")
    root = _cli(capsys, "runs", "verify", str(run)).stdout.rsplit("(", 1)[1].rstrip(")\n")
    given = {"upper": root.upper(), "padded": f"  {root} ", "bare": root.removeprefix("sha256:"),
             "tab-and-upper": "\t" + root.upper() + "\n"}[spelling]
    result = _cli(capsys, "runs", "verify", str(run), "--root", given)
    assert result.returncode == 0, result.stderr


def test_runs_verify_root_that_is_no_hash_is_named_as_such(tmp_path, capsys):  # designed here
    run = _run(tmp_path / "run_ok")
    assert_user_error(_cli(capsys, "runs", "verify", str(run), "--root", "sha256:xyz"), "--root", "not an integrity root")
    assert_user_error(_cli(capsys, "runs", "verify", str(run), "--root", "sha256:" + "0" * 64),
                      "does not match the root given")


def test_a_corrupt_ledger_entry_is_one_line(tmp_path, capsys):  # designed here: the ledger's own JSON, guarded
    from verifily_train.artifacts.run import ledger_dir

    run = _run(tmp_path / "run_ledger")
    entry = ledger_dir() / "run_ledger.json"
    entry.chmod(0o644)
    entry.write_text("[" * 100_000)
    assert_user_error(_cli(capsys, "runs", "verify", str(run)), "run_ledger.json", "nested too deeply")


# class 2: writes that must not destroy --------------------------------------------------------------------

def _html_target(tmp_path: Path, kind: str) -> Path:
    target = tmp_path / "out" / "report.html"
    target.parent.mkdir()
    if kind == "symlink":
        (tmp_path / "precious.txt").write_text("keep me")
        target.symlink_to(tmp_path / "precious.txt")
    elif kind == "fifo":
        os.mkfifo(target)
    elif kind == "folder":
        target.mkdir()
    elif kind == "dangling symlink":
        target.symlink_to(tmp_path / "nowhere.html")
    elif kind == "under a file":
        (tmp_path / "out" / "file").write_text("x")
        target = tmp_path / "out" / "file" / "report.html"
    return target


@pytest.mark.parametrize("kind", ["symlink", "fifo", "folder", "dangling symlink", "under a file"])
def test_compare_html_never_replaces_what_is_not_a_regular_file(tmp_path, capsys, kind):
    a, b = _run(tmp_path / "run_a"), _run(tmp_path / "run_b", seed=1)
    target = _html_target(tmp_path, kind)
    before = os.lstat(target).st_mode if os.path.lexists(target) else None
    result = _cli(capsys, "compare", str(a), str(b), "--html", str(target))
    assert_user_error(result, "--html", str(target))
    if before is not None:
        assert os.lstat(target).st_mode == before
    if kind == "symlink":
        assert (tmp_path / "precious.txt").read_text() == "keep me"
    assert not [p for p in target.parent.iterdir() if p.name.endswith(".tmp")] if target.parent.is_dir() else True


def test_compare_html_onto_dev_null_is_refused(tmp_path, capsys):
    a, b = _run(tmp_path / "run_a"), _run(tmp_path / "run_b", seed=1)
    assert_user_error(_cli(capsys, "compare", str(a), str(b), "--html", "/dev/null"), "/dev/null", "is a device")
    assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")


def test_compare_html_in_an_unwritable_place_is_one_line(tmp_path, capsys):  # designed here
    a, b = _run(tmp_path / "run_a"), _run(tmp_path / "run_b", seed=1)
    assert_user_error(_cli(capsys, "compare", str(a), str(b), "--html", "/proc/verifily.html"),
                      "/proc/verifily.html", "--html")


def test_compare_html_replaces_a_regular_file(tmp_path, capsys):  # designed here: the ordinary case still works
    a, b = _run(tmp_path / "run_a"), _run(tmp_path / "run_b", seed=1)
    target = tmp_path / "report.html"
    target.write_text("old")
    result = _cli(capsys, "compare", str(a), str(b), "--html", str(target), "--bootstrap-samples", "10",
                  "--permutations", "9")
    assert result.returncode == 0, result.stderr
    assert target.read_text().startswith("<!doctype html") or "<html" in target.read_text()


# class 3: guarded parsers in the row formats ----------------------------------------------------------------

def _create(capsys, train: Path, task: str = "sft", version: str = "v1") -> subprocess.CompletedProcess:
    return _cli(capsys, "dataset", "create", "--id", "ds_h", "--version", version, "--task", task, "--train", str(train))


def _store_unchanged() -> bool:
    home = Path(os.environ["VERIFILY_HOME"])
    return not (home / "datasets" / "ds_h").exists()


def _csv(path: Path, header: str, *rows: str) -> Path:
    path.write_text(header + "\n" + "".join(r + "\n" for r in rows), encoding="utf-8")
    return path


CSV_CASES = {
    "lone surrogate in a tags cell": (('instruction,output,tags', 'a,b,"{""source"": ""\\udc00""}"'),
                                      ("t.csv:2", "tags.source", "lone surrogate")),
    "messages cell nested 100,000 deep": (("messages", '"' + "[" * 100_000 + '"'), ("t.csv:2", "messages", "nested too deeply")),
    # designed here
    "NaN in a tags JSON cell": (('instruction,output,tags', 'a,b,"{""source"": NaN}"'), ("t.csv:2", "tags", "NaN is not JSON")),
    "tags column and tags.source column": (('instruction,output,tags,tags.source', 'a,b,"{""source"": ""x""}",y'),
                                           ("t.csv:2", "tags.source", "given twice")),
    "tags.source and tag.source": (('instruction,output,tags.source,tag.source', 'a,b,x,y'),
                                   ("t.csv:2", "tags.source", "given twice")),
    "integer too long in a messages cell": (("messages", '"' + "7" * 5000 + '"'), ("t.csv:2", "messages", "integer")),
}


@pytest.mark.parametrize("case", sorted(CSV_CASES))
def test_csv_cells_go_through_the_guarded_reader(tmp_path, capsys, case):
    (header, row), fragments = CSV_CASES[case]
    result = _create(capsys, _csv(tmp_path / "t.csv", header, row))
    assert_user_error(result, *fragments)
    assert _store_unchanged()


def test_parquet_string_column_with_invalid_utf8_is_one_line(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = pa.array([b"fine", b"\xff\xfe bad"], type=pa.binary())
    table = pa.table({"instruction": good.view(pa.string()), "output": pa.array(["x", "y"])})
    pq.write_table(table, tmp_path / "t.parquet")
    assert_user_error(_create(capsys, tmp_path / "t.parquet"), "t.parquet: row 2", "instruction", "not valid UTF-8")
    assert _store_unchanged()


@pytest.mark.parametrize("value, fragments", [
    (float("inf"), ("tags.score", "infinite")),  # stored as the non-JSON token Infinity before
    (float("-inf"), ("tags.score", "infinite")),  # designed here
])
def test_parquet_infinite_tag_is_refused(tmp_path, capsys, value, fragments):
    pd.DataFrame({"instruction": ["a"], "output": ["b"], "tags.score": [value]}).to_parquet(tmp_path / "t.parquet")
    assert_user_error(_create(capsys, tmp_path / "t.parquet"), "t.parquet: row 1", *fragments)


def test_nan_in_a_tag_struct_is_an_absent_tag(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tags = pa.array([{"source": "human", "score": 1.0}, {"source": "web", "score": float("nan")}])
    pq.write_table(pa.table({"instruction": ["a", "c"], "output": ["b", "d"], "tags": tags}), tmp_path / "t.parquet")
    result = _create(capsys, tmp_path / "t.parquet")
    assert result.returncode == 0, result.stderr
    stored = Path(os.environ["VERIFILY_HOME"]) / "datasets" / "ds_h" / "v1" / "train.jsonl"
    rows = [json.loads(line) for line in stored.read_text().splitlines()]
    assert rows[1]["tags"] == {"source": "web"} and "NaN" not in stored.read_text()


@pytest.mark.parametrize("token", ["Infinity", "NaN", "-Infinity"])
def test_jsonl_rows_with_non_json_numbers_are_refused(tmp_path, capsys, token):
    path = tmp_path / "t.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": "b", "tags": {"s": %s}}\n' % token)
    assert_user_error(_create(capsys, path), "t.jsonl:2", f"{token} is not JSON")


def _disk(folder: Path) -> Path:
    from datasets import Dataset

    Dataset.from_dict({"instruction": ["a"] * 20, "output": ["b"] * 20}).save_to_disk(str(folder))
    return folder


def _dict_folder(folder: Path) -> Path:
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_dict({"instruction": ["a"] * 4, "output": ["b"] * 4})}).save_to_disk(str(folder))
    return folder


DISK_CASES = {
    "dataset_dict.json a list": (_dict_folder, lambda f: (f / "dataset_dict.json").write_text("[1, 2]"),
                                 ("dataset_dict.json", "must be a JSON object, got list")),
    "dataset_dict.json 100,000 deep": (_dict_folder, lambda f: (f / "dataset_dict.json").write_text("[" * 100_000),
                                       ("dataset_dict.json", "nested too deeply")),
    "state.json a list": (_disk, lambda f: (f / "state.json").write_text("[1,2]"), ("state.json", "must be a JSON object")),
    "an .arrow file cut in half": (_disk, lambda f: [p.write_bytes(p.read_bytes()[:len(p.read_bytes()) // 2])
                                                     for p in f.glob("*.arrow")], ("not a folder written by datasets",)),
    # designed here
    "dataset_info.json not UTF-8": (_disk, lambda f: (f / "dataset_info.json").write_bytes(b"\xff{}"),
                                    ("dataset_info.json", "not valid UTF-8")),
    "state.json without its data files": (_disk, lambda f: (f / "state.json").write_text('{"_data_files": 3}'),
                                          ("state.json", "_data_files")),
    "dataset_dict.json splits not a list": (_dict_folder, lambda f: (f / "dataset_dict.json").write_text('{"splits": 5}'),
                                            ("dataset_dict.json", "splits")),
}


@pytest.mark.parametrize("case", sorted(DISK_CASES))
def test_save_to_disk_folders_are_read_through_the_guarded_reader(tmp_path, capsys, case):
    make, damage, fragments = DISK_CASES[case]
    folder = make(tmp_path / "ds")
    damage(folder)
    result = _create(capsys, folder)
    assert_user_error(result, *fragments)
    assert _store_unchanged()


# class 4: bounded inputs -------------------------------------------------------------------------------------

def test_dataset_create_from_dev_zero_is_refused_without_filling_the_disk(tmp_path, capsys):
    assert_user_error(_create(capsys, Path("/dev/zero")), "/dev/zero:1", "longer than 4 MiB")
    assert _store_unchanged()
    home = Path(os.environ["VERIFILY_HOME"]) / "datasets"
    assert not home.exists() or not any(home.rglob("*.jsonl"))


def test_a_parquet_of_many_dictionary_encoded_rows_is_read_in_batches(tmp_path):  # designed here
    import pyarrow as pa
    import pyarrow.parquet as pq

    from verifily_train.dataset import convert

    n = 20_000
    table = pa.table({"instruction": pa.array(["same"] * n).dictionary_encode(),
                      "output": pa.array(["o"] * n).dictionary_encode()})
    pq.write_table(table, tmp_path / "t.parquet")
    columns, records = convert._parquet_records(tmp_path / "t.parquet")
    first = next(records)
    assert columns == ["instruction", "output"] and first[1] == {"instruction": "same", "output": "o"}
    assert sum(1 for _ in records) == n - 1  # a generator over batches, never the whole table as dicts


def test_drop_rows_from_dev_zero_is_refused_after_a_bound(tmp_path):
    from verifily_train.attribution import derive_rows
    from verifily_train.errors import DataError

    derive_rows.MAX_ROW_LIST_BYTES, saved = 1024 * 1024, derive_rows.MAX_ROW_LIST_BYTES
    try:
        with pytest.raises(DataError, match="/dev/zero: --drop-rows: longer than 1 MiB"):
            derive_rows.read_row_list(Path("/dev/zero"))
    finally:
        derive_rows.MAX_ROW_LIST_BYTES = saved


def test_drop_rows_reads_the_attribution_parquet_and_crlf_and_guarded_json(tmp_path):  # designed here
    from verifily_train.attribution.derive_rows import read_row_list
    from verifily_train.errors import DataError

    pd.DataFrame({"example_id": ["train:1", "train:2"], "row_hash": ["a" * 64, "b" * 64]}).to_parquet(tmp_path / "r.parquet")
    assert read_row_list(tmp_path / "r.parquet") == ["a" * 64, "b" * 64]
    (tmp_path / "crlf.txt").write_bytes(b"# rows\r\ntrain:1\r\ntrain:2\r\n")
    assert read_row_list(tmp_path / "crlf.txt") == ["train:1", "train:2"]
    (tmp_path / "deep.json").write_text("[" * 100_000)
    with pytest.raises(DataError, match="deep.json: not a JSON list of row ids: malformed JSON: nested too deeply"):
        read_row_list(tmp_path / "deep.json")
    (tmp_path / "bin").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(DataError, match="not valid UTF-8 text"):
        read_row_list(tmp_path / "bin")
    with pytest.raises(DataError, match="is a folder"):
        read_row_list(tmp_path)


@pytest.mark.parametrize("args, fragments", [
    (["--bootstrap-samples", "1000000000"], ("--bootstrap-samples", "from 0 to 100,000")),
    (["--bootstrap-samples", "-1"], ("--bootstrap-samples", "got -1")),
    (["--permutations", "1000000000"], ("--permutations", "from 1 to 100,000")),  # designed here
    (["--permutations", "0"], ("--permutations", "got 0")),  # designed here
])
def test_compare_resample_counts_are_bounded(tmp_path, capsys, args, fragments):
    a, b = _run(tmp_path / "run_a"), _run(tmp_path / "run_b", seed=1)
    assert_user_error(_cli(capsys, "compare", str(a), str(b), *args), *fragments)


@pytest.mark.parametrize("args, fragments", [
    (["--projection-dim", "2000000000"], ("--projection-dim", "at most 16,384")),
    (["--projection-dim", "-3"], ("--projection-dim", ">= 0")),  # designed here
    (["--methods", ",,,"], ("--methods", "names no method")),  # class 6
    (["--methods", " , "], ("--methods", "names no method")),  # designed here
])
def test_rows_flags_are_bounded_before_any_work(tmp_path, capsys, args, fragments):
    run = _run(tmp_path / "run_a")
    assert_user_error(_cli(capsys, "attribute", str(run), "--rows", *args), *fragments)


def test_a_conversation_of_too_many_turns_is_refused_at_create(tmp_path, capsys):
    turns = [{"role": ("user", "assistant")[i % 2], "content": f"t{i}"} for i in range(10_000)]
    (tmp_path / "t.jsonl").write_text(json.dumps({"messages": turns}) + "\n")
    assert_user_error(_create(capsys, tmp_path / "t.jsonl"), "t.jsonl:1", "messages", "10,000 turns", "at most 256")


# class 5: silent wrong answers -------------------------------------------------------------------------------

def test_slice_targets_refuse_an_unknown_key_in_both_forms():
    from verifily_train.attribution.target import check_target, parse_slice
    from verifily_train.errors import ConfigError

    record = {"evaluation": {"split": "test"}, "metrics": {}}
    present = {"source": {"human", "web"}}
    for target in ("slice:sourc!=human", "slice:sourc=human"):
        with pytest.raises(ConfigError, match="--target: no rows of the target split carry tag 'sourc'"):
            check_target(target, record, present)
    with pytest.raises(ConfigError, match="is ambiguous"):
        parse_slice("slice:source=a!=b")
    with pytest.raises(ConfigError, match="is ambiguous"):  # designed here: the other order
        parse_slice("slice:source!=a=b")
    assert parse_slice("slice:source!=human") == ("source", True, "human")
    assert parse_slice("slice:source=web") == ("source", False, "web")
    with pytest.raises(ConfigError, match="must be"):  # designed here: no operator, no value
        parse_slice("slice:source")
    with pytest.raises(ConfigError, match="must be"):
        parse_slice("slice:source!=")


def test_rows_target_with_a_mistyped_key_is_refused_not_the_whole_split(tmp_path):
    from verifily_train.attribution.rows.plan import _target_split
    from verifily_train.errors import ConfigError

    tags = [json.dumps({"source": s}) for s in ("human", "web", "human")]
    pd.DataFrame({"tags": tags}).to_parquet(tmp_path / "test.parquet")
    with pytest.raises(ConfigError, match="no rows of the target split carry tag 'sourc'"):
        _target_split(tmp_path, "slice:sourc!=human")
    assert _target_split(tmp_path, "slice:source!=human") == "test"


def test_derived_version_names_never_collide_for_unicode_values():
    from verifily_train.attribution.derive import derived_version_name, safe_part

    names = {derived_version_name("v1", "source", v) for v in ("人工", "合成", "a b", "a/b", "a-b", "x" * 300, "x" * 301)}
    assert len(names) == 7 and all(len(n) <= 128 for n in names)
    assert derived_version_name("v1", "source", "human") == "v1-without-source-human"  # plain names unchanged
    assert safe_part("人工") != safe_part("合成")


def _store_rows(rows, version="v1") -> object:
    import tempfile

    from verifily_train.dataset.store import create_version

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        return create_version("ds_u", version, "sft", str(path))


def test_nfc_and_nfd_spellings_of_a_tag_value_are_one_value():
    import unicodedata

    from verifily_train.attribution.derive import derive_without, train_tag_counts

    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    assert nfc != nfd
    dv = _store_rows([{"instruction": f"q{i}", "output": "a", "tags": {"source": s}}
                      for i, s in enumerate([nfc, nfd, "web", "web"])])
    assert train_tag_counts(dv, "source") == {nfc: 2, "web": 2}
    assert derive_without(dv, "source", nfd)["removed_rows"] == 2  # either spelling names both rows


def test_cjk_tag_values_derive_distinct_versions():
    from verifily_train.attribution.derive import derive_without

    dv = _store_rows([{"instruction": f"q{i}", "output": "a", "tags": {"source": s}}
                      for i, s in enumerate(["人工", "合成", "人工", "合成"])])
    a, b = derive_without(dv, "source", "人工"), derive_without(dv, "source", "合成")
    assert a["ref"] != b["ref"] and a["removed_rows"] == b["removed_rows"] == 2
    assert derive_without(dv, "source", "人工")["ref"] == a["ref"]  # reused on a second call


def test_the_same_rows_by_two_rules_are_two_versions_not_a_clash():
    from verifily_train.attribution.derive_rows import derive_without_rows, rows_digest
    from verifily_train.model.tokenize import row_hash

    rows = [{"instruction": f"q{i}", "output": "a"} for i in range(5)]
    dv = _store_rows(rows)
    drop = {row_hash(rows[0]), row_hash(rows[1])}
    by_file = derive_without_rows(dv, drop, {"by": "file", "file": "rows.txt", "run": "r"}, f"rows-{rows_digest(drop)}")
    by_crlf = derive_without_rows(dv, drop, {"by": "file", "file": "rows-crlf.txt", "run": "r"}, f"rows-{rows_digest(drop)}")
    top_a = derive_without_rows(dv, drop, {"by": "row_attribution", "top": 2, "target": "test"}, "top-2-loss")
    top_b = derive_without_rows(dv, drop, {"by": "row_attribution", "top": 2, "target": "slice:s=x"}, "top-2-loss")
    assert len({by_file["ref"], by_crlf["ref"], top_a["ref"], top_b["ref"]}) == 4
    again = derive_without_rows(dv, drop, {"by": "file", "file": "rows.txt", "run": "r"}, f"rows-{rows_digest(drop)}")
    assert again["ref"] == by_file["ref"]


def test_dropping_every_train_row_names_the_flag_derive_has():  # class 6
    from verifily_train.attribution.derive_rows import derive_without_rows
    from verifily_train.errors import VerifilyError
    from verifily_train.model.tokenize import row_hash

    rows = [{"instruction": f"q{i}", "output": "a"} for i in range(3)]
    dv = _store_rows(rows)
    with pytest.raises(VerifilyError) as caught:
        derive_without_rows(dv, {row_hash(r) for r in rows}, {"by": "file", "file": "all.txt"}, "rows-all")
    assert "--drop-rows" in str(caught.value) and "--values" not in str(caught.value)
    assert row_hash(rows[0]) not in str(caught.value) and "every one of the 3 train rows" in str(caught.value)


ROW_CASES = {
    "messages and instruction/output both": ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                                              "instruction": "q", "output": "a"}, ("t.jsonl:1", "instruction", "not both")),
    "a turn with tool_calls": ({"messages": [{"role": "user", "content": "q"},
                                             {"role": "assistant", "content": "a", "tool_calls": [{"name": "f"}]}]},
                               ("t.jsonl:1", "messages[1].tool_calls", "not supported")),
    "a turn with a weight": ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]},
                             ("t.jsonl:1", "messages[1].weight", "not supported")),
    "a turn with images": ({"messages": [{"role": "user", "content": "q", "images": ["x.png"]}, {"role": "assistant", "content": "a"}]},
                           ("t.jsonl:1", "messages[0].images", "not supported")),
    # class 6: a chat that opens with the assistant's greeting
    "opens with the assistant": ({"messages": [{"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "q"},
                                               {"role": "assistant", "content": "a"}]},
                                 ("t.jsonl:1", "messages[0].role", "opens with the user's turn")),
    "system then assistant": ({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "Hi!"},
                                            {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
                              ("t.jsonl:1", "messages[1].role", "opens with the user's turn")),
}


@pytest.mark.parametrize("case", sorted(ROW_CASES))
def test_rows_that_would_lose_something_silently_are_refused_at_create(tmp_path, capsys, case):
    row, fragments = ROW_CASES[case]
    (tmp_path / "t.jsonl").write_text(json.dumps(row) + "\n")
    assert_user_error(_create(capsys, tmp_path / "t.jsonl"), *fragments)
    assert _store_unchanged()


# class 6: errors that blamed the wrong thing --------------------------------------------------------------

class _Tok:
    """A tokenizer's chat template rendered the way transformers renders it (a sandboxed Jinja environment)."""

    def __init__(self, template: str):
        self.chat_template = template

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment()
        return env.from_string(self.chat_template).render(messages=messages, add_generation_prompt=add_generation_prompt)


TURNS = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


def test_a_chat_template_syntax_error_is_blamed_on_the_template_not_the_row():
    from verifily_train.errors import ModelError
    from verifily_train.model.chat import render

    with pytest.raises(ModelError) as caught:
        render(_Tok("{% for m in messages %}{{ m.content }"), TURNS, False, "train.jsonl:7")
    text = str(caught.value)
    assert "chat_template" in text and "not valid Jinja" in text and "train.jsonl:7" not in text


def test_a_chat_template_that_raises_type_error_is_one_line_naming_the_template():
    from verifily_train.errors import ModelError
    from verifily_train.model.chat import render

    with pytest.raises(ModelError, match="chat_template: the tokenizer's chat template fails on this row with TypeError"):
        render(_Tok("{{ messages[0].content + 1 }}"), TURNS, False, "train.jsonl:7")


def test_a_template_that_refuses_the_conversation_still_names_the_row():  # designed here: raise_exception stays data
    from verifily_train.errors import DataError
    from verifily_train.model.chat import render

    with pytest.raises(DataError, match="train.jsonl:7: messages: the chat template rejects"):
        render(_Tok("{{ undefined_call() }}"), TURNS, False, "train.jsonl:7")


@pytest.mark.parametrize("template, fragment", [
    ("{instruction.text}", "{instruction.text} is not a field"),
    ("{instruction[0]}", "{instruction[0]} is not a field"),  # designed here
    ("{instruction:>999999999}", "no conversion or format spec"),  # designed here: a gigabyte of padding per row
])
def test_prompt_templates_are_checked_by_parsing_not_by_formatting(tmp_path, template, fragment):
    from verifily_train.config import load_config
    from verifily_train.errors import VerifilyError

    (tmp_path / "t.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    (tmp_path / "train.yaml").write_text(yaml.safe_dump({"task": "sft", "base_model": "org/m",
                                                         "data_paths": {"train": str(tmp_path / "t.jsonl")},
                                                         "prompt": {"template": template}}))
    with pytest.raises(VerifilyError, match="prompt.template") as caught:
        load_config(str(tmp_path / "train.yaml"))
    assert fragment in str(caught.value)


# class 7: the Prefect API down or silent ---------------------------------------------------------------------

def _dead_url() -> str:
    from verifily_train.procs import free_port

    return f"http://127.0.0.1:{free_port()}/api"


def test_a_stale_prefect_api_url_is_one_line_before_any_flow(tmp_path, capsys, monkeypatch):
    run = _run(tmp_path / "run_ok")
    monkeypatch.setenv("PREFECT_API_URL", _dead_url())
    result = _cli(capsys, "reproduce", str(run))
    assert_user_error(result, "PREFECT_API_URL", "no Prefect server answers", "verifily stack up")


def test_a_listener_that_never_answers_times_out_in_one_line():
    import socket

    from verifily_train.cli.runtime import check_api_answers
    from verifily_train.errors import EnvironmentProblem

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes the handshake; nobody ever reads or answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/api"
        with pytest.raises(EnvironmentProblem, match="did not answer within 0.5 s"):
            check_api_answers(url, timeout=0.5)


def test_a_url_that_is_not_a_prefect_api_is_named(tmp_path):  # designed here: an HTTP server without /health
    import http.server
    import threading

    from verifily_train.cli.runtime import check_api_answers
    from verifily_train.errors import EnvironmentProblem

    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(EnvironmentProblem, match="answered 404"):
            check_api_answers(f"http://127.0.0.1:{server.server_port}/nope", timeout=5)
        with pytest.raises(EnvironmentProblem, match="no Prefect server answers at not-a-url"):  # designed here
            check_api_answers("not-a-url", timeout=1)
    finally:
        server.shutdown()
        server.server_close()


def test_a_missing_auth_string_is_not_reported_as_a_full_disk():
    import httpx
    from prefect.exceptions import PrefectHTTPStatusError

    from verifily_train.cli.runtime import prefect_api_problem

    request = httpx.Request("POST", "http://127.0.0.1:1/api/flow_runs/")
    err = PrefectHTTPStatusError.from_httpx_error(httpx.HTTPStatusError(
        "Client error '401 Unauthorized'", request=request, response=httpx.Response(401, request=request)))
    text = str(prefect_api_problem(err))
    assert "PREFECT_API_AUTH_STRING" in text and "out of space" not in text
    refused = str(prefect_api_problem(httpx.ConnectError("All connection attempts failed", request=request)))
    assert "stopped answering" in refused and "out of space" not in refused  # designed here


@pytest.mark.parametrize("port", ["99999", "0", "-1"])
def test_stack_up_with_a_port_out_of_range_is_one_line(tmp_path, capsys, port):
    assert_user_error(_cli(capsys, "stack", "up", "--port", port, "--project", str(tmp_path)), "--port", "1 to 65535")


@pytest.mark.parametrize("text", ['{"processes": {}}', "[1, 2]", "[" * 100_000,
                                  '{"api_url": "x", "ui_url": "y", "processes": {"server": {"pid": "1"}}}'])
def test_a_foreign_stack_state_breaks_no_command(monkeypatch, text):
    import io

    from verifily_train.cli.stack import configured_api_url, stack_down, stack_status, state_path

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    path = state_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    assert configured_api_url() is None  # train's lookup: a KeyError before
    out = io.StringIO()
    assert stack_status(out=out) == 1 and "no stack running" in out.getvalue()
    assert stack_down(out=out) == 0


def test_managed_mode_reports_an_invalid_config(tmp_path, capsys, monkeypatch):  # class 7 (--mode managed)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    (tmp_path / "train.yaml").write_text(yaml.safe_dump({"task": "sft", "base_model": "org/m",
                                                         "data_paths": {"train": "t.jsonl"}, "lora": {"r": 0}}))
    result = _cli(capsys, "train", "-c", "train.yaml", "--mode", "managed")
    assert result.returncode == 2 and "lora.r" in result.stderr and "Traceback" not in result.stderr
    (tmp_path / "train.yaml").write_text(yaml.safe_dump({"task": "sft", "base_model": "org/m",
                                                         "data_paths": {"train": "t.jsonl"}}))
    ok = _cli(capsys, "train", "-c", "train.yaml", "--mode", "managed")
    assert ok.returncode == 0 and "coming soon" in ok.stdout
