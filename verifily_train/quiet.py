"""The environment that keeps Prefect's console log copy, transformers' advisories and the Hub's progress bars
off the terminal: one definition, for this process (the CLI) and for the processes a flow starts."""

from __future__ import annotations

import os
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


def quiet_libraries() -> None:
    """Apply :data:`QUIET_ENV` to this process (a value the user set is kept), before Prefect or transformers
    is imported; FutureWarnings are not shown."""
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    warnings.filterwarnings("ignore", category=FutureWarning)
