"""The environment that keeps Prefect's console log copy, transformers' advisories and the Hub's progress bars
off the terminal: one definition, for this process (the CLI) and for the processes a flow starts."""

from __future__ import annotations

import os
import sys
import warnings

# Logs still reach the Prefect API (and UI); only the console copy is silenced. A user error is then one
# line from the CLI, and a bug keeps the traceback Python prints. transformers reads its verbosity at
# import: no per-weight loading bars, no advisory warnings in the summary.
QUIET_ENV = {
    "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "CRITICAL",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


# Without a terminal to redraw on (a log file, CI, a pipe, a Prefect worker), every progress bar update is one
# more line of noise: tqdm (the datasets library's, and any bar nobody passes ``disable`` to) is switched off.
NO_TTY_ENV = {
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",
}


def progress_bars(enabled: bool = True) -> bool:
    """Whether to draw progress bars: ``enabled`` (``runtime.progress``) and stderr, where bars are drawn, is a
    terminal. Redirected or piped, the stage summaries (and the Prefect logs) are the progress report."""
    if not enabled:
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def quiet_libraries() -> None:
    """Apply :data:`QUIET_ENV` to this process (a value the user set is kept), before Prefect or transformers
    is imported; FutureWarnings are not shown. Without a terminal, progress bars are off too (``NO_TTY_ENV``),
    including those of transformers and the Hub when they were imported already."""
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    warnings.filterwarnings("ignore", category=FutureWarning)
    if "transformers" in sys.modules:  # it read HF_HUB_DISABLE_PROGRESS_BARS at import (the demo's model build)
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    if not progress_bars():
        for name, value in NO_TTY_ENV.items():
            os.environ.setdefault(name, value)
        if "huggingface_hub" in sys.modules:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
