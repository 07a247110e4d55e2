"""One train-stage lever on and off, warm, in one process: ``python -m bench.lever_ab --lever last_layer_at_labels``.

Trains the real train stage (``bench.ours``) on one regime's rows, once per arm to warm the caches, then
``--reps`` alternating repetitions of each arm (the order flips every repetition); prints each arm's
tokens/s and the paired ratios' median and range. A lever's own effect, with process start-up and first-run
kernel building out of it; the peers' comparison stays ``python -m bench``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lever_ab", description=__doc__.splitlines()[0])
    parser.add_argument("--lever", required=True, help="a speed.Levers field, turned off in the second arm")
    parser.add_argument("--model", default="bench-llama", choices=("smollm2", "bench-llama"))
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--regime", default="short", choices=("short", "skewed"))
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default=None)
    args = parser.parse_args(argv)

    from bench.common import TrainSettings, quiet_libraries, set_threads
    from bench.data import write_splits
    from bench.models import bench_llama, smollm2_folder
    from bench.ours import OurTrainStage

    set_threads(args.threads)
    quiet_libraries()
    work = Path(args.work or tempfile.mkdtemp(prefix="verifily-lever-ab-"))
    if args.model == "smollm2":
        model_dir, max_len, words = smollm2_folder(work / "smollm2-cache"), 96, 8.0
    else:
        model_dir, max_len, words = bench_llama(work / "models"), 256, 24.0
    settings = TrainSettings(rows=160, max_len=max_len)
    splits = write_splits(work / f"data-{args.regime}", {"train": settings.rows, "test": settings.eval_rows},
                          args.regime, median_words=words)
    stage = OurTrainStage(model_dir, splits["train"], splits["test"], settings, work / "run")
    arms = {"on": {}, "off": {args.lever: False}}
    for levers in arms.values():
        stage.train(precision=args.precision, keep_model=False, **levers)  # warm (untimed)
    rates = {name: [] for name in arms}
    for rep in range(args.reps):
        for name in (list(arms) if rep % 2 == 0 else list(arms)[::-1]):
            manifest = stage.train(precision=args.precision, keep_model=False, **arms[name])
            rates[name].append(manifest["train_tokens"] / manifest["train_seconds"])
    ratios = sorted(on / off for on, off in zip(rates["on"], rates["off"]))
    for name, values in rates.items():
        print(f"{name}: " + " / ".join(f"{v:,.0f}" for v in values) + " tok/s")
    print(f"{args.lever} on / off ({args.model}, {args.regime}, {args.precision}): median "
          f"{statistics.median(ratios):.3f} (min {ratios[0]:.3f}, max {ratios[-1]:.3f}) over {args.reps} pairs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
