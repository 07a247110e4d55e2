"""The benchmark harness keeps working: its smoke size runs end to end and writes well-formed results.

Never asserts on time (the machine is shared and noisy): only that every contender ran, that the ratios
and losses are finite and sane, and that the summary table names every suite.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_bench_quick_writes_every_suite_result(tmp_path):
    out = tmp_path / "results"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "bench", "--quick", "--only", "throughput,limit,eval,cli",
                           "--out", str(out), "--work", str(tmp_path / "work")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    throughput = json.loads((out / "throughput-bench-llama-h32-l2.json").read_text())
    contenders = throughput["contenders"]
    assert {"peft_max_length", "peft_dynamic", "verifily", "verifily_plain"} <= set(contenders)
    for row in contenders.values():
        assert row["tokens_per_second"] > 0 and row["real_tokens"] > 0
        assert math.isfinite(row["eval_loss"]) and row["eval_loss"] > 0
        assert row["vs_fastest_fp32_peer"] > 0
    # every contender trains on the same rows: equal real-token counts
    assert len({row["real_tokens"] for row in contenders.values()}) == 1
    assert contenders["verifily"]["padding_fraction"] <= contenders["verifily_plain"]["padding_fraction"]
    assert set(throughput["verdicts"]["verifily"]) >= {"speedup_vs_fastest_fp32_peer", "target_1_5x_met"}

    limit = json.loads((out / "limit.json").read_text())
    assert limit["peaks_gflops"]["fp32"] > 0
    for name in ("lora_fp32", "full_fp32", "bare_loop_lora_fp32"):
        assert 0 < limit["runs"][name]["fraction_of_fp32_peak"] < 2

    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation["speedup"] > 0 and 0 <= evaluation["outputs_identical_fraction"] <= 1

    cli = json.loads((out / "cli.json").read_text())
    assert set(cli["commands"]) == {"verifily --help", "verifily runs list"}

    summary = (out / "summary.md").read_text()
    for heading in ("Training throughput", "Physical limit", "Evaluation", "CLI start-up"):
        assert heading in summary


def test_gpu_suite_plumbing_runs_on_the_cpu(tmp_path):
    """The GPU suite (peers in bf16, LoRA vs QLoRA, batched eval) is run for real only on a lent GPU; its dry
    run drives the same code on the CPU with a tiny model, so it cannot rot between GPU sessions."""
    out = tmp_path / "results"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "bench", "--quick", "--only", "gpu", "--gpu-dry-run",
                           "--out", str(out), "--work", str(tmp_path / "work")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    gpu = json.loads((out / "gpu.json").read_text())
    assert gpu["errors"] == {}
    contenders = gpu["throughput"]["contenders"]
    assert {"peft_dynamic_bf16", "verifily_bf16", "verifily_bf16_split", "verifily_bf16_recast"} <= set(contenders)
    # the levers change speed only: every contender of ours ends at the same loss (to bf16 rounding: a batch
    # run whole or as sub-batches gives its matmuls other shapes, so the last digits may move)
    ours = [row["train_loss"] for name, row in contenders.items() if name.startswith("verifily_bf16")]
    assert len(ours) == 3 and max(ours) - min(ours) <= 1e-5 * max(ours)
    quant = gpu["quantization-tiny"]["runs"]
    assert set(quant) == {"none", "4bit"} and all(r["tokens_per_second"] > 0 for r in quant.values())
    assert gpu["eval"]["speedup"] > 0
    assert "LoRA bf16 vs QLoRA 4-bit" in (out / "summary.md").read_text()


def test_each_contender_trains_in_a_fresh_process(tmp_path):
    """Full runs isolate every training run (bench/isolated.py: a run's allocator state slows the next one):
    each contender trains in its own process, and its figures come back intact."""
    sys.path.insert(0, str(REPO))
    from bench.common import TrainSettings
    from bench.models import bench_llama
    from bench.throughput import run_throughput

    model = bench_llama(tmp_path / "models", 32, 2)
    result = run_throughput("tiny", model, tmp_path / "work", TrainSettings(rows=16, max_len=64, eval_rows=8), 1,
                            False, contenders=["peft_dynamic", "verifily"], isolate=True, log=lambda _: None)
    assert result["isolated"] is True
    processes = [o["process"] for runs in result["raw"].values() for o in runs]
    assert len(processes) == 2 and len(set(processes)) == 2 and os.getpid() not in processes
    for row in result["contenders"].values():
        assert row["tokens_per_second"] > 0 and math.isfinite(row["eval_loss"])
    assert result["contenders"]["verifily"]["real_tokens"] == result["contenders"]["peft_dynamic"]["real_tokens"]


def test_steady_rate_leaves_out_the_first_quarter_and_a_failing_contender_spares_the_others():
    """``StepClock``: the rate after the warm-up (a compiled run compiles in its first steps); ``alternate`` with
    ``failed`` records a contender that raises, leaves it out whole, and runs the rest."""
    sys.path.insert(0, str(REPO))
    from bench.common import StepClock, alternate

    clock = StepClock()
    clock.marks = [(1, 8, 100.0), (2, 8, 101.0), (3, 8, 102.0), (8, 8, 107.0)]  # step 1 took 100 s (compiling)
    # first mark at or past 8/4 = 2 steps: 6 of the 8 steps' share of 800 tokens in 6 s
    assert clock.steady_tokens_per_second(800.0) == 600 / 6.0
    assert StepClock().steady_tokens_per_second(800.0) is None

    def boom():
        raise RuntimeError("no GPU")

    failed = {}
    lines = []
    raw = alternate({"ok": lambda: {"tokens_per_second": 1.0}, "bad": boom}, 2, lines.append, failed)
    assert list(raw) == ["ok"] and len(raw["ok"]) == 2
    assert failed == {"bad": "RuntimeError: no GPU"} and sum("FAILED" in line for line in lines) == 1
    with pytest.raises(RuntimeError):
        alternate({"bad": boom}, 1, lines.append)
