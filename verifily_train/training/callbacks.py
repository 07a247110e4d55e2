"""The train stage's Trainer callbacks: one progress bar for steps, and the caller's progress hook."""

from __future__ import annotations

import time

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback


class StepProgress(ProgressCallback):
    """One bar for training steps with the latest loss on it, instead of a printed dict per log."""

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if self.training_bar is not None:
            self.training_bar.set_description("train")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.training_bar is not None and logs:
            shown = {k: f"{v:.4g}" for k, v in logs.items() if k in ("loss", "eval_loss") and isinstance(v, float)}
            if shown:
                self.training_bar.set_postfix(shown, refresh=False)


class ReportProgress(TrainerCallback):
    """Tell the caller how many optimizer steps are done (at most once a second, and at the end)."""

    def __init__(self, hook):
        self.hook, self.last = hook, 0.0

    def on_step_end(self, args, state, control, **kwargs):
        now = time.monotonic()
        if now - self.last >= 1.0 or state.global_step >= state.max_steps:
            self.last = now
            self.hook(state.global_step, state.max_steps)
