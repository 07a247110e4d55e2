"""Score every example of the evaluation split with the trained adapter: per-example loss or class probabilities."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

from verifily_train.config.metricspec import generation_metrics
from verifily_train.config.schema import TrainConfig
from verifily_train.dataset.rows import iter_jsonl, validate_row
from verifily_train.errors import DataError
from verifily_train.evaluation.generate import generate_texts
from verifily_train.evaluation.metrics import classification_report, metrics_for_frame
from verifily_train.evaluation.text_metrics import resolve_format, score_texts
from verifily_train.model.attention import for_plan
from verifily_train.model.collate import make_collator
from verifily_train.model.device import DevicePlan
from verifily_train.model.loading import KIND_CAUSAL, KIND_SEQ_CLS, ModelSpec, load_model
from verifily_train.model.quantization import disable_cpu_4bit_repacking, quantization_config
from verifily_train.model.registry import family
from verifily_train.model.render import RowRenderer
from verifily_train.model.tokenize import TokenizedSplit, tokenize_row
from verifily_train.quiet import progress_bars


def load_trained_model(cfg: TrainConfig, spec: ModelSpec, tok, labels: List[str], train_dir: Optional[Path],
                       trained: Optional[dict], plan: DevicePlan):
    """Base model + the run's adapter, exactly as a user would reload it (``PeftModel.from_pretrained``).

    A QLoRA adapter is evaluated on the base quantized the same way it was trained on. With ``trained``
    None: the untuned, unquantized base model (the baseline).
    """
    from peft import PeftModel

    if trained is None:
        model = load_model(spec, labels=labels or None, pad_token_id=tok.pad_token_id,
                           trust_remote_code=cfg.trust_remote_code)
        for_plan(model, plan.device, plan.precision)  # as in training: fp32 attention under CPU bf16
        return model
    weights = train_dir / trained["adapter_dir"]
    if trained["full_finetune"]:
        from dataclasses import replace

        model = load_model(replace(spec, source=str(weights)), labels=labels or None, pad_token_id=tok.pad_token_id,
                           trust_remote_code=cfg.trust_remote_code)
        for_plan(model, plan.device, plan.precision)
        return model
    quant = quantization_config(cfg.lora, plan.device)
    base = load_model(spec, labels=labels or None, pad_token_id=tok.pad_token_id, trust_remote_code=cfg.trust_remote_code,
                      quantization_config=quant,
                      device_map={"": plan.device if plan.device != "cuda" else 0} if quant is not None else None)
    for_plan(base, plan.device, plan.precision)
    model = PeftModel.from_pretrained(base, weights)
    # bitsandbytes' CPU inference repacking fails on small layers ("shape [32, 0] is invalid"): keep the
    # same kernel path as training
    disable_cpu_4bit_repacking(model)
    return model


def _score_batches(model, spec: ModelSpec, data: TokenizedSplit, collator, batch_size: int, device: str,
                   precision: str, progress: bool) -> Dict[str, list]:
    import torch
    from tqdm.auto import tqdm

    order = sorted(range(len(data)), key=lambda i: len(data.columns["input_ids"][i]))
    out: Dict[str, list] = {"index": [], "loss_sum": [], "n_tokens": [], "probs": []}
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if getattr(model, "hf_device_map", None) is None and not getattr(model, "is_loaded_in_4bit", False) \
            and not getattr(model, "is_loaded_in_8bit", False):
        model.to(device)  # quantized models are placed at load time and refuse .to()
    model.eval()
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    with torch.no_grad():
        for batch_idx in tqdm(batches, desc="evaluate", unit="batch", disable=not progress_bars(progress), leave=False):
            batch = collator([data[i] for i in batch_idx])
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.autocast(device_type="cuda" if device == "cuda" else "cpu", dtype=dtype or torch.float32,
                                enabled=dtype is not None):
                if spec.kind == KIND_SEQ_CLS:
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                else:
                    logits = model(**batch).logits
            logits = logits.float()
            out["index"].extend(batch_idx)
            if spec.kind == KIND_SEQ_CLS:
                out["probs"].extend(torch.softmax(logits, dim=-1).cpu().tolist())
                continue
            labels = batch["labels"]
            if spec.kind == KIND_CAUSAL:  # position t predicts token t+1
                logits, labels = logits[:, :-1, :], labels[:, 1:]
            token_loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100, reduction="none"
            ).view(labels.shape)
            mask = labels != -100
            out["loss_sum"].extend((token_loss * mask).sum(dim=1).cpu().tolist())
            out["n_tokens"].extend(mask.sum(dim=1).cpu().tolist())
    return out


def predict_split(cfg: TrainConfig, spec: ModelSpec, tok, tokenized: dict, tokenized_dir: Path,
                  trained: Optional[dict], train_dir: Optional[Path], plan: DevicePlan, out_dir: Path) -> dict:
    """Write ``predictions.parquet`` and ``metrics.json`` for the evaluation split; returns the stage manifest."""
    import numpy as np
    import pandas as pd


    split = tokenized["eval_split"]
    out_dir.mkdir(parents=True, exist_ok=True)
    if not cfg.eval.enabled or split is None:
        note = "eval.enabled is false: evaluation skipped" if not cfg.eval.enabled else tokenized["eval_note"]
        return {"stage": "evaluate", "skipped": True, "note": note, "split": None,
                "metrics": {}}
    labels = tokenized["labels"]
    model = load_trained_model(cfg, spec, tok, labels, train_dir, trained, plan)
    tok.padding_side = family(spec.model_type).padding_side  # as in training: the loss masks padding anyway
    data = TokenizedSplit(tokenized_dir / tokenized["splits"][split]["file"], cfg.task)
    scores = _score_batches(model, spec, data, make_collator(spec, tok), cfg.eval.batch_size, plan.device,
                            plan.precision, cfg.runtime.progress)
    order = np.argsort(np.asarray(scores["index"]), kind="stable")
    cols = data.columns
    frame = pd.DataFrame({
        "example_id": cols["example_id"], "split": cols["split"], "line": cols["line"], "tags": cols["tags"],
        "text": cols["text"], "reference": cols["reference"], "truncated": cols["truncated"],
        "row_hash": cols["row_hash"],
    })
    tag_dicts = [json.loads(t) for t in cols["tags"]]
    for key in sorted({k for d in tag_dicts for k in d}):
        frame[f"tag.{key}"] = [d.get(key) for d in tag_dicts]
    if spec.kind == KIND_SEQ_CLS:
        probs = np.asarray(scores["probs"], dtype=np.float64)[order]
        label_id = np.asarray(cols["label"], dtype=np.int64)
        pred_id = probs.argmax(axis=1)
        frame["label_id"] = label_id
        frame["pred_id"] = pred_id
        frame["label"] = [labels[i] for i in label_id]
        frame["predicted"] = [labels[i] for i in pred_id]
        frame["prob_predicted"] = probs[np.arange(len(probs)), pred_id]
        frame["prob_true"] = probs[np.arange(len(probs)), label_id]
        frame["correct"] = pred_id == label_id
        frame["score"] = 1.0 - frame["prob_true"]  # hardness: how little mass the true label got
    else:
        loss_sum = np.asarray(scores["loss_sum"], dtype=np.float64)[order]
        n_tokens = np.asarray(scores["n_tokens"], dtype=np.int64)[order]
        frame["loss_sum"] = loss_sum
        frame["n_tokens"] = n_tokens
        frame["loss"] = np.where(n_tokens > 0, loss_sum / np.maximum(n_tokens, 1), np.nan)
        frame["perplexity"] = np.exp(np.minimum(frame["loss"], 50.0))
        frame["score"] = frame["loss"]  # hardness: mean response-token loss (token F1 ranks first when generated)
    extra: dict = {}
    if cfg.task == "sft" and wants_generation(cfg):
        model = _merged_for_inference(model)
        fmt = resolve_format(cfg.eval.format, list(frame["reference"]))
        # the final answer's generation prompt, rendered as in training (a conversation: every turn before it)
        prompts = [list(ids[:n]) for ids, n in zip(cols["input_ids"], cols["prompt_len"])]
        stop_ids = tokenized.get("stop_token_ids") or None
        texts = generate_texts(model, spec, tok, prompts, cfg.eval.batch_size, cfg.eval.max_new_tokens, plan.device,
                               plan.precision, cfg.runtime.progress, stop_ids=stop_ids)
        frame["prediction"] = texts
        for name, values in score_texts(texts, list(frame["reference"]), fmt).items():
            frame[name] = values
        extra["format"] = fmt or "off"
        if cfg.eval.gold_set and trained is not None:
            extra["gold"] = _score_gold_set(cfg, spec, tok, model, plan, out_dir, stop_ids)
    elif cfg.task == "classification":
        extra["classification_report"] = classification_report(frame["label_id"], frame["pred_id"], labels)
    frame.to_parquet(out_dir / "predictions.parquet", index=False)
    metrics = metrics_for_frame(cfg.task, frame, labels)
    if "gold" in extra:
        metrics.update({f"gold_{k}": v for k, v in extra["gold"].items()})
    return {"stage": "evaluate", "skipped": False, "split": split, "note": tokenized["eval_note"],
            "predictions": "predictions.parquet", "metrics": metrics, **extra}


def wants_generation(cfg: TrainConfig) -> bool:
    """Whether eval.metrics names a metric scored on generated text."""
    return any(spec.name in (cfg.eval.metrics or []) for spec in generation_metrics())


def _merged_for_inference(model):
    """Fold the LoRA weights into the base for generation (one matmul per layer, not two); not for k-bit bases."""
    from peft import PeftModel

    if isinstance(model, PeftModel) and not getattr(model.base_model.model, "is_loaded_in_4bit", False) \
            and not getattr(model.base_model.model, "is_loaded_in_8bit", False):
        return model.merge_and_unload()
    return model


def _score_gold_set(cfg: TrainConfig, spec: ModelSpec, tok, model, plan: DevicePlan, out_dir: Path,
                    stop_ids: Optional[List[int]]) -> dict:
    """Exact match and token F1 on ``eval.gold_set`` (rows validated and rendered like any SFT data)."""
    import pandas as pd

    renderer = RowRenderer(spec, tok, cfg.prompt, cfg.training.max_seq_length)
    rows, prompts = [], []
    for lineno, row in iter_jsonl(Path(cfg.eval.gold_set), cfg.eval.gold_set):
        where = f"{cfg.eval.gold_set}:{lineno}"
        validate_row(row, "sft", {}, {}, where)
        example = tokenize_row(row, "gold", lineno, spec, tok, "sft", cfg.training.max_seq_length, {}, renderer, where)
        if example is None:
            raise DataError(where, None, renderer.unsupervised_problem(renderer.fit(row, where)[1]))
        rows.append((lineno, example.reference, example.tags))
        prompts.append(list(example.input_ids[:example.prompt_len]))
    texts = generate_texts(model, spec, tok, prompts, cfg.eval.batch_size, cfg.eval.max_new_tokens, plan.device,
                           plan.precision, cfg.runtime.progress, stop_ids=stop_ids)
    scored = score_texts(texts, [r[1] for r in rows], None)
    pd.DataFrame({"line": [r[0] for r in rows], "reference": [r[1] for r in rows], "prediction": texts,
                  "tags": [json.dumps(r[2], sort_keys=True) for r in rows], **scored}
                 ).to_parquet(out_dir / "gold_predictions.parquet", index=False)
    n = len(rows)
    gold = {spec.name: sum(scored[spec.column]) / n if n else float("nan") for spec in generation_metrics()
            if spec.column in scored}  # no format on the gold set: exact match and token F1
    return {**gold, "examples": n}
