"""Suite 3, evaluation: our batched gold-set generation against a one-example-at-a-time ``generate`` loop."""

from __future__ import annotations

import time
from pathlib import Path

from bench.common import alternate, median
from bench.data import write_skewed_splits


def run_evaluation(model_dir: Path, work: Path, n: int, batch_size: int, max_new_tokens: int, reps: int,
                   log=print, device: str = "cpu") -> dict:
    """Greedy continuations of ``n`` prompts both ways; speedup and how many outputs agree."""
    import torch
    from transformers import AutoModelForCausalLM

    from verifily_train.config.schema import PromptSection
    from verifily_train.evaluation.generate import generate_texts
    from verifily_train.model.loading import inspect_model, load_tokenizer
    from verifily_train.model.tokenize import render_prompt
    from bench.data import read_rows

    rows = read_rows(write_skewed_splits(work / "eval-data", {"test": n}, seed=23)["test"])
    spec = inspect_model(str(model_dir), "sft")
    tok = load_tokenizer(spec)
    from verifily_train.config.schema import ComputeSection
    from verifily_train.model.attention import for_plan
    from verifily_train.model.device import resolve_device

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    # the evaluate stage's own precision on this machine (bf16 autocast where native; its attention set-up
    # too); both contenders run in it
    precision = resolve_device(ComputeSection(device=device)).precision
    for_plan(model, device, precision)
    prompts = [tok(render_prompt(r, PromptSection()), add_special_tokens=True)["input_ids"] for r in rows]
    outputs = {}

    def batched():
        started = time.perf_counter()
        outputs["batched"] = generate_texts(model, spec, tok, prompts, batch_size, max_new_tokens, device, precision,
                                            False)
        return {"seconds": time.perf_counter() - started}

    def one_at_a_time(loop_precision: str):
        def run():
            started = time.perf_counter()
            texts = []
            with torch.no_grad():
                for p in prompts:  # the loop people write first: one prompt, no padding, generate, decode
                    ids = torch.tensor([p], device=device)
                    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=loop_precision == "bf16"):
                        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                             max_new_tokens=max_new_tokens, do_sample=False,
                                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
                    texts.append(tok.decode(out[0, len(p):].cpu(), skip_special_tokens=True).strip())
            outputs[f"loop_{loop_precision}"] = texts
            return {"seconds": time.perf_counter() - started}
        return run

    # the loop runs in fp32 and, where it differs, in the stage's precision; the faster one is the baseline
    # (on a CPU, one-row decoding is overhead-bound and autocast only adds casts)
    loops = {f"one_at_a_time_{p}": one_at_a_time(p) for p in dict.fromkeys(["fp32", precision])}
    log(f"evaluation: {n} prompts, batch {batch_size}, {max_new_tokens} new tokens, batched in {precision}, x {reps}")
    raw = alternate({**loops, "batched": batched}, reps, log)
    loop_times = {name: median([o["seconds"] for o in raw[name]]) for name in loops}
    baseline = min(loop_times, key=loop_times.get)
    loop_s, batch_s = loop_times[baseline], median([o["seconds"] for o in raw["batched"]])
    agree = sum(a == b for a, b in zip(outputs["batched"], outputs["loop_fp32"])) / n
    return {"device": device, "precision": precision, "prompts": n, "batch_size": batch_size,
            "max_new_tokens": max_new_tokens, "reps": reps, "loop_seconds": loop_times, "baseline": baseline,
            "one_at_a_time_seconds": loop_s, "batched_seconds": batch_s, "speedup": loop_s / batch_s,
            "outputs_identical_fraction": agree, "target_5x_met": loop_s / batch_s >= 5, "raw": raw}
