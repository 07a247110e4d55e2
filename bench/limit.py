"""Suite 5, the physical limit: training FLOP/s of the train stage against this machine's torch.mm peak."""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Callable, Dict, List

from bench.common import TrainSettings, median
from bench.data import write_skewed_splits
from bench.isolated import isolated_runs
from bench.ours import OurTrainStage


def matmul_peak(dtype_name: str, n: int = 2048, reps: int = 5) -> float:
    """GFLOP/s of ``torch.mm`` on n x n matrices at the current thread count (median of ``reps``)."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - started)
    return 2 * n ** 3 / median(times) / 1e9


def model_dims(model_dir: Path) -> dict:
    import json

    config = json.loads((Path(model_dir) / "config.json").read_text())
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    inter, vocab = config["intermediate_size"], config["vocab_size"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    per_layer = hidden * heads * head_dim * 2 + hidden * kv * head_dim * 2 + 3 * hidden * inter
    return {"hidden": hidden, "layers": layers, "vocab": vocab, "body_params": per_layer * layers,
            "lora_per_layer_r1": (hidden + heads * head_dim) * 2 + (hidden + kv * head_dim) * 2
                                 + (hidden + inter) * 3}


def training_flops(dims: dict, lengths: List[int], label_tokens: int, lora_r: int, full: bool) -> float:
    """Useful FLOPs of one pass over rows of ``lengths``: 6NT (full) or 4NT + 6 N_lora T (LoRA) + attention + head.

    The head is counted at label positions only (the rest is not needed for the loss); attention is
    counted over each row's real length (causal masking not discounted, as in MFU conventions).
    """
    tokens = sum(lengths)
    n_body = dims["body_params"]
    per_token = 6 * n_body if full else 4 * n_body + 6 * dims["lora_per_layer_r1"] * lora_r * dims["layers"]
    attention = 12 * dims["layers"] * dims["hidden"] * sum(n * n for n in lengths)  # QK^T and AV, fwd + bwd
    head = (6 if full else 4) * dims["hidden"] * dims["vocab"] * label_tokens
    return per_token * tokens + attention + head


def bare_loop(model_dir: Path, examples: List[dict], batch_size: int, lr: float, full: bool, lora_r: int,
              steps: int):
    """(seconds, rows used) for ``steps`` steps of a bare PyTorch loop (no Trainer), length-sorted batches."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from bench.common import LLAMA_LINEAR

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if not full:
        model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules=LLAMA_LINEAR,
                                                 task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)][:steps]
    started = time.perf_counter()
    for batch in batches:
        width = max(len(examples[i]["input_ids"]) for i in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, i in enumerate(batch):
            n = len(examples[i]["input_ids"])
            ids[r, :n], labels[r, :n], mask[r, :n] = (torch.tensor(examples[i]["input_ids"]),
                                                     torch.tensor(examples[i]["labels"]), 1)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return time.perf_counter() - started, [examples[i] for b in batches for i in b]


def _examples(stage: OurTrainStage) -> List[dict]:
    from verifily_train.model.tokenize import TokenizedSplit

    split = TokenizedSplit(stage.tokenized_dir / "train.parquet", "sft")
    return [split[i] for i in range(len(split))]


@functools.lru_cache(maxsize=None)
def _stage(model_dir: Path, work: Path, settings: TrainSettings, train: Path, test: Path, mode: str) -> OurTrainStage:
    """The tokenized train stage of ``mode`` (lora/full), built once per process."""
    return OurTrainStage(model_dir, train, test, settings, work / mode, full_finetune=(mode == "full"))


def limit_runs(model_dir, work, settings, splits: dict, bf16: bool) -> Dict[str, Callable[[], dict]]:
    """{run: zero-argument run}: the train stage (LoRA/full x fp32/bf16) and the bare loops; nothing loads until
    a run starts (``bench.isolated`` calls this in each run's own process)."""
    model_dir, work = Path(model_dir), Path(work)
    settings = TrainSettings(**settings) if isinstance(settings, dict) else settings

    def stage(mode: str) -> OurTrainStage:
        return _stage(model_dir, work, settings, Path(splits["train"]), Path(splits["test"]), mode)

    def stage_run(mode: str, precision: str):
        def run():
            m = stage(mode).train(precision=precision, keep_model=False)
            return {"seconds": m["train_seconds"], "loss": m["train_loss"], "tokens_per_second": m["tokens_per_second"]}
        return run

    def bare(mode: str):
        def run():
            examples = _examples(stage("lora"))
            seconds, used = bare_loop(model_dir, examples, settings.batch_size, settings.learning_rate, mode == "full",
                                      settings.lora_r, len(examples) // settings.batch_size)
            return {"seconds": seconds, "lengths": [len(e["input_ids"]) for e in used]}
        return run

    precisions = ("fp32", "bf16") if bf16 else ("fp32",)
    runs = {f"{mode}_{p}": stage_run(mode, p) for p in precisions for mode in ("lora", "full")}
    runs.update({f"bare_loop_{mode}_fp32": bare(mode) for mode in ("lora", "full")})
    return runs


def run_limit(model_dir: Path, work: Path, settings: TrainSettings, reps: int, bf16: bool, median_words: float,
              matmul_n: int, log=print, isolate: bool = True) -> dict:
    """Peak GFLOP/s, then the train stage's (and a bare loop's) achieved GFLOP/s as a fraction of it.

    ``isolate``: each run in its own process (see ``bench.isolated``), else all in this one.
    """
    import dataclasses

    import torch

    peaks = {"fp32": matmul_peak("fp32", matmul_n)}
    if bf16:
        peaks["bf16"] = matmul_peak("bf16", matmul_n)
    log("matmul peak GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items()))
    splits = write_skewed_splits(work / "data", {"train": settings.rows, "test": 8}, seed=11, median_words=median_words)
    dims = model_dims(model_dir)
    kwargs = {"model_dir": str(model_dir), "work": str(work), "settings": dataclasses.asdict(settings),
              "splits": {k: str(v) for k, v in splits.items()}, "bf16": bf16}
    runs = limit_runs(**kwargs)
    # the lengths of the rows every run trains on (tokenizing here trains nothing)
    examples = _examples(_stage(Path(model_dir), Path(work), settings, Path(splits["train"]), Path(splits["test"]),
                                "lora"))
    lengths = [len(e["input_ids"]) for e in examples]
    label_tokens = sum(sum(1 for x in e["labels"][1:] if x != -100) for e in examples)
    if isolate:
        runs = isolated_runs("bench.limit:limit_runs", kwargs, list(runs), torch.get_num_threads(), work / "isolated")
    results = {}
    for rep in range(reps):
        for name, run in runs.items():
            outcome = run()
            if name.startswith("bare_loop_"):
                # the bare loop's head runs at every position: count what it really computed
                u_lengths = outcome["lengths"]
                flops = training_flops(dims, u_lengths, sum(u_lengths), settings.lora_r, "_full_" in name)
                results.setdefault(name, []).append({"gflops": flops / outcome["seconds"] / 1e9})
            else:
                flops = training_flops(dims, lengths, label_tokens, settings.lora_r, name.startswith("full")) * settings.epochs
                results.setdefault(name, []).append({"gflops": flops / outcome["seconds"] / 1e9, "loss": outcome["loss"],
                                                     "tokens_per_second": outcome["tokens_per_second"]})
            gflops = results[name][-1]["gflops"]
            log(f"  rep {rep + 1}/{reps} {name}: {gflops:.1f} GFLOP/s ({gflops / peaks['fp32']:.0%} of fp32 peak)"
                + (f", loss {outcome['loss']:.4f}" if "loss" in outcome else ""))
    table = {}
    for name, outcomes in results.items():
        g = median([o["gflops"] for o in outcomes])
        table[name] = {"gflops": g, "fraction_of_fp32_peak": g / peaks["fp32"],
                       "fraction_of_same_dtype_peak": g / peaks["bf16" if name.endswith("bf16") else "fp32"],
                       "train_loss": median([o.get("loss") for o in outcomes]),
                       "tokens_per_second": median([o.get("tokens_per_second") for o in outcomes])}
    verdict = {"lora_fp32_reaches_70pct": table["lora_fp32"]["fraction_of_fp32_peak"] >= 0.7,
               "full_fp32_reaches_70pct": table["full_fp32"]["fraction_of_fp32_peak"] >= 0.7}
    if bf16:
        for mode in ("lora", "full"):
            a, b = table[f"{mode}_bf16"], table[f"{mode}_fp32"]
            verdict[f"{mode}_bf16_speedup_over_fp32"] = a["gflops"] / b["gflops"]
            verdict[f"{mode}_bf16_loss_delta"] = (a["train_loss"] - b["train_loss"]) / b["train_loss"]
    return {"peaks_gflops": peaks, "matmul_n": matmul_n, "model_dims": dims, "settings": settings,
            "tokens_per_pass": sum(lengths), "mean_row_tokens": sum(lengths) / len(lengths), "runs": table,
            "verdict": verdict, "raw": results, "isolated": isolate}
