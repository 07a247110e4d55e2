"""The gradient passes: the target's projected gradient per snapshot, then every train row of one shard."""

from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

from verifily_train.attribution.rows.gradients import PerRowGradients, Projection, summed_gradient
from verifily_train.attribution.rows.plan import GRADIENT_METHODS, TARGET_METHODS, RowAttributionPlan, target_rows
from verifily_train.attribution.rows.runtime import (SCORE_BATCH, SplitRows, apply_snapshot, load_scoring_model,
                                                     row_losses, supervised_tokens)

TARGET_FILE = "target_gradients.safetensors"


def _projection(plan: RowAttributionPlan, scoring):
    return Projection(scoring.names, [p.numel() for p in scoring.params], plan.projection_dim, plan.seed)


def target_gradients(plan: RowAttributionPlan, out_dir: Path) -> dict:
    """Write the projected mean target gradient of every snapshot to ``out_dir``; returns a small JSON manifest

    (``{"step": "target", "file": ..., "snapshots": [...], "target_rows": n, "seconds": s}``)."""
    import torch
    from safetensors.torch import save_file

    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    indices = target_rows(plan)
    if not set(TARGET_METHODS) & set(plan.methods):  # only the attribution family reads a target: an empty file
        save_file({}, str(out_dir / TARGET_FILE))
        return {"step": "target", "file": TARGET_FILE, "snapshots": [], "target": plan.target,
                "target_split": plan.target_split, "target_rows": len(indices), "target_loss": [],
                "projection_dim": plan.projection_dim, "parameters": 0,
                "seconds": round(time.perf_counter() - started, 3)}
    scoring = load_scoring_model(plan)
    rows = SplitRows(Path(plan.tokenized_dir), plan.target_split, plan.task, scoring)
    project = _projection(plan, scoring)
    tensors, losses = {}, []
    for k, snapshot in enumerate(plan.snapshots):
        apply_snapshot(scoring, snapshot)
        total = torch.zeros(project.size, dtype=torch.float64)
        loss = 0.0
        for _, batch in rows.batches(indices):
            loss_sum, count, _ = row_losses(scoring, batch)
            # the target is the mean per-row loss over the target rows, as the evaluation reports it
            mean = (loss_sum / count.clamp(min=1)).sum() / len(indices)
            total += summed_gradient(scoring, mean).double()
            loss += float(mean.detach())
        tensors[f"snapshot-{k}"] = project(total.float()[None])[0].contiguous()
        losses.append(loss)
    save_file(tensors, str(out_dir / TARGET_FILE))
    return {"step": "target", "file": TARGET_FILE, "snapshots": [s["step"] for s in plan.snapshots],
            "target": plan.target, "target_split": plan.target_split, "target_rows": len(indices),
            "target_loss": losses, "projection_dim": plan.projection_dim, "projection": project.kind,
            "parameters": project.size,
            "seconds": round(time.perf_counter() - started, 3)}


def shard_batches(lengths: List[int], shard_index: int, shard_count: int, size: int = SCORE_BATCH) -> List[List[int]]:
    """The row batches of one shard: the split's length-sorted batches (fixed by the split alone), cut into
    ``shard_count`` contiguous runs; a row meets the same batch-mates however the split is sharded, so
    sharded scores equal unsharded ones bit for bit."""
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ValueError(f"shard {shard_index} of {shard_count}")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches = [order[i:i + size] for i in range(0, len(order), size)]
    base, extra = divmod(len(batches), shard_count)
    start = shard_index * base + min(shard_index, extra)
    return batches[start:start + base + (1 if shard_index < extra else 0)]


def shard_file(shard_index: int, shard_count: int) -> str:
    return f"shard-{shard_index:04d}-of-{shard_count:04d}.parquet"


