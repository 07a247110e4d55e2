"""Attribution orchestration in the library: a tag-level attribution runs end to end without Prefect through an
injected arm runner; its outputs are checksummed and a changed byte is caught on read; an ablation worker
answers through its result file and dies with its parent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from verifily_train.attribution.orchestrate import Runner, run_bounded
from verifily_train.attribution.output import load_attribution, publish_outputs
from verifily_train.attribution.workers import run_worker
from verifily_train.errors import RunError

LIBRARY_ATTRIBUTION = r'''
import json, sys
from pathlib import Path
import yaml
from verifily_train.attribution.options import AttributeOptions
from verifily_train.attribution.orchestrate import Runner, attribute
from verifily_train.attribution.output import load_attribution
from verifily_train.config import load_config
from verifily_train.fixtures.data import write_splits
from verifily_train.pipeline.fingerprint import fingerprint_stage
from verifily_train.pipeline.runner import CacheSettings, compute_stage, run_pipeline

folder, model = Path(sys.argv[1]), sys.argv[2]


def train(config, overrides, runs_dir):
    cfg = load_config(str(config), list(overrides))
    cache = CacheSettings.for_config(cfg)
    fp = fingerprint_stage(cfg, Path(cache.root))
    return run_pipeline(cfg, fp, Path(runs_dir), cache, lambda stage, ctx: compute_stage(stage, ctx, cache))["path"]


splits = write_splits(folder / "data", "classification", {"train": 40, "val": 8, "test": 16}, seed=4)
(folder / "train.yaml").write_text(yaml.safe_dump({
    "task": "classification", "base_model": model, "data_paths": {k: str(v) for k, v in splits.items()},
    "training": {"num_epochs": 1, "batch_size": 8, "gradient_accumulation_steps": 1, "learning_rate": 5e-3,
                 "max_seq_length": 32, "save_steps": 1000, "eval_steps": 1000},
    "lora": {"enabled": False}, "eval": {"bootstrap_samples": 0, "hard_examples": 2},
    "cache": {"dir": str(folder / "cache")}}))
parent = train(folder / "train.yaml", [], folder / "runs")
options = AttributeOptions(run=str(parent), by="source", values=["ai_contaminated"], seeds=1, controls=1,
                           concurrency=1, bootstrap_samples=0)
trained = []
result = attribute(options, Runner(lambda job: trained.append(job.arm) or train(job.config, job.overrides,
                                                                                  job.runs_dir)))
saved = load_attribution(Path(result["path"]))
print(json.dumps({"prefect_imported": "prefect" in sys.modules, "trained": trained, "path": result["path"],
                  "verdict": result["values"]["ai_contaminated"]["verdict"],
                  "saved_verdict": saved["values"]["ai_contaminated"]["verdict"]}))
'''


def test_a_tag_attribution_runs_through_the_library_without_prefect(models, tmp_path):
    script = tmp_path / "attribute_in_library.py"
    script.write_text(LIBRARY_ATTRIBUTION)
    done = subprocess.run([sys.executable, str(script), str(tmp_path), str(models["bert"])], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["prefect_imported"] is False
    full, value, control = report["trained"]  # one seed: the full data, the value removed, one random control
    assert (full, value) == ("__full__", "ai_contaminated") and control.startswith("__random_")
    assert report["verdict"] == report["saved_verdict"]
    out = Path(report["path"])
    assert not (out / "attribution.json").stat().st_mode & 0o222 and (out / "checksums.sha256").is_file()


ROWS_IN_LIBRARY = r'''
import json, sys
from pathlib import Path
from verifily_train.attribution.options import RowOptions
from verifily_train.pipeline.row_orchestrate import attribute_rows, row_runner

first = attribute_rows(RowOptions(run=sys.argv[1], shards=2), row_runner())
again = attribute_rows(RowOptions(run=sys.argv[1], shards=2), row_runner())
print(json.dumps({"prefect_imported": "prefect" in sys.modules, "train_rows": first["train_rows"],
                  "path": first["path"], "reused": again.get("reused"),
                  "hits": sum(s["cache_hit"] for s in again["stages_now"].values()), "stages": len(again["stages_now"])}))
'''


def test_row_attribution_runs_through_the_library_without_prefect(models, tmp_path):
    script = tmp_path / "attribute_in_library.py"
    script.write_text(LIBRARY_ATTRIBUTION.split("options = AttributeOptions")[0] + "print(parent)\n")
    trained = subprocess.run([sys.executable, str(script), str(tmp_path), str(models["bert"])], capture_output=True,
                             text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]
    parent = trained.stdout.strip().splitlines()[-1]
    (tmp_path / "rows_in_library.py").write_text(ROWS_IN_LIBRARY)
    done = subprocess.run([sys.executable, str(tmp_path / "rows_in_library.py"), parent], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["prefect_imported"] is False and report["train_rows"] == 40
    assert report["reused"] is True and report["hits"] == report["stages"] == 4  # target, 2 shards, merge
    assert load_attribution(Path(report["path"]))["kind"] == "rows"


def test_a_changed_byte_in_attribution_json_is_one_line_naming_the_file(tmp_path):
    folder = tmp_path / "attributions" / "run_x-by-source"
    publish_outputs(folder, {"values": {"web": {"verdict": "hurts"}}}, "<html></html>")
    assert load_attribution(folder)["values"]["web"]["verdict"] == "hurts"
    path = folder / "attribution.json"
    data = bytearray(path.read_bytes())
    data[data.index(b"hurts")] = ord("H")
    os.chmod(path, 0o644)
    path.write_bytes(bytes(data))
    with pytest.raises(RunError) as caught:
        load_attribution(folder)
    message = str(caught.value)
    assert "attribution.json" in message and "sha256 mismatch" in message and "\n" not in message
    # a second identical call publishes over the first: the listing goes first, so no reader sees a mix
    publish_outputs(folder, {"values": {"web": {"verdict": "none"}}}, "<html></html>")
    assert load_attribution(folder)["values"]["web"]["verdict"] == "none"
    assert not [p for p in folder.iterdir() if p.name.startswith(".staging-")]


def test_the_bounded_loop_keeps_order_and_never_exceeds_its_limit():
    import threading

    running, peak, lock = [0], [0], threading.Lock()

    def step(i):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.01 * (5 - i % 5))
        with lock:
            running[0] -= 1
        return i * i

    runner = Runner(steps={"square": step})
    assert run_bounded(runner, [("square", i) for i in range(12)], 3) == [i * i for i in range(12)]
    assert peak[0] <= 3


WORKER = r'''
import os, signal, sys, time
from verifily_train.attribution.workers import exit_with_parent, parse_worker_args, write_result
job, result, parent = parse_worker_args(sys.argv[1:])
exit_with_parent(parent)
print("{not the result}")  # stdout is not the protocol
if job.get("sleep"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as a flow engine's own handler would keep it running
    open(job["pid_file"], "w").write(str(os.getpid()))
    time.sleep(600)
write_result(result, {"path": job["answer"]})
'''

PARENT = r'''
import os, sys
from verifily_train.attribution.workers import run_worker
run_worker("fake_worker", {"sleep": True, "pid_file": sys.argv[1]}, dict(os.environ), "ablation x seed 0")
'''


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_worker_answers_through_its_result_file_and_dies_with_its_parent(tmp_path, monkeypatch):
    (tmp_path / "fake_worker.py").write_text(WORKER)
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    assert run_worker("fake_worker", {"answer": "/runs/run_1"}, env, "ablation x seed 0") == {"path": "/runs/run_1"}

    (tmp_path / "parent.py").write_text(PARENT)
    pid_file = tmp_path / "worker.pid"
    parent = subprocess.Popen([sys.executable, str(tmp_path / "parent.py"), str(pid_file)], env=env)
    try:
        for _ in range(1500):
            if pid_file.exists() and pid_file.read_text():
                break
            time.sleep(0.02)
        worker = int(pid_file.read_text())
        assert _alive(worker)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(worker), "the worker outlived its killed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
