"""One real Run, written while `verifily cache clear` ran beside it, then attacked (issue 25).

Class 5: the Run's identity is anchored outside it: an integrity root (SHA-256 of checksums.sha256) is
recorded in $VERIFILY_HOME/ledger before the Run appears, so an edit of any file *and* its checksum line,
an added, removed or renamed file, a rewritten checksum file or a ``../`` entry is caught.
Class 6: staging debris and failed runs are never taken for Runs; one bad run.json cannot break `runs list`.
Class 8: `cache clear` and `cache prune` during a run skip what the run holds, and the run completes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import assert_user_error, cli_env, run_cli, write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def written(tmp_path_factory, models, prefect_api):
    """A run paused after its evaluate stage computed, with `cache clear` and `cache prune` run meanwhile."""
    from verifily_train.fixtures.data import write_splits

    folder = tmp_path_factory.mktemp("integrity")
    home = folder / "home"
    env = cli_env({"VERIFILY_HOME": str(home), "PREFECT_API_URL": prefect_api})
    splits = write_splits(folder / "data", "sft", {"train": 24, "val": 8, "test": 8}, seed=5)
    write_config(folder, "sft", models["llama"], splits, training={"max_steps": 2, "save_steps": 1000},
                 eval={"bootstrap_samples": 50})
    proc = subprocess.Popen([sys.executable, "-m", "verifily_train.cli.main", "train", "-c", "train.yaml"], cwd=folder,
                            env=dict(env, VERIFILY_PAUSE_STAGE="evaluate:6"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list((home / "cache/evaluate").glob(".tmp-*")):
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    cleared = run_cli("cache", "clear", cwd=folder, env=env)
    pruned = run_cli("cache", "prune", "--older-than", "0", cwd=folder, env=env)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    run = next((folder / "runs").glob("run_*"))
    root = next(line.split()[-1] for line in out.splitlines() if line.strip().startswith("integrity_root:"))
    return {"folder": folder, "home": home, "env": env, "run": run, "root": root, "cleared": cleared,
            "pruned": pruned, "stdout": out}


def _copy(written, name: str | None = None) -> Path:
    """A writable copy of the Run, by default under its own name (so its ledger entry applies)."""
    target = written["folder"] / f"copy-{time.time_ns()}" / (name or written["run"].name)
    shutil.copytree(written["run"], target)
    for path in [target, *target.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return target


def _verify(written, path: Path, *extra: str):
    return run_cli("runs", "verify", str(path), *extra, cwd=written["folder"], env=written["env"])


def _rewrite_line(run: Path, rel: str, new_rel: str | None = None) -> None:
    """Recompute ``rel``'s checksum line (or rename it to ``new_rel``), as a careful tamperer would."""
    from verifily_train.hashing import sha256_file

    lines = (run / "checksums.sha256").read_text().splitlines()
    out = []
    for line in lines:
        digest, name = line.split("  ", 1)
        if name == rel:
            if new_rel is None and not (run / rel).exists():
                continue  # the file was deleted: drop its line too
            name = new_rel or rel
            digest = sha256_file(run / name)
        out.append(f"{digest}  {name}")
    (run / "checksums.sha256").write_text("\n".join(sorted(out, key=lambda l: l.split("  ", 1)[1])) + "\n")


LEDGER = "does not match its ledger entry"


# class 8: cache clear during a run ------------------------------------------------------------------------

def test_cache_clear_during_a_run_skips_what_the_run_holds(written):
    assert written["cleared"].returncode == 0 and "kept" in written["cleared"].stdout, written["cleared"].stdout
    assert written["pruned"].returncode == 0 and "kept" in written["pruned"].stdout  # designed here: prune too
    assert _verify(written, written["run"]).returncode == 0
    # once the run ended it holds nothing: the same clear now removes its entries
    after = run_cli("cache", "clear", cwd=written["folder"], env=written["env"])
    assert after.returncode == 0 and "kept" not in after.stdout
    assert int(after.stdout.split()[1]) >= 4, after.stdout  # validate, tokenize, train, evaluate, ...


# class 5: a Run's integrity is anchored beyond checksums.sha256 ------------------------------------------------

