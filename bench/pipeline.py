"""Suite 2, whole-pipeline overhead: ``verifily train`` (cold, then an identical re-run) against its stages by hand."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from bench.cli_startup import verifily_command
from bench.common import alternate, median
from bench.data import write_skewed_splits


def write_config(work: Path, model_dir: Path, rows: int, eval_rows: int, epochs: int) -> Path:
    splits = write_skewed_splits(work / "pipeline-data", {"train": rows, "val": 8, "test": eval_rows}, seed=31)
    config = {
        "task": "sft", "base_model": str(model_dir),
        "data_paths": {k: str(v) for k, v in splits.items()},
        "training": {"num_epochs": epochs, "batch_size": 8, "gradient_accumulation_steps": 1, "learning_rate": 1e-3,
                     "max_seq_length": 96, "save_steps": 1000, "eval_steps": 1000},
        "lora": {"r": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"]},
        "eval": {"slice_by_tags": ["source", "kind"], "hard_examples": 10, "max_new_tokens": 8,
                 "bootstrap_samples": 200},
        "runtime": {"progress": False},
    }
    path = work / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _timed(cmd, env, cwd, expect: str = "") -> float:
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed:\n{done.stderr[-2000:]}")
    if expect and expect not in done.stdout:
        raise RuntimeError(f"{' '.join(map(str, cmd))} did not print {expect!r}:\n{done.stdout[-2000:]}")
    return seconds


def start_server(work: Path):
    """A Prefect server on a free loopback port, as ``verifily stack up`` runs one; returns (process, API URL)."""
    from verifily_train.procs import die_with_parent, free_port, wait_healthy

    port = free_port()
    env = dict(os.environ, PREFECT_HOME=str(work / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_UI_ENABLED="0")
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                             str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=die_with_parent)
    url = f"http://127.0.0.1:{port}/api"
    if wait_healthy(url, lambda: proc.poll() is None, 120, interval=0.2):
        return proc, url
    proc.kill()
    raise RuntimeError("the bench's Prefect server did not start")


def run_pipeline(model_dir: Path, work: Path, rows: int, eval_rows: int, epochs: int, reps: int, log=print,
                 configured_server: bool = True) -> dict:
    """Per repetition: a cold ``verifily train`` (fresh home), its identical re-run (replayed from the cache) and
    the same re-run through a Prefect flow run (``--flow``), with Prefect's temporary
    server (no server configured: what a bare CLI gets) and, with ``configured_server``, against a running
    server (``PREFECT_API_URL``, as after ``verifily stack up``); and the stages by hand."""
    config = write_config(work, model_dir, rows, eval_rows, epochs)
    base_env = dict(os.environ, HF_HUB_OFFLINE="1")
    base_env.pop("PREFECT_API_URL", None)  # the default: Prefect's temporary local server, as a user gets it
    counter = {"n": 0}

    def home() -> Path:
        counter["n"] += 1
        path = work / f"home-{counter['n']}"
        shutil.rmtree(path, ignore_errors=True)
        return path

    def cold_then_rerun(api_url=None):
        def run():
            h = home()
            env = dict(base_env, VERIFILY_HOME=str(h), **({"PREFECT_API_URL": api_url} if api_url else {}))
            cmd = [verifily_command(), "train", "-c", str(config)]
            cold = _timed(cmd, env, work)
            rerun = _timed(cmd, env, work, expect="replayed:")  # answered from the cache (verifily_train/pipeline/replay.py)
            flow = _timed(cmd + ["--flow"], env, work, expect="train cached")  # the same, through a Prefect flow run
            return {"seconds": cold, "rerun_seconds": rerun, "rerun_flow_seconds": flow}
        return run

    def by_hand():
        h = home()
        env = dict(base_env, VERIFILY_HOME=str(h))
        return {"seconds": _timed([sys.executable, "-m", "bench.by_hand", str(config), str(h / "runs")], env,
                                  Path(__file__).resolve().parents[1])}

    contenders = {"verifily_train": cold_then_rerun(), "by_hand": by_hand}
    server = None
    if configured_server:
        server, url = start_server(work)
        contenders["verifily_train_server"] = cold_then_rerun(url)
    log(f"pipeline: cold verifily train + identical re-run ({', '.join(k for k in contenders if k != 'by_hand')}) "
        f"vs stages by hand x {reps}")
    try:
        raw = alternate(contenders, reps, log)
    finally:
        if server is not None:
            from verifily_train.procs import stop

            stop(server, timeout=10)
    hand = median([o["seconds"] for o in raw["by_hand"]])
    result = {"reps": reps, "train_rows": rows, "epochs": epochs, "by_hand_seconds": hand, "raw": raw, "modes": {}}
    for name, label in (("verifily_train", "temporary server"), ("verifily_train_server", "configured server")):
        if name not in raw:
            continue
        cold = median([o["seconds"] for o in raw[name]])
        rerun = median([o["rerun_seconds"] for o in raw[name]])
        flow = median([o["rerun_flow_seconds"] for o in raw[name]])
        result["modes"][label] = {
            "cold_seconds": cold, "rerun_seconds": rerun, "rerun_flow_seconds": flow, "rerun_flow_over_cold": flow / cold,
            "cold_overhead": cold / hand - 1,
            "cold_overhead_seconds": cold - hand, "rerun_over_cold": rerun / cold,
            "target_overhead_under_10pct_met": cold / hand - 1 < 0.10, "target_rerun_under_5pct_met": rerun / cold < 0.05}
    result.update(result["modes"]["temporary server"])  # the headline keys: what a bare CLI gets
    return result
