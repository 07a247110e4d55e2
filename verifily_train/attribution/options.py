"""The ``attribute`` settings (seeds, error rate, correction, budget, concurrency), checked before any retraining.

``verifily attribute`` checks its flags with :func:`check_options` before Prefect starts; the orchestration
(``attribution/orchestrate.py``) checks them too, since a deployment run comes with no command line. A call's
settings travel as one object: :class:`AttributeOptions` (by tag) or :class:`RowOptions` (``--rows``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

from verifily_train.attribution.stats import DEFAULT_CONTROLS, DEFAULT_SEEDS
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


@dataclass(frozen=True)
class AttributeOptions:
    """One ``verifily attribute RUN --by KEY`` call (the ``attribute`` flow's parameters)."""

    run: str
    by: str = "source"
    values: Optional[Tuple[str, ...]] = None  # None: every value present in the train rows
    seeds: int = DEFAULT_SEEDS
    budget_steps: Optional[int] = None
    budget_fraction: Optional[float] = None
    concurrency: int = 2  # ablation runs at once
    out_dir: Optional[str] = None
    deployment: Optional[str] = None  # a training deployment each ablation run is submitted to
    bootstrap_samples: int = 1000
    alpha: float = 0.05
    correction: str = "holm"
    target: Optional[str] = None
    controls: int = DEFAULT_CONTROLS

    def __post_init__(self):
        if self.values is not None:
            object.__setattr__(self, "values", tuple(self.values))

    def check(self) -> None:
        check_options(self.seeds, self.alpha, self.correction, self.budget_steps, self.budget_fraction,
                      controls=self.controls)


@dataclass(frozen=True)
class RowOptions:
    """One ``verifily attribute RUN --rows`` call (the ``attribute-rows`` flow's parameters)."""

    run: str
    target: str = "test"
    checkpoints: Optional[int] = None
    shards: int = 1
    projection_dim: Optional[int] = None  # None: the default projection
    seed: int = 0
    methods: Optional[Tuple[str, ...]] = None
    verify: int = 0  # K > 0: retrain without the top-K rows and without K random rows
    seeds: int = DEFAULT_SEEDS
    budget_steps: Optional[int] = None
    budget_fraction: Optional[float] = None
    concurrency: int = 2  # shard task runs (and --verify's retraining runs) at once
    out_dir: Optional[str] = None
    deployment: Optional[str] = None
    alpha: float = 0.05
    correction: str = "holm"
    bootstrap_samples: int = 1000
    select: Optional[str] = None
    same_rows: bool = False
    verify_by: Optional[str] = None

    def __post_init__(self):
        if self.methods is not None:
            object.__setattr__(self, "methods", tuple(self.methods))

    @property
    def method_list(self) -> Optional[List[str]]:
        return None if self.methods is None else list(self.methods)