def test_the_run_verifies_against_its_ledger_and_its_printed_root(written):
    ok = _verify(written, written["run"])
    assert ok.returncode == 0 and written["root"] in ok.stdout, ok.stdout + ok.stderr
    assert (written["home"] / "ledger/runs" / f"{written['run'].name}.json").is_file()
    assert _verify(written, written["run"], "--root", written["root"]).returncode == 0


def test_editing_any_file_and_its_checksum_line_is_caught(written, monkeypatch):
    """Every file of the Run, one at a time: a changed byte and a recomputed checksum line (in-process: 16 files)."""
    from verifily_train.artifacts.run import verify_run
    from verifily_train.errors import RunError

    monkeypatch.setenv("VERIFILY_HOME", str(written["home"]))
    run = _copy(written)
    files = sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file() and p.name != "checksums.sha256")
    assert len(files) >= 12
    listing = (run / "checksums.sha256").read_bytes()
    for rel in files:
        original = (run / rel).read_bytes()
        (run / rel).write_bytes(bytes([original[0] ^ 0x20]) + original[1:])
        _rewrite_line(run, rel)
        with pytest.raises(RunError, match=LEDGER):
            verify_run(run)
        (run / rel).write_bytes(original)
        (run / "checksums.sha256").write_bytes(listing)
    assert verify_run(run) == len(files)


def test_metrics_edited_with_its_checksum_is_caught(written):
    run = _copy(written)
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["eval"]["loss"] = 0.01
    (run / "metrics.json").write_text(json.dumps(metrics))
    _rewrite_line(run, "metrics.json")
    assert_user_error(_verify(written, run), "checksums.sha256", LEDGER)


def test_a_file_deleted_with_its_line_is_caught(written):
    run = _copy(written)
    (run / "hard_examples.jsonl").unlink()
    _rewrite_line(run, "hard_examples.jsonl")
    assert_user_error(_verify(written, run), LEDGER)


def test_a_crlf_converted_checksum_file_is_caught(written):
    run = _copy(written)
    listing = run / "checksums.sha256"
    listing.write_bytes(listing.read_bytes().replace(b"\n", b"\r\n"))
    assert_user_error(_verify(written, run), "checksums.sha256", "line ends changed")


def test_a_dotdot_entry_is_refused_without_reading_outside_the_run(written):
    run = _copy(written)
    outside = run.parent / "outside.txt"
    outside.write_text("not part of the run")
    from verifily_train.hashing import sha256_file

    with open(run / "checksums.sha256", "a") as handle:
        handle.write(f"{sha256_file(outside)}  ../outside.txt\n")
    assert_user_error(_verify(written, run), "checksums.sha256", "not a plain relative name inside the run")


def test_a_file_added_with_its_line_is_caught(written):  # designed here
    run = _copy(written)
    (run / "notes.txt").write_text("added later")
    with open(run / "checksums.sha256") as handle:
        lines = handle.read().splitlines()
    from verifily_train.hashing import sha256_file

    lines.append(f"{sha256_file(run / 'notes.txt')}  notes.txt")
    (run / "checksums.sha256").write_text("\n".join(sorted(lines, key=lambda l: l.split("  ", 1)[1])) + "\n")
    assert_user_error(_verify(written, run), LEDGER)


def test_a_file_renamed_with_its_line_is_caught(written):  # designed here
    run = _copy(written)
    (run / "slices.json").rename(run / "slices-v2.json")
    _rewrite_line(run, "slices.json", "slices-v2.json")
    assert_user_error(_verify(written, run), LEDGER)


def test_a_file_swapped_for_a_link_is_caught(written):  # designed here: same bytes, read from elsewhere
    run = _copy(written)
    elsewhere = run.parent / "config.yaml"
    shutil.copyfile(run / "config.yaml", elsewhere)
    (run / "config.yaml").unlink()
    os.symlink(elsewhere, run / "config.yaml")
    assert_user_error(_verify(written, run), "config.yaml", "is a link")


def test_a_run_without_a_ledger_entry_needs_its_root(written):  # designed here: a Run copied from elsewhere
    run = _copy(written, name="run_20200101_000000_abcdef")
    assert_user_error(_verify(written, run), "no ledger entry", "--root")
    assert _verify(written, run, "--root", written["root"]).returncode == 0
    assert_user_error(_verify(written, run, "--root", "sha256:" + "0" * 64), "does not match the root given")


