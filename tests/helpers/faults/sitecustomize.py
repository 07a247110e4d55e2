"""Fault injection for crash tests, loaded by Python at start-up from a test's ``PYTHONPATH`` (never by production).

``VERIFILY_TEST_FAIL_RANK=<rank>:<step>``: in that data-parallel rank of a train stage (torchrun's
``RANK``, inside a rank ``launch_ranks`` started), every HF Trainer gets a callback that raises after
optimizer step ``<step>``. Every other process (the CLI, the launcher, the other ranks) is left alone.
"""

import os

FAIL_ENV = "VERIFILY_TEST_FAIL_RANK"
_spec = os.environ.get(FAIL_ENV, "")
_rank, _, _step = _spec.partition(":")
if _spec and os.environ.get("VERIFILY_DDP_JOB") and int(_rank) == int(os.environ.get("RANK", "0")):
    from transformers import Trainer, TrainerCallback

    class FailAfterStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= int(_step or 0):
                raise RuntimeError(f"injected failure after step {state.global_step} ({FAIL_ENV})")

    _init = Trainer.__init__

    def _init_with_failure(self, *args, **kwargs):
        _init(self, *args, **kwargs)
        self.add_callback(FailAfterStep())

    Trainer.__init__ = _init_with_failure
