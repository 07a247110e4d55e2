"""Fault injection for crash and kill tests, from the test side: on the subprocess's PYTHONPATH (conftest puts it).

``VERIFILY_FAIL_STAGE=<stage>`` makes that stage raise; ``VERIFILY_PAUSE_STAGE=<stage>:<seconds>`` holds the
stage open after it computed, inside its temporary folder (a window for a kill). Either one also turns
replay off, so the run goes through the stages. ``VERIFILY_TEST_FAIL_RANK=<rank>:<step>``: in that
data-parallel rank of a train stage (torchrun's ``RANK``, inside a rank ``launch_ranks`` started), every HF
Trainer gets a callback that raises after optimizer step ``<step>``; every other process is left alone.
Production code reads none of them.
"""

import os


def _install() -> None:
    fail = os.environ.get("VERIFILY_FAIL_STAGE")
    name, _, seconds = os.environ.get("VERIFILY_PAUSE_STAGE", "").partition(":")
    if not fail and not name:
        return
    import time

    from verifily_train.pipeline import runner

    compute = runner.compute_stage

    def compute_with_faults(stage, ctx, cache):
        if stage.name == fail:
            raise RuntimeError(f"injected failure in stage {stage.name} (VERIFILY_FAIL_STAGE)")
        if stage.name != name:
            return compute(stage, ctx, cache)
        run = stage.run

        def paused(ctx, out_dir, work_dir):
            manifest = run(ctx, out_dir, work_dir)
            time.sleep(float(seconds or 0))
            return manifest

        import dataclasses

        return compute(dataclasses.replace(stage, run=paused), ctx, cache)

    runner.compute_stage = compute_with_faults
    runner.replay_run = lambda *args, **kwargs: None


FAIL_RANK = "VERIFILY_TEST_FAIL_RANK"


def _install_rank_failure() -> None:
    spec = os.environ.get(FAIL_RANK, "")
    rank, _, step = spec.partition(":")
    if not spec or not os.environ.get("VERIFILY_DDP_JOB") or int(rank) != int(os.environ.get("RANK", "0")):
        return
    from transformers import Trainer, TrainerCallback

    class FailAfterStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= int(step or 0):
                raise RuntimeError(f"injected failure after step {state.global_step} ({FAIL_RANK})")

    init = Trainer.__init__

    def init_with_failure(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.add_callback(FailAfterStep())

    Trainer.__init__ = init_with_failure


_install()
_install_rank_failure()