def score_shard(plan: RowAttributionPlan, target_manifest: dict, shard_index: int, shard_count: int,
                out_dir: Path, target_dir: Optional[Path] = None) -> dict:
    """Score the train rows of shard ``shard_index`` of ``shard_count`` (``shard_batches``) into ``out_dir/shard-<i>-of-<n>.parquet``; returns a small JSON manifest.

    ``target_dir``: where ``target_gradients`` wrote its file (default: ``target_manifest["dir"]``).
    """
    import numpy as np
    import pandas as pd
    import torch
    from safetensors.torch import load_file

    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    folder = Path(target_dir if target_dir is not None else target_manifest["dir"])
    targets = load_file(str(folder / target_manifest["file"]))
    scoring = load_scoring_model(plan)
    rows = SplitRows(Path(plan.tokenized_dir), "train", plan.task, scoring)
    batches = shard_batches([len(ids) for ids in rows.data.columns["input_ids"]], shard_index, shard_count)
    indices = sorted(i for batch in batches for i in batch)
    # a row's gradient is of its summed token loss over the mean tokens per train row (a constant of the whole
    # split, not of the shard): training weighs each token alike, so a longer row moves the weights more
    normalizer = float(np.mean(supervised_tokens(rows, scoring.kind))) or 1.0
    gradients = PerRowGradients(scoring)
    project = _projection(plan, scoring)
    n, position = len(indices), {row: i for i, row in enumerate(indices)}
    tracin, tracin_adam, self_influence = np.zeros(n), np.zeros(n), np.zeros(n)
    losses = np.zeros((n, len(plan.snapshots)))
    probs = None
    need_gradients = bool(set(GRADIENT_METHODS) & set(plan.methods))  # losses alone need no backward
    # the final loss alone reads the last snapshot only
    every = need_gradients or bool({"loss_mean", "label_issue"} & set(plan.methods))
    for k, snapshot in enumerate(plan.snapshots):
        if not every and k < len(plan.snapshots) - 1:
            continue
        apply_snapshot(scoring, snapshot)
        weight = float(snapshot["weight"])
        target = targets.get(f"snapshot-{k}")
        precondition = adam_preconditioner(scoring, snapshot) if "tracin_adam" in plan.methods else None
        for chunk in batches:
            batch = rows.collate([rows.data[i] for i in chunk])
            at = [position[r] for r in chunk]
            if need_gradients:
                flat, loss_sum, count, logits = gradients(batch, normalizer)
                if target is not None and "tracin" in plan.methods:  # first-order change of the target loss
                    tracin[at] += (-weight * (project(flat) @ target.double())).numpy()
                if target is not None and precondition is not None:  # ... from the step AdamW took on this row
                    tracin_adam[at] += (-weight * (project(flat * precondition) @ target.double())).numpy()
                self_influence[at] += weight * (flat.double() ** 2).sum(dim=1).numpy()
            else:
                with torch.no_grad():
                    loss_sum, count, logits = row_losses(scoring, batch)
            losses[at, k] = (loss_sum / count.clamp(min=1)).numpy()
            if logits is not None:
                p = torch.softmax(logits.double(), dim=-1).numpy()
                probs = np.zeros((n, p.shape[1])) if probs is None else probs
                probs[at] += p / len(plan.snapshots)
    if not every:  # the earlier snapshots' losses were not computed: NaN, not zeros that look measured
        losses[:, :-1] = np.nan
    frame = pd.DataFrame({"index": indices, "tracin": tracin, "tracin_adam": tracin_adam, "self_influence": self_influence,
                          "losses": list(losses)})
    if probs is not None:
        frame["probs"] = list(probs)
    name = shard_file(shard_index, shard_count)
    frame.to_parquet(out_dir / name, index=False)
    return {"step": "shard", "file": name, "shard_index": shard_index, "shard_count": shard_count, "rows": n,
            "per_row_gradients": "batched hooks" if gradients.uses_hooks else "one backward per row",
            "seconds": round(time.perf_counter() - started, 3)}


def adam_preconditioner(scoring, snapshot: dict):
    """AdamW's per-weight step size at a snapshot, flattened like the row gradients: 1 / (sqrt(v^) + eps).

    ``v^ = exp_avg_sq / (1 - beta2^t)`` (bias-corrected, as ``torch.optim.AdamW`` divides). A row's gradient
    enters the first moment with weight (1 - beta1) and stays in it with beta1^j for the j steps after:
    those weights sum to 1 (the bias correction brings early steps to it too), so the first-order change a
    row makes is ``-lr x g / (sqrt(v^) + eps)``, its momentum spread over later steps. LESS (Xia et al. 2024)
    uses the same second moment; it also adds the whole batch's momentum, which is common to every row.
    """
    import torch
    from safetensors.torch import load_file

    settings = snapshot["optimizer"]
    moments = load_file(settings["file"])
    beta2, eps, step = float(settings["betas"][1]), float(settings["eps"]), max(int(settings["step"]), 1)
    correction = 1.0 - beta2 ** step
    parts = [(moments[f"exp_avg_sq.{name}"].double() / correction).sqrt().add(eps).reciprocal().reshape(-1)
             for name in scoring.names]
    return torch.cat(parts).float()
