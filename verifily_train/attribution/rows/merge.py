"""Merge the shards into ``row_attribution.parquet``: every train row with each method's score and rank."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from verifily_train.attribution.rows.plan import RowAttributionPlan

RESULT_FILE = "row_attribution.parquet"


def merge_shards(plan: RowAttributionPlan, shard_manifests: List[dict], out_dir: Path,
                 shard_dirs: Optional[List[Path]] = None) -> dict:
    """Write ``out_dir/row_attribution.parquet`` (example_id, split, file, line, row_hash, tags, text, and per
    method ``score_<m>``, ``rank_<m>``; rank 1 = most harmful); returns a manifest naming the default method.

    ``shard_dirs``: where each shard's file is (default: each manifest's ``dir``).
    """
    raise NotImplementedError


def summarize_by_tag(table, method: str, tag: str, bootstrap: int = 1000, seed: int = 0) -> List[dict]:
    """Per value of tag ``tag``: rows, sum and mean of ``score_<method>`` with percentile-bootstrap 95% intervals."""
    raise NotImplementedError
