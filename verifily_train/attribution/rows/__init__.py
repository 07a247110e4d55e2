"""Row-level attribution: which train rows raised (or lowered) the target's loss, from saved adapter snapshots.

The work is four pure steps, each writing files into its own ``out_dir`` and returning a small JSON
manifest, so an orchestrator can cache and shard them (no Prefect here):
``plan_row_attribution`` -> ``target_gradients`` -> ``score_shard`` (x shards) -> ``merge_shards``.
"""

from verifily_train.attribution.rows.merge import RESULT_FILE, attribute_rows, merge_shards, summarize_by_tag
from verifily_train.attribution.rows.plan import (DEFAULT_METHOD, DEFAULT_PROJECTION_DIM, METHODS, RowAttributionPlan,
                                                  key_inputs, plan_row_attribution)
from verifily_train.attribution.rows.scores import score_shard, target_gradients

__all__ = ["DEFAULT_METHOD", "attribute_rows", "DEFAULT_PROJECTION_DIM", "METHODS", "RESULT_FILE", "RowAttributionPlan", "key_inputs",
           "merge_shards", "plan_row_attribution", "score_shard", "summarize_by_tag", "target_gradients"]
