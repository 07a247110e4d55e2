"""A lever measured and dropped: one frozen product for q/k/v (or gate/up) instead of one per projection.

``python -m bench.micro_fused_projections [TOKENS]`` times, forward and backward, with the input requiring a
gradient and the weights frozen (as under LoRA), the projections of one layer done separately against
one product over their concatenated weights followed by a split. Shapes are SmolLM2-135M's and the
hidden-512 bench model's; the two variants alternate, and each median is over 30 repetitions.
docs/benchmarks.md ("Tried and dropped") records what it gave on this machine.
"""

from __future__ import annotations

import sys
import time

SHAPES = {
    "smollm2 q/k/v": (576, [576, 192, 192]),
    "smollm2 gate/up": (576, [1536, 1536]),
    "bench-512 q/k/v": (512, [512, 256, 256]),
    "bench-512 gate/up": (512, [1024, 1024]),
}


def time_pair(hidden: int, outs: list, dtype, tokens: int, reps: int = 30) -> dict:
    """Median milliseconds of the separate and the fused forward + backward."""
    import torch

    weights = [torch.randn(o, hidden, dtype=dtype) * 0.02 for o in outs]
    fused_weight = torch.cat(weights)
    x0 = torch.randn(tokens, hidden, dtype=dtype)

    def separate():
        x = x0.clone().requires_grad_()
        sum((torch.nn.functional.linear(x, w) * 1.0).sum() for w in weights).backward()

    def fused():
        x = x0.clone().requires_grad_()
        parts = torch.nn.functional.linear(x, fused_weight).split(outs, dim=-1)
        sum((part * 1.0).sum() for part in parts).backward()

    times = {"separate": [], "fused": []}
    for fn in (separate, fused, separate, fused):  # warm-up
        fn()
    for _ in range(reps):
        for name, fn in (("separate", separate), ("fused", fused)):
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return {name: sorted(values)[len(values) // 2] * 1e3 for name, values in times.items()}


def main(argv=None) -> None:
    import torch

    argv = sys.argv[1:] if argv is None else argv
    tokens = int(argv[0]) if argv else 1072
    torch.manual_seed(0)
    torch.set_num_threads(2)
    for dtype in (torch.float32, torch.bfloat16):
        for label, (hidden, outs) in SHAPES.items():
            ms = time_pair(hidden, outs, dtype, tokens)
            print(f"{str(dtype):15s} {label:18s} separate {ms['separate']:6.2f} ms  fused {ms['fused']:6.2f} ms  "
                  f"speed-up {ms['separate'] / ms['fused']:.2f}x")


if __name__ == "__main__":
    main()
