"""Snapshots of the trainable weights during training, kept for TracIn-style row attribution (``attribute --rows``).

Only the parameters that train (LoRA matrices, a classification head; every weight in a full fine-tune)
are saved, as safetensors, at ``count`` evenly spaced optimizer steps, each with the learning rate summed
over the steps since the previous snapshot (TracIn's weight for that checkpoint), and beside it AdamW's moments
of those parameters at that step (``exp_avg``, ``exp_avg_sq``, with its betas, eps and step count), which
``tracin_adam`` preconditions row gradients with. They are written to the
stage's work folder while training (a resumed run keeps the ones saved before the kill) and moved into the
stage's output folder, its cache entry, when training ends: never into the Run.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import List

from verifily_train.training.ranks import is_main_rank

SNAPSHOT_DIR = "attribution_snapshots"
INDEX = "index.json"


def snapshot_steps(max_steps: int, count: int) -> List[int]:
    """The optimizer steps at which snapshots are taken: ``count`` evenly spaced, the last one the final step."""
    if count <= 0 or max_steps <= 0:
        return []
    return sorted({max(1, (2 * k * max_steps + count) // (2 * count)) for k in range(1, count + 1)})  # halves round up


def trainable_state(model) -> dict:
    """Name -> detached CPU copy of every parameter that requires grad (the names the scoring model reloads)."""
    inner = getattr(model, "module", model)  # a DDP wrapper's names carry "module."
    # torch.compile'd blocks (training.compile) name their weights through "_orig_mod.": save the model's own names
    return {name.replace("_orig_mod.", ""): p.detach().to("cpu").float().contiguous().clone()
            for name, p in inner.named_parameters() if p.requires_grad}


def optimizer_moments(model, optimizer):
    """(name -> tensor of ``exp_avg.<name>`` / ``exp_avg_sq.<name>``, settings) of an Adam-family optimizer, or None.

    None when the optimizer keeps no ``exp_avg_sq`` for a trainable parameter (SGD, a quantized 8-bit state)."""
    if optimizer is None:
        return None
    inner = getattr(model, "module", model)
    state = optimizer.state  # an accelerate wrapper forwards its inner optimizer's state
    tensors, steps = {}, set()
    for name, p in inner.named_parameters():
        if not p.requires_grad:
            continue
        entry = state.get(p) or {}
        if "exp_avg_sq" not in entry or "exp_avg" not in entry:
            return None
        name = name.replace("_orig_mod.", "")
        tensors[f"exp_avg.{name}"] = entry["exp_avg"].detach().to("cpu").float().contiguous().clone()
        tensors[f"exp_avg_sq.{name}"] = entry["exp_avg_sq"].detach().to("cpu").float().contiguous().clone()
        steps.add(int(entry["step"]) if "step" in entry else -1)
    group = optimizer.param_groups[0]
    if not tensors or len(steps) != 1 or "betas" not in group:
        return None
    settings = {"kind": type(getattr(optimizer, "optimizer", optimizer)).__name__, "betas": [float(b) for b in group["betas"]],
                "eps": float(group["eps"]), "step": steps.pop(), "weight_decay": float(group.get("weight_decay", 0.0))}
    return tensors, settings


def snapshot_callbacks(count: int, out_dir: Path, work_dir: Path, optimizer=None) -> list:
    """The TrainerCallback saving ``count`` trainable-weight snapshots, in a list (empty when ``count`` is 0).

    ``optimizer``: a function returning the trainer's optimizer (the Trainer creates it after its callbacks,
    and its callback handler keeps the one it was built with)."""
    if count <= 0:
        return []
    from transformers import TrainerCallback


    class SaveAttributionSnapshots(TrainerCallback):
        """Save the trainable weights at evenly spaced steps; move them into the stage output at the end."""

        def __init__(self):
            self.work = Path(work_dir) / SNAPSHOT_DIR
            self.steps: List[int] = []
            self.lr_sum = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self.steps = snapshot_steps(int(state.max_steps), count)
            self.resumed_from = int(state.global_step)
            if not self.resumed_from and self.work.is_dir() and is_main_rank():  # a fresh start: older ones are stale
                shutil.rmtree(self.work)
            index = [e for e in _read_index(self.work) if e["step"] <= self.resumed_from]
            # resumed: the learning rates of the steps since the last kept snapshot are lost; count them at
            # the resumed step's rate (the scheduler is deterministic, so this is close, not exact)
            self.lr_sum, self.lr = 0.0, float(args.learning_rate)
            self.last_saved = max((e["step"] for e in index), default=0)

        def on_step_begin(self, args, state, control, lr_scheduler=None, **kwargs):
            # the rate this step uses: after the step the scheduler already holds the next one's
            self.lr = float(lr_scheduler.get_last_lr()[0]) if lr_scheduler is not None else float(args.learning_rate)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            lr = self.lr
            if self.resumed_from and state.global_step == self.resumed_from + 1:
                self.lr_sum += lr * (self.resumed_from - self.last_saved)
            self.lr_sum += lr
            if state.global_step in self.steps and is_main_rank() and model is not None:
                moments = optimizer_moments(model, optimizer() if optimizer else kwargs.get("optimizer"))
                _save(self.work, trainable_state(model), int(state.global_step), self.lr_sum,
                      int(state.global_step) - self.last_saved, moments)
                self.last_saved, self.lr_sum = int(state.global_step), 0.0

        def on_train_end(self, args, state, control, **kwargs):
            if is_main_rank() and self.work.is_dir():
                target = Path(out_dir) / SNAPSHOT_DIR
                if target.exists():
                    shutil.rmtree(target)
                shutil.copytree(self.work, target)

    return [SaveAttributionSnapshots()]


def _read_index(folder: Path) -> list:
    path = folder / INDEX
    return json.loads(path.read_text(encoding="utf-8"))["snapshots"] if path.is_file() else []


def _save(folder: Path, tensors: dict, step: int, lr_sum: float, interval: int, moments=None) -> None:
    """One snapshot file (and its optimizer moments), then the index naming it (written atomically: a kill
    leaves the old index)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:07d}.safetensors"
    # no safetensors metadata: its header map is written in hash order, so identical runs would differ in bytes
    save_file(tensors, str(folder / name))
    entry = {"file": name, "step": step, "lr": lr_sum / max(interval, 1), "weight": lr_sum, "interval_steps": interval}
    if moments is not None:
        optimizer_name = f"step-{step:07d}.optimizer.safetensors"
        save_file(moments[0], str(folder / optimizer_name))
        entry["optimizer"] = dict(moments[1], file=optimizer_name)
    index = [e for e in _read_index(folder) if e["step"] != step] + [entry]
    tmp = folder / (INDEX + ".tmp")
    tmp.write_text(json.dumps({"snapshots": sorted(index, key=lambda e: e["step"])}, indent=1), encoding="utf-8")
    os.replace(tmp, folder / INDEX)


def read_snapshots(train_dir: Path) -> list:
    """The snapshots a train stage entry holds, oldest first (empty when it kept none)."""
    folder = Path(train_dir) / SNAPSHOT_DIR
    out = []
    for e in _read_index(folder):
        if not (folder / e["file"]).is_file():
            continue
        entry = dict(e, file=str(folder / e["file"]))
        optimizer = e.get("optimizer")
        if optimizer and (folder / optimizer["file"]).is_file():
            entry["optimizer"] = dict(optimizer, file=str(folder / optimizer["file"]))
        else:
            entry.pop("optimizer", None)
        out.append(entry)
    return out
