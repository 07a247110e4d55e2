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
