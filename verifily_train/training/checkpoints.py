"""Resumable checkpoints: a checkpoint counts only once it carries the completion mark (a kill mid-save leaves none)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

from transformers import TrainerCallback

from verifily_train.training.ranks import barrier, is_main_rank

COMPLETE_MARKER = ".verifily-complete"


class MarkCompleteCheckpoints(TrainerCallback):
    """Mark a checkpoint complete once the Trainer has written all of it (a kill mid-save leaves no mark)."""

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        barrier()  # under DDP every rank writes its own RNG state into the folder: mark it after all have
        if folder.is_dir() and is_main_rank():
            (folder / COMPLETE_MARKER).write_text(str(state.global_step))


def last_complete_checkpoint(root: Path) -> Optional[Path]:
    """The highest-step checkpoint carrying the completion mark; partial ones are deleted."""
    if not root.is_dir():
        return None
    best = None
    for folder in root.glob("checkpoint-*"):
        try:
            step = int(folder.name.split("-", 1)[1])
        except ValueError:
            continue
        if not (folder / COMPLETE_MARKER).is_file():
            shutil.rmtree(folder, ignore_errors=True)  # written by a run killed mid-save
            continue
        if best is None or step > best[0]:
            best = (step, folder)
    return best[1] if best else None
