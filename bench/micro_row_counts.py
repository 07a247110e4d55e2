"""Why packed bf16 rows are padded to a bucket: a matrix product's first call at a new row count.

``python -m bench.micro_row_counts [--threads 2]`` times ``x @ W.T`` for the hidden-512 bench model's and
SmolLM2-135M's projection shapes, in bf16 and fp32, three ways: at a row count seen before (warm), at a row
count never seen before in this process (each call a new count, as packed rows give nearly every step), and
at new counts rounded up to a multiple of 64 (``training.loss.PACK_BUCKET_TOKENS``). Medians over 40 calls
each. docs/bench-log.md records what it gave on this machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

SHAPES = {  # (in, out) of the projections a LoRA step multiplies by
    "bench-512 q/o": (512, 512),
    "bench-512 gate/up": (512, 1024),
    "bench-512 down": (1024, 512),
    "smollm2 q/o": (576, 576),
    "smollm2 gate/up": (576, 1536),
}


def _call_ms(x, weight) -> float:
    started = time.perf_counter()
    x @ weight.t()
    return (time.perf_counter() - started) * 1e3


def measure(fan_in: int, fan_out: int, dtype, rows: list, bucket: int = 64) -> dict:
    import torch

    weight = torch.randn(fan_out, fan_in).to(dtype)
    inputs = {m: torch.randn(m, fan_in).to(dtype) for m in set(rows) | {((m + bucket - 1) // bucket) * bucket for m in rows}}
    warm_rows = rows[0]
    for _ in range(3):
        _call_ms(inputs[warm_rows], weight)
    warm = [_call_ms(inputs[warm_rows], weight) for _ in rows]
    new = [_call_ms(inputs[m], weight) for m in rows]  # every count is new to this process
    buckets = [((m + bucket - 1) // bucket) * bucket for m in rows]
    bucketed = [_call_ms(inputs[m], weight) for m in buckets]
    return {"warm_ms": statistics.median(warm), "new_count_ms": statistics.median(new),
            "bucketed_ms": statistics.median(bucketed), "distinct_buckets": len(set(buckets))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.micro_row_counts", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    print("| shape | dtype | warm count, ms | new count, ms | new counts in buckets of 64, ms |")
    print("|---|---|---|---|---|")
    first = 150
    for name, (fan_in, fan_out) in SHAPES.items():
        for dtype in (torch.bfloat16, torch.float32):
            rows = list(range(first, first + 40))  # 40 counts this process has not multiplied at before
            first += 40
            result = measure(fan_in, fan_out, dtype, rows)
            print(f"| {name} ({fan_in} -> {fan_out}) | {str(dtype).split('.')[-1]} | {result['warm_ms']:.3f} | "
                  f"{result['new_count_ms']:.3f} | {result['bucketed_ms']:.3f} ({result['distinct_buckets']} buckets) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
