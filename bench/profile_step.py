"""Where a train-stage step goes: ``python -m bench.profile_step [--regime short] [--precision bf16]``.

Runs the real train stage (``bench.ours``) once on one regime's rows under ``torch.profiler`` (operator
self-times, CPU) and ``cProfile`` (Python time, the Trainer's per-step work and callbacks included),
and prints both tables. A diagnosis for docs/benchmarks.md, not a benchmark: profiling slows every op.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import tempfile
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_step", description=__doc__.splitlines()[0])
    parser.add_argument("--regime", default="short", choices=("short", "skewed"))
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--model", default="smollm2", choices=("smollm2", "bench-llama"))
    parser.add_argument("--rows", type=int, default=160)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default=None)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--no-torch-profiler", action="store_true", help="cProfile only (lighter)")
    parser.add_argument("--off", default="", help="comma-separated speed.Levers fields to turn off (e.g. last_layer_at_labels)")
    args = parser.parse_args(argv)

    from bench.common import TrainSettings, quiet_libraries, set_threads
    from bench.data import write_splits
    from bench.models import bench_llama, smollm2_folder
    from bench.ours import OurTrainStage

    set_threads(args.threads)
    quiet_libraries()
    work = Path(args.work or tempfile.mkdtemp(prefix="verifily-profile-"))
    if args.model == "smollm2":
        model_dir, max_len = smollm2_folder(work / "smollm2-cache"), 96
    else:
        model_dir, max_len = bench_llama(work / "models"), 256
    settings = TrainSettings(rows=args.rows, max_len=max_len)
    splits = write_splits(work / f"data-{args.regime}", {"train": settings.rows, "test": settings.eval_rows},
                          args.regime, median_words=8.0 if args.model == "smollm2" else 24.0)
    stage = OurTrainStage(model_dir, splits["train"], splits["test"], settings, work / f"run-{args.regime}")
    levers = {name: False for name in args.off.split(",") if name}
    stage.train(precision=args.precision, keep_model=False, **levers)  # warm the caches the first run fills (untimed)

    profiler = cProfile.Profile()
    if args.no_torch_profiler:
        profiler.enable()
        manifest = stage.train(precision=args.precision, keep_model=False, **levers)
        profiler.disable()
    else:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            profiler.enable()
            manifest = stage.train(precision=args.precision, keep_model=False, **levers)
            profiler.disable()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    print(f"train stage: {manifest['train_tokens']} tokens in {manifest['train_seconds']:.2f} s "
          f"({manifest['tokens_per_second']:.1f} tok/s under the profiler), {manifest['global_step']} steps")
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(args.top * 2)
    print(text.getvalue())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
