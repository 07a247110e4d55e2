"""Suite 1, training throughput: real (non-pad) tokens/s of our train stage against the peers, at equal loss."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Dict, List

from bench.common import TrainSettings, alternate, heldout_loss, median
from bench.data import read_rows, write_splits
from bench.isolated import isolated_runs
from bench.ours import OurTrainStage
from bench.peers.hf_peft import train_hf_peft
from bench.peers.trl_sft import train_trl_sft, trl_available

# contender -> (what it is, peer or ours)
DESCRIPTIONS = {
    "peft_max_length": "(a) HF Trainer + PEFT, padded to max length (PEFT examples)",
    "peft_dynamic": "(b) HF Trainer + PEFT, dynamic padding",
    "trl_sft": "(c) TRL SFTTrainer",
    "peft_dynamic_bf16": "(b) with bf16 autocast",
    "verifily_plain": "verifily train stage with the model's plain forward (no label-only head, batch padded to its longest row)",
    "verifily": "verifily train stage (its defaults: head at label positions only, each batch's rows packed on a CPU, attention within each row)",
    "verifily_split": "verifily with length-sorted sub-batches instead of packed rows (the CPU fp32 default before packing)",
    "verifily_bf16": "verifily train stage, bf16 autocast (the default where bf16 is native)",
    "verifily_grouped": "verifily, plus training.group_by_length (length-grouped batches; off by default)",
    "trl_sft_bf16": "(c) with bf16 autocast",
    "verifily_torch_dropout": "verifily with PyTorch's own dropout sampler (bernoulli_) instead of the 16-bit one",
    "verifily_unfused": "verifily with PEFT's LoRA output (scale, then add) instead of one addmm",
    "verifily_plain_bf16": "verifily_plain with bf16 autocast",
    "verifily_bf16_split": "verifily_bf16 with length-sorted sub-batches instead of packed rows",
    "verifily_bf16_whole": "verifily_bf16 with each batch whole, padded to its longest row (the CPU bf16 default before packing; GPUs)",
    "verifily_bf16_recast": "verifily_bf16 with frozen weights kept fp32 (autocast re-casts them every forward)",
    "verifily_bf16_compiled": "verifily_bf16 plus training.compile (torch.compile of the repeated decoder block)",
    "verifily_compiled": "verifily (fp32) plus training.compile",
    "verifily_whole_last_layer": "verifily with the last decoder layer at every position (before it ran at label positions only)",
    "verifily_hf_order": "verifily with the rows in the HF Trainer's random order (the peers' order at the same seed) instead of its keyed order: a loss diagnostic",
    "verifily_uncut": "verifily computing each row's last token too (it predicts no label; before, every packed row ran whole)",
    "verifily_bf16_unbucketed": "verifily_bf16 with packed lengths not padded to a row count already run (before: a new row count, and new oneDNN kernels, nearly every step)",
    "trl_sft_bf16_compiled": "(c) with bf16 autocast and torch_compile=True (the whole model compiled)",
}
PEERS = ("peft_max_length", "peft_dynamic", "trl_sft", "peft_dynamic_bf16", "trl_sft_bf16", "trl_sft_bf16_compiled")


def _with_group_cost(run, cost):
    """``run`` with the sub-batch cost set to ``cost`` on every device (None: each batch runs whole)."""
    def wrapped():
        from verifily_train.training import loss

        saved = dict(loss.GROUP_COST_TOKENS)
        loss.GROUP_COST_TOKENS.update({k: cost for k in saved})
        try:
            return run()
        finally:
            loss.GROUP_COST_TOKENS.update(saved)
    return wrapped


def contender_runs(model_dir, work, settings, splits: Dict[str, str], bf16: bool, device: str = "cpu",
                   gpu_contenders: bool = None) -> Dict[str, Callable[[], dict]]:
    """{contender: run}; each run trains once and returns tokens/s and held-out loss. Nothing is loaded until
    a run starts, so the names are free to list (``bench.isolated`` calls this in each contender's process)."""
    model_dir, work = Path(model_dir), Path(work)
    if isinstance(settings, dict):
        settings = TrainSettings(**settings)
    splits = {k: Path(v) for k, v in splits.items()}

    @functools.lru_cache(maxsize=None)
    def ours() -> OurTrainStage:
        return OurTrainStage(model_dir, splits["train"], splits["test"], settings, work)

    @functools.lru_cache(maxsize=None)
    def heldout():
        return ours().heldout_examples()

    def rows():
        return read_rows(splits["train"])

    def measured(outcome: dict) -> dict:
        model = outcome.pop("model")
        loss = heldout_loss(model, heldout())
        cpu = outcome.get("cpu_seconds")
        return {"tokens_per_second": outcome["real_tokens"] / outcome["seconds"], "eval_loss": loss, "seed": settings.seed,
                "cpu_tokens_per_second": outcome["real_tokens"] / cpu if cpu else None,
                "train_loss": outcome["train_loss"], "seconds": outcome["seconds"], "real_tokens": outcome["real_tokens"],
                **{k: outcome[k] for k in ("padding_fraction", "label_only_head", "steady_tokens_per_second")
                   if k in outcome}}

    def our_run(**kwargs):
        def run():
            m = ours().train(device=device, **kwargs)
            return measured({"model": m["model"], "real_tokens": m["train_tokens"], "seconds": m["train_seconds"],
                             "cpu_seconds": m.get("train_cpu_seconds"),
                             "train_loss": m["train_loss"], "padding_fraction": m["padding_fraction"],
                             "label_only_head": m["label_only_head"],
                             "steady_tokens_per_second": m.get("steady_tokens_per_second")})
        return run

    def peft(padding: str, bf16: bool = False):
        return lambda: measured(train_hf_peft(str(model_dir), rows(), settings, padding=padding, bf16=bf16))

    def trl(bf16: bool = False, compile: bool = False):
        return lambda: measured(train_trl_sft(str(model_dir), rows(), settings, bf16=bf16, torch_compile=compile))

    if device == "cuda" if gpu_contenders is None else gpu_contenders:
        # on a GPU everyone trains with bf16 autocast, as its users would
        runs = {
            "peft_dynamic_bf16": peft("longest", bf16=True),
            "trl_sft_bf16": trl(bf16=True),
            "verifily_plain_bf16": our_run(precision="bf16", label_only_head=False),
            "verifily_bf16": our_run(precision="bf16"),
            "verifily_bf16_split": _with_group_cost(our_run(precision="bf16", pack_rows=False), 24),
            "verifily_bf16_recast": our_run(precision="bf16", frozen_in_compute_dtype=False),
            "verifily_bf16_compiled": our_run(precision="bf16", compile_blocks=True),
            "trl_sft_bf16_compiled": trl(bf16=True, compile=True),
        }
    else:
        runs = {
            "peft_max_length": peft("max_length"),
            "peft_dynamic": peft("longest"),
            "trl_sft": trl(),
            "verifily_plain": our_run(precision="fp32", label_only_head=False, group_by_length=False),
            "verifily": our_run(precision="fp32"),
            "verifily_split": our_run(precision="fp32", pack_rows=False),
            "verifily_grouped": our_run(precision="fp32", group_by_length=True),
            "verifily_torch_dropout": our_run(precision="fp32", cpu_cheap_dropout=False),
            "verifily_unfused": our_run(precision="fp32", fused_lora_output=False),
            "verifily_whole_last_layer": our_run(precision="fp32", last_layer_at_labels=False),
            "verifily_uncut": our_run(precision="fp32", trim_dead_tails=False),
            "verifily_hf_order": our_run(precision="fp32", hf_order=True),
        }
        if bf16:
            runs["peft_dynamic_bf16"] = peft("longest", bf16=True)
            runs["trl_sft_bf16"] = trl(bf16=True)
            runs["verifily_bf16"] = our_run(precision="bf16")
            runs["verifily_bf16_split"] = _with_group_cost(our_run(precision="bf16", pack_rows=False), 24)
            runs["verifily_bf16_whole"] = our_run(precision="bf16", pack_rows=False)
            runs["verifily_bf16_recast"] = our_run(precision="bf16", frozen_in_compute_dtype=False)
            runs["verifily_bf16_unbucketed"] = our_run(precision="bf16", bucket_packed_tokens=False)
            runs["verifily_bf16_compiled"] = our_run(precision="bf16", compile_blocks=True)
        runs["verifily_compiled"] = our_run(precision="fp32", compile_blocks=True)
    if not trl_available():
        runs.pop("trl_sft", None)
        runs.pop("trl_sft_bf16", None)
        runs.pop("trl_sft_bf16_compiled", None)
    return runs


def run_throughput(model_name: str, model_dir: Path, work: Path, settings: TrainSettings, reps: int,
                   bf16: bool, median_words: float = 8.0, log=print, contenders=None, device: str = "cpu",
                   gpu_contenders: bool = None, isolate: bool = True, regime: str = "skewed") -> dict:
    """Alternate every contender ``reps`` times on the same data; medians of tokens/s and held-out loss.

    ``regime``: the rows' lengths (``bench.data``: ``skewed``, log-normal inputs; ``short``, one to four words).
    ``isolate``: each run in its own process (``bench.isolated``: what a run leaves in the allocator slows
    the next one), else all in this one (quicker to start; the CI smoke test).
    """
    import dataclasses
    import torch

    splits = write_splits(work / "data", {"train": settings.rows, "test": settings.eval_rows}, regime,
                          median_words=median_words)
    kwargs = {"model_dir": str(model_dir), "work": str(work), "settings": dataclasses.asdict(settings),
              "splits": {k: str(v) for k, v in splits.items()}, "bf16": bf16, "device": device,
              "gpu_contenders": gpu_contenders}
    def runs_at(seed: int) -> Dict[str, Callable[[], dict]]:
        at = dict(kwargs, settings=dict(kwargs["settings"], seed=seed))
        runs = contender_runs(**at)
        if contenders:
            runs = {k: v for k, v in runs.items() if k in contenders}
        elif device != "cuda":  # compiling takes minutes on a CPU and does not pay there (docs/models.md): on request
            runs = {k: v for k, v in runs.items() if not k.endswith("_compiled")}
        if isolate:
            runs = isolated_runs("bench.throughput:contender_runs", at, list(runs), torch.get_num_threads(),
                                 work / "isolated")
        return runs

    names = list(runs_at(settings.seed))
    log(f"throughput on {model_name}: {', '.join(names)} x {reps}{' (each run in its own process)' if isolate else ''}"
        f"; repetition i trains every contender at seed {settings.seed} + i")
    failed: Dict[str, str] = {}
    # Repetition i runs every contender at the same seed (settings.seed + i), another one each repetition:
    # the speed ratios pair within a repetition as before, and the held-out loss comparison averages over
    # training seeds (initialisation, dropout, row order) instead of resting on one draw of them.
    raw: Dict[str, List[dict]] = {name: [] for name in names}
    for rep in range(reps):
        one = alternate(runs_at(settings.seed + rep), 1,
                        lambda line, rep=rep: log(line.replace("rep 1/1", f"rep {rep + 1}/{reps}", 1)), failed)
        for name, outcomes in one.items():
            raw[name] += outcomes
    raw = {name: outcomes for name, outcomes in raw.items() if name not in failed}
    result = summarize(model_name, settings, raw, trl_available(), regime)
    result.update(device=device, isolated=isolate, failed=failed)
    return result


def loss_delta_by_seed(raw: Dict[str, list], name: str, ref: str) -> dict:
    """The held-out loss of ``name`` over ``ref``'s minus 1, seed by seed (repetition i is seed i for both):
    the per-seed values, their mean with a 95% t interval over seeds, and the seed-to-seed spread of
    ``ref``'s own loss (how far one draw of training noise moves it), so a 1% band can be read against it."""
    import statistics

    deltas = [r - 1.0 for r in paired_ratios(raw, name, ref, "eval_loss")]
    ref_losses = [o["eval_loss"] for o in raw[ref]]
    out = {"loss_delta_reps": deltas, "loss_delta_mean": statistics.fmean(deltas)}
    seeds = [o.get("seed") for o in raw[ref]]
    # an interval over seeds only where the repetitions trained at distinct seeds (results from before
    # per-repetition seeds repeat one seed: their spread is zero and says nothing about training noise)
    if len(deltas) > 1 and None not in seeds and len(set(seeds)) == len(seeds):
        from scipy import stats

        half = stats.t.ppf(0.975, len(deltas) - 1) * statistics.stdev(deltas) / len(deltas) ** 0.5
        out["loss_delta_ci95"] = [out["loss_delta_mean"] - half, out["loss_delta_mean"] + half]
        out["reference_loss_seed_cv"] = statistics.stdev(ref_losses) / statistics.fmean(ref_losses)
    return out


def paired_ratio(raw: Dict[str, list], name: str, ref: str, key: str) -> float:
    """Median over repetitions of ``name``'s value over ``ref``'s in the same repetition (noise hits both);
    repetitions where either has no value (a steady rate needs progress marks past the first quarter) are left out."""
    return median([a[key] / b[key] for a, b in zip(raw[name], raw[ref]) if a.get(key) and b.get(key)])


FP32_PEERS = ("peft_max_length", "peft_dynamic", "trl_sft")


def precision_of(name: str) -> str:
    """The precision a contender trains in, from its name (every bf16 contender says so)."""
    return "bf16" if "bf16" in name else "fp32"


def paired_ratios(raw: Dict[str, list], name: str, ref: str, key: str) -> list:
    """``name``'s value over ``ref``'s, repetition by repetition."""
    return [a[key] / b[key] for a, b in zip(raw[name], raw[ref])]


def summarize(model_name: str, settings, raw: Dict[str, list], trl_installed: bool, regime: str = "skewed") -> dict:
    """Medians per contender; speed ratios paired by repetition against the fastest peers; the verdicts.

    Every contender is compared with the fastest peer in its own precision (fp32 with fp32, bf16 with
    bf16: the target), with the fastest fp32 peer, and with the fastest peer in any precision.
    """
    import dataclasses

    table = {}
    for name, outcomes in raw.items():
        table[name] = {"description": DESCRIPTIONS[name], "precision": precision_of(name),
                       "tokens_per_second": median([o["tokens_per_second"] for o in outcomes]),
                       "tokens_per_second_reps": [o["tokens_per_second"] for o in outcomes],
                       "cpu_tokens_per_second": median([o.get("cpu_tokens_per_second") for o in outcomes]),
                       "eval_loss": median([o["eval_loss"] for o in outcomes]),
                       "train_loss": median([o["train_loss"] for o in outcomes]),
                       "seconds": median([o["seconds"] for o in outcomes]),
                       "steady_tokens_per_second": median([o.get("steady_tokens_per_second") for o in outcomes]),
                       "real_tokens": outcomes[0]["real_tokens"],
                       "padding_fraction": outcomes[0].get("padding_fraction")}

    def fastest(names):
        names = [n for n in names if n in table]
        return max(names, key=lambda n: table[n]["tokens_per_second"]) if names else None

    fastest_fp32 = fastest(FP32_PEERS)
    fastest_any = fastest(PEERS)
    fastest_by_precision = {p: fastest([n for n in PEERS if precision_of(n) == p]) for p in ("fp32", "bf16")}
    for name, row in table.items():
        same = fastest_by_precision[row["precision"]]
        row["same_precision_peer"] = same
        for ref_name, key in ((fastest_fp32, "vs_fastest_fp32_peer"), (fastest_any, "vs_fastest_peer"),
                              (same, "vs_same_precision_peer")):
            if ref_name:
                ratios = paired_ratios(raw, name, ref_name, "tokens_per_second")
                row[key] = median(ratios)
                row[key + "_reps"] = ratios
                row[key + "_loss_delta"] = median(paired_ratios(raw, name, ref_name, "eval_loss")) - 1.0
                if key == "vs_same_precision_peer":
                    row.update(loss_delta_by_seed(raw, name, ref_name))
        # per CPU second of the training process: on a machine shared with other jobs, each run's own work
        if same and all(o.get("cpu_tokens_per_second") for o in raw[name] + raw[same]):
            row["cpu_vs_same_precision_peer_reps"] = paired_ratios(raw, name, same, "cpu_tokens_per_second")
            row["cpu_vs_same_precision_peer"] = median(row["cpu_vs_same_precision_peer_reps"])
    # after the first quarter of the steps (compilation and warm-up left out): where runs compile, both rates count
    steady_peers = [n for n in PEERS if n in table and table[n]["steady_tokens_per_second"]]
    fastest_steady = max(steady_peers, key=lambda n: table[n]["steady_tokens_per_second"]) if steady_peers else None
    if fastest_steady:
        for name, row in table.items():
            if row["steady_tokens_per_second"]:
                row["steady_vs_fastest_peer"] = paired_ratio(raw, name, fastest_steady, "steady_tokens_per_second")
    verdicts = {}
    # the target: 1.5x the fastest peer in the same precision, at a held-out loss within 1% of that peer's
    for ours_name in ("verifily", "verifily_bf16", "verifily_bf16_compiled"):
        row = table.get(ours_name)
        if row is None or not row["same_precision_peer"]:
            continue
        equal = abs(row["vs_same_precision_peer_loss_delta"]) <= 0.01
        ratios = row["vs_same_precision_peer_reps"]
        verdicts[ours_name] = {"reference_peer": row["same_precision_peer"], "precision": row["precision"],
                               "speedup_vs_reference": row["vs_same_precision_peer"],
                               "speedup_vs_reference_min": min(ratios), "speedup_vs_reference_max": max(ratios),
                               "cpu_speedup_vs_reference": row.get("cpu_vs_same_precision_peer"),
                               "cpu_speedup_vs_reference_reps": row.get("cpu_vs_same_precision_peer_reps"),
                               "speedup_vs_fastest_fp32_peer": row.get("vs_fastest_fp32_peer"),
                               "speedup_vs_fastest_peer": row.get("vs_fastest_peer"),
                               "loss_within_1pct_of_reference": equal,
                               "loss_delta_mean": row.get("loss_delta_mean"),
                               "loss_delta_ci95": row.get("loss_delta_ci95"),
                               "reference_loss_seed_cv": row.get("reference_loss_seed_cv"),
                               "target_1_5x_met": row["vs_same_precision_peer"] >= 1.5 and equal}
    if dataclasses.is_dataclass(settings):
        settings = dataclasses.asdict(settings)
    return {"model": model_name, "regime": regime, "settings": settings, "reps": len(next(iter(raw.values()))),
            "contenders": table, "fastest_fp32_peer": fastest_fp32, "fastest_peer": fastest_any,
            "fastest_peer_by_precision": fastest_by_precision, "fastest_steady_peer": fastest_steady,
            "ratios": "paired: median over repetitions of contender / reference in the same repetition",
            "trl_installed": trl_installed, "verdicts": verdicts, "raw": raw}
