"""GPU path (runs only where CUDA is visible; NOT yet run on a GPU): LoRA bf16 against QLoRA 4-bit.

Real-size config: SmolLM2-135M (the largest model available offline) at batch 16 x up to 512 tokens.
Reports tokens/s, MFU against the measured bf16 ``torch.mm`` peak, and peak GPU memory.
"""

from __future__ import annotations

import time
from pathlib import Path

from bench.common import TrainSettings, median
from bench.data import write_skewed_splits
from bench.limit import model_dims, training_flops


def cuda_matmul_peak(n: int = 8192, reps: int = 10) -> float:
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    torch.mm(a, b)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        torch.mm(a, b)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return 2 * n ** 3 / median(times) / 1e9


def run_gpu(model_dir: Path, work: Path, reps: int, log=print) -> dict:
    import dataclasses

    import torch

    from bench.ours import OurTrainStage
    from verifily_train.training.device import DevicePlan
    from verifily_train.training.tokenize import TokenizedSplit

    settings = TrainSettings(rows=512, batch_size=16, max_len=512, eval_rows=8, learning_rate=2e-4)
    splits = write_skewed_splits(work / "gpu-data", {"train": settings.rows, "test": 8}, seed=41, median_words=60)
    peak = cuda_matmul_peak()
    dims = model_dims(model_dir)
    results = {}
    for quant in ("none", "4bit"):
        stage = OurTrainStage(model_dir, splits["train"], splits["test"], settings, work / f"gpu-{quant}",
                              extra=[f"lora.quantization={quant}", "compute.device=cuda"])
        split = TokenizedSplit(stage.tokenized_dir / "train.parquet", "sft")
        lengths = [len(split[i]["input_ids"]) for i in range(len(split))]
        labels = sum(sum(1 for x in split[i]["labels"][1:] if x != -100) for i in range(len(split)))
        stage.fp["device"] = {"device": "cuda", "precision": "bf16", "warnings": []}
        for _ in range(reps):
            torch.cuda.reset_peak_memory_stats()
            from verifily_train.stages import _spec
            from verifily_train.training.models import load_tokenizer
            from verifily_train.training.trainer import train_adapter
            import tempfile

            out = Path(tempfile.mkdtemp(dir=stage.work))
            m = train_adapter(stage.cfg, _spec(stage.fp), load_tokenizer(_spec(stage.fp)), stage.tokenized,
                              stage.tokenized_dir, DevicePlan("cuda", "bf16"), out / "out", out / "work")
            flops = training_flops(dims, lengths, labels, settings.lora_r, False) * settings.epochs
            results.setdefault(quant, []).append({"tokens_per_second": m["tokens_per_second"],
                                                  "mfu": flops / m["train_seconds"] / 1e9 / peak,
                                                  "peak_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30,
                                                  "loss": m["train_loss"]})
            log(f"  gpu {quant}: {results[quant][-1]}")
    table = {q: {k: median([o[k] for o in rows]) for k in rows[0]} for q, rows in results.items()}
    return {"device": torch.cuda.get_device_name(0), "bf16_peak_gflops": peak, "settings": dataclasses.asdict(settings),
            "runs": table, "raw": results}
