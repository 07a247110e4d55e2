"""``python -m bench [--quick] [--only throughput,pipeline,eval,cli,limit,aa,attribution,rows,headline,gpu]``: run, print a table, write JSON.

Every suite runs its contenders alternately, ``--reps`` times (training runs each in a fresh process,
``bench/isolated.py``), and reports medians and ratios (machines are noisy: the ratios are the result).
Results go to ``bench/results/<suite>.json`` and ``bench/results/summary.md``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import List

from bench.common import RESULTS, TrainSettings, machine, markdown_table, quiet_libraries, set_threads, write_result
from bench.data import REGIMES

SUITES = ("throughput", "pipeline", "eval", "cli", "limit", "aa", "attribution", "rows", "headline", "gpu")


def parse(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, tiny data, one repetition (CI smoke)")
    parser.add_argument("--only", default=",".join(s for s in SUITES if s != "gpu"),
                        help=f"comma-separated suites among {', '.join(SUITES)} (gpu runs only where CUDA is visible)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per contender (default 3, quick 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--out", default=str(RESULTS), help="results folder")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--smollm2-rows", type=int, default=160, help="training rows for the SmolLM2 throughput run")
    parser.add_argument("--epochs", type=int, default=1,
                        help="epochs of every throughput run (default 1: 20 steps of 160 rows; more steps let the "
                             "held-out loss settle, so 'equal loss' can be read at 1%%; results go to "
                             "throughput-<model>[-<regime>]-e<N>.json)")
    parser.add_argument("--gpu-archs", default="smollm2-135m,smollm2-1.7b",
                        help="architectures of the gpu suite (the first one runs throughput and eval)")
    parser.add_argument("--gpu-parts", default="throughput,quantization,eval", help="parts of the gpu suite")
    parser.add_argument("--gpu-rows", type=int, default=512, help="training rows of the gpu suite's throughput part")
    parser.add_argument("--gpu-dry-run", action="store_true",
                        help="run the gpu suite's plumbing on the CPU with a tiny model (a check, not figures)")
    parser.add_argument("--contenders", default=None,
                        help="comma-separated throughput contenders to run (default: all of them)")
    parser.add_argument("--regimes", default=None,
                        help="comma-separated row-length regimes of the throughput suite among skewed, short "
                             "(bench/data.py; default: both, --quick: skewed)")
    parser.add_argument("--models", default=None,
                        help="comma-separated throughput models among bench-llama, smollm2 (default: both)")
    parser.add_argument("--pipeline-model", default="bench-llama", choices=("bench-llama", "smollm2"),
                        help="the pipeline suite's model (default: the hidden-512 bench model, a ~17 s job; smollm2: "
                             "a job the size of the README demo's)")
    parser.add_argument("--in-process", action="store_true",
                        help="run every contender in this process (default: each run of the throughput and limit "
                             "suites in its own process, as bench/isolated.py explains; --quick implies it)")
    parser.add_argument("--render", action="store_true",
                        help="only re-render summary.md from the JSON results in --out (throughput ratios recomputed)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    if args.render:
        print(render(Path(args.out)))
        return 0
    set_threads(args.threads)
    quiet_libraries()
    only: List[str] = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in SUITES]
    if unknown:
        raise SystemExit(f"--only: unknown suite(s) {', '.join(unknown)}; choose among {', '.join(SUITES)}")
    reps = args.reps or (1 if args.quick else 3)
    isolate = not (args.quick or args.in_process)
    out = Path(args.out)
    work = Path(args.work or tempfile.mkdtemp(prefix="verifily-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, {args.threads} threads, bf16 kernels: "
          f"{info['torch_bf16_kernels']}, CUDA: {info['cuda']}")
    sections = [f"Machine: {info['cpu']}, {info['cores']} cores, torch threads {args.threads}, "
                f"AVX512-BF16 {info['avx512_bf16']}, AMX-BF16 {info['amx_bf16']}, torch {info['torch']}, "
                f"CUDA {info['cuda']}; repetitions {reps}{' (quick)' if args.quick else ''}."]
    from bench.models import bench_llama, smollm2_folder

    hidden, layers = (32, 2) if args.quick else (512, 4)
    bench_model = bench_llama(work / "models", hidden, layers)
    smollm2 = None if args.quick else smollm2_folder(work / "smollm2-cache")
    bf16 = info["torch_bf16_kernels"]
    started = time.time()

    if "throughput" in only:
        from bench.throughput import run_throughput

        runs = [(f"bench-llama-h{hidden}-l{layers}", bench_model,
                 TrainSettings(rows=16 if args.quick else 160, max_len=64 if args.quick else 256, eval_rows=8 if args.quick else 40,
                               epochs=args.epochs),
                 8.0 if args.quick else 24.0)]
        if smollm2 is not None:
            runs.append(("smollm2-135m", smollm2, TrainSettings(rows=args.smollm2_rows, max_len=96, epochs=args.epochs),
                         8.0))
        if args.models:
            wanted = [m.strip() for m in args.models.split(",") if m.strip()]
            runs = [r for r in runs if any(r[0].startswith(m) for m in wanted)]
        contenders = [c.strip() for c in args.contenders.split(",")] if args.contenders else None
        regimes = [r.strip() for r in (args.regimes or ("skewed" if args.quick else ",".join(REGIMES))).split(",")]
        unknown = [r for r in regimes if r not in REGIMES]
        if unknown:
            raise SystemExit(f"--regimes: unknown regime(s) {', '.join(unknown)}; choose among {', '.join(REGIMES)}")
        for regime in regimes:
            for name, model_dir, settings, words in runs:
                stem = throughput_stem(name, regime, args.epochs)
                result = run_throughput(name, model_dir, work / stem, settings, reps, bf16, words,
                                        isolate=isolate, contenders=contenders, regime=regime)
                result["machine"] = info
                write_result(stem, result, out)
                sections.append(throughput_table(result))
    if "limit" in only:
        from bench.limit import run_limit

        settings = (TrainSettings(rows=16, batch_size=8, max_len=64) if args.quick
                    else TrainSettings(rows=96, batch_size=12, max_len=512))
        result = run_limit(bench_model, work / "limit", settings, reps, bf16, 10.0 if args.quick else 80.0,
                           256 if args.quick else 2048, isolate=isolate)
        result["machine"] = info
        write_result("limit", result, out)
        sections.append(limit_table(result))
    if "eval" in only:
        from bench.evaluation import run_evaluation

        model_dir = smollm2 or bench_model
        result = run_evaluation(model_dir, work, 6 if args.quick else 32, 16, 4 if args.quick else 16, reps)
        result.update(machine=info, model=Path(model_dir).name if smollm2 is None else "smollm2-135m")
        write_result("eval", result, out)
        sections.append(eval_table(result))
    if "cli" in only:
        from bench.cli_startup import run_cli_startup

        result = run_cli_startup(work, 1 if args.quick else 5)
        result["machine"] = info
        write_result("cli", result, out)
        sections.append(cli_table(result))
    if "aa" in only:
        from bench.aa import aa_table, run_aa
        from verifily_train.config.schema import DEFAULT_REPLICATES

        # the default replicate count; 100 A/A pairs (the yardstick's >= 100 calls), power on the first 30
        result = run_aa(work, 2 if args.quick else 100, DEFAULT_REPLICATES, 2 if args.quick else 30)
        result["machine"] = info
        write_result("aa", result, out)
        sections.append(aa_table(result))
    if "headline" in only:
        from bench.hard_headline import render as headline_table, run as run_headline

        result = run_headline(200 if args.quick else 2000, 1.0)
        write_result("hard_headline", result, out)
        sections.append("### Hard-example headline\n\n" + headline_table(result))
    if "rows" in only:
        from bench.row_attribution import main as run_rows, render as rows_table

        # planted-error detection by every row-attribution method; --quick: 1 trial of two experiments
        name = "rows-quick" if args.quick else "rows"
        run_rows((["--trials", "1", "--kinds", "cls-0.1,sft-0.1"] if args.quick else []) + ["--out", str(out / f"{name}.json")])
        record = json.loads((out / f"{name}.json").read_text())
        sections.append("### Row-level attribution on planted errors\n\n" + rows_table(record["summary"]))
    if "attribution" in only:
        from bench.attribution import main as run_attribution_calibration, render as attribution_table

        # trials resume from bench/results/attribution-<regime>.json of the same settings; --quick: 1 trial, 3 seeds
        if args.quick:
            run_attribution_calibration(["--trials", "1", "--seeds", "3", "--regimes", "noisy",
                                         "--kinds", "placebo-coin,power", "--out-dir", str(out / "attribution-quick")])
            names = [out / "attribution-quick" / "attribution-noisy.json"]
        else:
            where = ["--out-dir", str(out)]
            run_attribution_calibration(["--regimes", "noisy", "--trials", "40"] + where)
            run_attribution_calibration(["--regimes", "low-noise", "--kinds", "placebo-coin,shifted,power", "--trials",
                                         "40", "--kind-trials", "shifted=20,power=12"] + where)
            names = [out / f"attribution-{regime}.json" for regime in ("noisy", "low-noise")]
        for path in names:
            record = json.loads(path.read_text())
            sections.append(f"### Attribution calibration ({record['settings']['regime']}, "
                            f"{record['settings']['seeds']} seeds)\n\n" + attribution_table(record["summary"]))
    if "pipeline" in only:
        from bench.pipeline import run_pipeline

        pipeline_model = smollm2 if args.pipeline_model == "smollm2" and smollm2 is not None else bench_model
        on_smollm2 = pipeline_model == smollm2
        result = run_pipeline(pipeline_model, work, 24 if args.quick else 160, 8 if args.quick else 24,
                              1 if args.quick or on_smollm2 else 2, reps if args.quick else max(1, reps - 1))
        result["model"] = "smollm2-135m" if on_smollm2 else Path(pipeline_model).name
        result["machine"] = info
        write_result("pipeline-smollm2" if on_smollm2 else "pipeline", result, out)
        sections.append(pipeline_table(result))
    if "gpu" in only:
        import torch

        if torch.cuda.is_available() or args.gpu_dry_run:
            from bench.gpu import gpu_tables, run_gpu

            result = run_gpu(work, reps, smollm2=smollm2, archs=args.gpu_archs.split(","),
                             parts=args.gpu_parts.split(","), dry_run=args.gpu_dry_run, isolate=isolate,
                             rows=args.gpu_rows, contenders=args.contenders.split(",") if args.contenders else None)
            result["machine"] = info
            write_result("gpu", result, out)
            if "throughput" in result:
                result["throughput"]["machine"] = info
                write_result("throughput-gpu", result["throughput"], out)
                sections.append(throughput_table(result["throughput"]))
            sections.append(gpu_tables(result))
        else:
            sections.append("### GPU\n\nskipped: no CUDA device")
    summary = "\n\n".join(sections) + f"\n\n(total {time.time() - started:.0f} s)\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(summary, encoding="utf-8")
    print("\n" + summary)
    return 0


def render(out: Path) -> str:
    """summary.md from the JSON results already in ``out`` (throughput summaries recomputed from their raw runs)."""
    import json

    from bench.throughput import summarize

    sections = []
    for path in sorted(out.glob("throughput-*.json")):
        result = json.loads(path.read_text())
        machine_info = result.get("machine")
        result = summarize(result["model"], result["settings"], result["raw"], result["trl_installed"],
                           result.get("regime", "skewed"))
        result["machine"] = machine_info
        write_result(path.stem, result, out)
        sections.append(throughput_table(result))
    if (out / "limit.json").is_file():
        sections.append(limit_table(json.loads((out / "limit.json").read_text())))
    if (out / "aa.json").is_file():
        from bench.aa import aa_table

        sections.append(aa_table(json.loads((out / "aa.json").read_text())))
    for name in ("attribution", "attribution-8-seeds"):
        if (out / f"{name}.json").is_file():
            from bench.attribution import render as attribution_table

            record = json.loads((out / f"{name}.json").read_text())
            sections.append(f"### Attribution calibration ({record['settings']['seeds']} seeds)\n\n"
                            + attribution_table(record["summary"]))
    for name, fn in (("eval", eval_table), ("cli", cli_table), ("pipeline", pipeline_table),
                     ("pipeline-smollm2", pipeline_table)):
        if (out / f"{name}.json").is_file():
            sections.append(fn(json.loads((out / f"{name}.json").read_text())))
    summary = "\n\n".join(sections) + "\n"
    (out / "summary.md").write_text(summary, encoding="utf-8")
    return summary


def eval_table(result: dict) -> str:
    loops = result.get("loop_seconds") or {"one_at_a_time": result["one_at_a_time_seconds"]}
    return (f"### Evaluation ({result['model']}, {result['prompts']} prompts, batch {result['batch_size']}, "
            f"{result['max_new_tokens']} new tokens; batched in {result.get('precision', 'fp32')}, the stage's "
            "precision here)\n\n" + markdown_table(
                [f"{name} (s)" for name in loops] + ["batched (s)", "speedup vs the faster loop", "target 5x",
                                                     "outputs identical to the fp32 loop"],
                [[*loops.values(), result["batched_seconds"], result["speedup"],
                  "met" if result["target_5x_met"] else "missed", result["outputs_identical_fraction"]]]))


def cli_table(result: dict) -> str:
    return "### CLI start-up\n\n" + markdown_table(
        ["command", "seconds (median)", "target < 1 s"],
        [[k, v["seconds"], "met" if v["target_under_1s_met"] else "missed"] for k, v in result["commands"].items()])


def pipeline_table(result: dict) -> str:
    modes = result.get("modes") or {"temporary server": result}
    return (f"### Whole pipeline ({result.get('model', 'bench model')}, {result['train_rows']} rows x {result['epochs']} epochs; stages by hand "
            f"{result['by_hand_seconds']:.1f} s)\n\n" + markdown_table(
                ["Prefect API", "cold `verifily train` (s)", "overhead", "target < 10%", "identical re-run (s)",
                 "re-run / cold", "target < 5%", "re-run with `--flow` (s)", "`--flow` re-run / cold"],
                [[label, m["cold_seconds"], f"{m['cold_overhead']:+.1%} ({m['cold_seconds'] - result['by_hand_seconds']:+.1f} s)",
                  "met" if m["target_overhead_under_10pct_met"] else "missed", m["rerun_seconds"],
                  f"{m['rerun_over_cold']:.1%}", "met" if m["target_rerun_under_5pct_met"] else "missed",
                  m.get("rerun_flow_seconds", "-"),
                  f"{m['rerun_flow_over_cold']:.1%}" if "rerun_flow_over_cold" in m else "-"]
                 for label, m in modes.items()]))


def throughput_stem(model_name: str, regime: str, epochs: int = 1) -> str:
    """The results file of one model, regime and epoch count (the skewed regime keeps its historical name)."""
    return f"throughput-{model_name}" + ("" if regime == "skewed" else f"-{regime}") + ("" if epochs == 1 else f"-e{epochs}")


def throughput_table(result: dict) -> str:
    rows = []
    for name, row in result["contenders"].items():
        reps = row.get("vs_same_precision_peer_reps") or []
        rows.append([name, row["description"], row["tokens_per_second"], row.get("vs_same_precision_peer"),
                     f"{min(reps):.3g}-{max(reps):.3g}" if reps else None, row.get("same_precision_peer"),
                     row.get("vs_fastest_fp32_peer"), row.get("vs_fastest_peer"), row["eval_loss"],
                     f"{row.get('vs_same_precision_peer_loss_delta', row.get('vs_fastest_peer_loss_delta', 0)):+.2%}",
                     row["train_loss"], row["padding_fraction"],
                     row.get("steady_tokens_per_second"), row.get("steady_vs_fastest_peer")])
    s = result["settings"]
    head = (f"### Training throughput: {result['model']}, {result.get('regime', 'skewed')} rows (LoRA r={s['lora_r']} "
            f"all-linear, {s['rows']} rows, batch {s['batch_size']}, max {s['max_len']} tokens, {s['epochs']} epoch; "
            f"medians of {result['reps']}, ratios paired by repetition)\n\n")
    verdicts = "; ".join(f"{k} ({v.get('precision', 'fp32')}): {v['speedup_vs_reference']:.2f}x the fastest "
                         f"same-precision peer ({v['reference_peer']}; repetitions "
                         f"{v.get('speedup_vs_reference_min', v['speedup_vs_reference']):.2f}-"
                         f"{v.get('speedup_vs_reference_max', v['speedup_vs_reference']):.2f}), "
                         f"{v['speedup_vs_fastest_peer']:.2f}x the fastest peer in any precision, "
                         + (f"{v['cpu_speedup_vs_reference']:.2f}x that peer per CPU second, "
                            if v.get("cpu_speedup_vs_reference") else "") +
                         f"loss within 1%: {v['loss_within_1pct_of_reference']}"
                         + (f" (mean over seeds {v['loss_delta_mean']:+.2%}, 95% CI [{v['loss_delta_ci95'][0]:+.2%}, "
                            f"{v['loss_delta_ci95'][1]:+.2%}]; the peer's own loss varies by "
                            f"{v['reference_loss_seed_cv']:.2%} from seed to seed)" if v.get("loss_delta_ci95") else "")
                         + ", "
                         f"target 1.5x {'met' if v['target_1_5x_met'] else 'missed'}"
                         for k, v in result["verdicts"].items())
    return (head + markdown_table(["contender", "what", "real tok/s", "x fastest same-precision peer",
                                  "(repetitions)", "same-precision peer", "x fastest fp32 peer", "x fastest peer",
                                  "held-out loss", "loss vs same-precision peer", "train loss", "padding",
                                  "steady tok/s (after 1/4 of the steps)", "steady x fastest peer"], rows)
            + "\n\n" + verdicts
            + "".join(f"\n\n{name} failed: {err}" for name, err in result.get("failed", {}).items()))


def limit_table(result: dict) -> str:
    p = result["peaks_gflops"]
    rows = [[name, r["gflops"], f"{r['fraction_of_fp32_peak']:.0%}", f"{r['fraction_of_same_dtype_peak']:.0%}",
             r["train_loss"], r["tokens_per_second"]] for name, r in result["runs"].items()]
    v = result["verdict"]
    return (f"### Physical limit ({result['model_dims']['hidden']}-hidden, {result['model_dims']['layers']} layers; "
            f"torch.mm {result['matmul_n']}^2 peak: " + ", ".join(f"{k} {g:.0f} GFLOP/s" for k, g in p.items())
            + f"; {result['mean_row_tokens']:.0f} tokens/row)\n\n"
            + markdown_table(["run", "GFLOP/s", "of fp32 peak", "of same-dtype peak", "train loss", "tok/s"], rows)
            + "\n\n" + ", ".join(f"{k}: {val:.3g}" if isinstance(val, float) else f"{k}: {val}" for k, val in v.items()))
