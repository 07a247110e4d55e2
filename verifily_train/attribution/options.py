"""The ``attribute`` settings (seeds, error rate, correction, budget, concurrency), checked before any retraining.

``verifily attribute`` checks its flags with :func:`check_options` before Prefect starts; the ``attribute``
flow checks its parameters with it too, since a deployment run comes with no command line.
"""

from __future__ import annotations

from typing import Optional

from verifily_train.errors import VerifilyError

CORRECTIONS = ("holm", "bh")


def check_options(seeds: int, alpha: float, correction: str, budget_steps: Optional[int] = None,
                  budget_fraction: Optional[float] = None, concurrency: int = 1, controls: int = 1) -> None:
    """Raise the first bad setting as one line naming its flag."""
    if seeds < 1:
        raise VerifilyError(None, "--seeds", f"must be >= 1; got {seeds}")
    if not 0 < alpha < 1:
        raise VerifilyError(None, "--alpha", f"must be in (0, 1); got {alpha}")
    if correction not in CORRECTIONS:
        raise VerifilyError(None, "--correction", f"must be holm or bh; got {correction!r}")
    if budget_steps is not None and budget_fraction is not None:
        raise VerifilyError(None, "--budget-steps", "give --budget-steps or --budget-fraction, not both")
    if budget_fraction is not None and not 0 < budget_fraction <= 1:
        raise VerifilyError(None, "--budget-fraction", f"must be in (0, 1]; got {budget_fraction}")
    if budget_steps is not None and budget_steps < 1:
        raise VerifilyError(None, "--budget-steps", f"must be >= 1; got {budget_steps}")
    if not 1 <= controls <= 16:
        raise VerifilyError(None, "--controls", f"must be 1 to 16 random-subset controls per size and seed; got {controls}")
    if concurrency < 1:
        raise VerifilyError(None, "--concurrency", f"must be >= 1; got {concurrency}")
