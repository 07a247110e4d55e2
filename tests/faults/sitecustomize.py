"""Fault injection for crash and kill tests, from the test side: on the subprocess's PYTHONPATH (conftest puts it).

``VERIFILY_FAIL_STAGE=<stage>`` makes that stage raise; ``VERIFILY_PAUSE_STAGE=<stage>:<seconds>`` holds the
stage open after it computed, inside its temporary folder (a window for a kill). Either one also turns
replay off, so the run goes through the stages. Production code reads neither.
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


_install()