def test_a_ledger_entry_is_never_overwritten(written, monkeypatch):  # designed here
    from verifily_train.artifacts.run import record_in_ledger
    from verifily_train.errors import RunError

    monkeypatch.setenv("VERIFILY_HOME", str(written["home"]))
    with pytest.raises(RunError, match="recorded already"):
        record_in_ledger(written["run"].name, "sha256:" + "0" * 64, 1)
    assert _verify(written, written["run"]).returncode == 0


# class 6: debris and half-states are never taken for Runs -------------------------------------------------------

def test_a_staging_folder_is_not_a_run(written):
    """What kill -9 inside write_artifact leaves: runs/.staging-<id>/ with a run.json saying completed."""
    staged = written["folder"] / "runs" / f".staging-{written['run'].name}x"
    shutil.copytree(written["run"], staged)
    try:
        assert json.loads((staged / "run.json").read_text())["status"] == "completed"
        for args in (["runs", "show", str(staged)], ["compare", str(written["run"]), str(staged)],
                     ["runs", "verify", str(staged)]):
            assert_user_error(run_cli(*args, cwd=written["folder"], env=written["env"]), "staging folder")
        listed = run_cli("runs", "list", "--json", cwd=written["folder"], env=written["env"])
        assert [r["run_id"] for r in json.loads(listed.stdout)] == [written["run"].name]
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def test_comparing_with_a_failed_run_is_refused(written, monkeypatch):
    from verifily_train.artifacts.run import load_run_json, write_failed_run

    monkeypatch.setenv("VERIFILY_HOME", str(written["home"]))
    runs = written["folder"] / "failed-runs"
    record = {k: v for k, v in load_run_json(written["run"]).items() if k in ("job", "started_at")}
    failed = write_failed_run(runs, "run_20260101_000000_fa11ed", record, RuntimeError("boom"))
    result = run_cli("compare", str(written["run"]), str(failed), cwd=written["folder"], env=written["env"])
    assert_user_error(result, "status is 'failed'", "only completed runs can be compared")
    assert not list(runs.glob(".failed-*"))  # no staging folder or lock file left beside it


@pytest.mark.parametrize("text", ["[1, 2]", "[" * 100_000, '{"job": [], "metrics": 5}'])
def test_one_corrupt_run_json_does_not_break_runs_list(written, text):
    runs = written["folder"] / f"runs-{abs(hash(text)) % 10_000}"
    shutil.copytree(written["run"], runs / written["run"].name)
    bad = runs / "run_20200101_000000_bad000"
    bad.mkdir()
    (bad / "run.json").write_text(text)
    listed = run_cli("runs", "list", "--runs-dir", str(runs), "--json", cwd=written["folder"], env=written["env"])
    assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stderr
    status = {r["run_id"]: r["status"] for r in json.loads(listed.stdout)}
    assert status[written["run"].name] == "completed"
    assert status[bad.name] in ("unreadable", "?")
    table = run_cli("runs", "list", "--runs-dir", str(runs), cwd=written["folder"], env=written["env"])
    assert table.returncode == 0 and written["run"].name in table.stdout
    shown = run_cli("runs", "show", str(bad), cwd=written["folder"], env=written["env"])
    if text.startswith("["):
        assert_user_error(shown, "run.json")


HOLD_LOCK = "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); " \
            "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(120)"


def test_a_new_run_sweeps_staging_left_by_killed_runs_but_not_live_ones(tmp_path):  # designed here
    from verifily_train.artifacts.run import discard, staging_dir

    runs = tmp_path / "runs"
    dead, alive = runs / ".staging-run_dead", runs / ".staging-run_alive"
    for folder in (dead, alive):
        folder.mkdir(parents=True)
        (folder / "run.json").write_text('{"status": "completed"}')
    (runs / ".failed-run_dead2").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, f"{alive}.lock"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        mine = staging_dir(runs, "run_new")
        assert not dead.exists() and not (runs / ".failed-run_dead2").exists()
        assert alive.is_dir() and mine.is_dir()
        discard(mine)
        assert not mine.exists() and not Path(f"{mine}.lock").exists()
    finally:
        holder.kill()
        holder.wait()
