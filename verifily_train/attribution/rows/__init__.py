"""Row-level scores from saved adapter snapshots, in two families: suspect rows (no target: loss, loss dynamics,
label issues, self-influence) and attribution (a row's estimated effect on a target's loss: TracIn, and TracIn
preconditioned as AdamW stepped).

The work is four pure steps, each writing files into its own ``out_dir`` and returning a small JSON
manifest, so an orchestrator can cache and shard them (no Prefect here):
``plan_row_attribution`` -> ``target_gradients`` -> ``score_shard`` (x shards) -> ``merge_shards``.
"""

from verifily_train.attribution.rows.merge import (RESULT_FILE, attribute_rows, merge_shards, read_families,
                                                   summarize_by_tag)
from verifily_train.attribution.rows.plan import (ATTRIBUTION, DEFAULT_ATTRIBUTION, DEFAULT_METHOD, DEFAULT_METHODS,
                                                  DEFAULT_PROJECTION_DIM, FAMILIES, METHODS, SUSPECT, TARGET_METHODS,
                                                  RowAttributionPlan, key_inputs, plan_row_attribution)
from verifily_train.attribution.rows.scores import score_shard, target_gradients

__all__ = ["ATTRIBUTION", "DEFAULT_ATTRIBUTION", "DEFAULT_METHOD", "DEFAULT_METHODS", "DEFAULT_PROJECTION_DIM", "FAMILIES",
           "METHODS", "RESULT_FILE", "RowAttributionPlan", "SUSPECT", "TARGET_METHODS", "attribute_rows", "key_inputs",
           "merge_shards", "plan_row_attribution", "read_families", "score_shard", "summarize_by_tag",
           "target_gradients"]
