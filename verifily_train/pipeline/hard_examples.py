"""Stage ``hard_examples``: the ``eval.hard_examples`` worst examples, with their tags and the headline test."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

from verifily_train.dataset.rows import iter_jsonl, shown_fields
from verifily_train.evaluation.hard import mine_hard_examples
from verifily_train.model.tokenize import row_hash
from verifily_train.pipeline.contract import HardExamples
from verifily_train.pipeline.stage import Stage, StageContext
from verifily_train.pipeline.validate import current_version


def key_inputs(ctx: StageContext) -> tuple:
    cfg = ctx.cfg
    return ctx["evaluate"].output_hash, cfg.eval.hard_examples, cfg.eval.slice_by_tags, cfg.eval.fdr_q


def attach_fields(examples: List[dict], dv, split: str) -> None:
    """Each example's own row fields (``fields``: instruction/input, the last user turn, the prompt), found by
    row hash in the evaluated split: the report shows those, not the rendered chat template."""
    wanted = {e["row_hash"] for e in examples if e.get("row_hash")}
    found: Dict[str, dict] = {}
    for f in dv.split_files(split) if wanted else []:
        for _, row in iter_jsonl(Path(f.abs_path), f.abs_path):
            digest = row_hash(row)
            if digest in wanted and digest not in found:
                found[digest] = shown_fields(row)
    for example in examples:
        if example.get("row_hash") in found:
            example["fields"] = found[example["row_hash"]]


def run(ctx: StageContext, out_dir: Path, work_dir: Path) -> HardExamples:
    cfg, evaluated = ctx.cfg, ctx["evaluate"]
    if evaluated.skipped:
        result = {"examples": [], "headline": None, "lift": {}}
    else:
        result = mine_hard_examples(cfg.task, evaluated.read_predictions(), cfg.eval.hard_examples,
                                    cfg.eval.slice_by_tags, q=cfg.eval.fdr_q)
        if cfg.task == "sft":
            attach_fields(result["examples"], current_version(ctx), evaluated.split)
    with open(out_dir / "hard_examples.jsonl", "w", encoding="utf-8") as handle:
        for example in result["examples"]:
            handle.write(json.dumps(example, sort_keys=True, ensure_ascii=False) + "\n")
    return HardExamples(stage="hard_examples", file="hard_examples.jsonl", count=len(result["examples"]),
                        headline=result["headline"], lift=result["lift"])


STAGE = Stage("hard_examples", "mine-hard-examples", "hard/1", __name__, key_inputs, run, HardExamples,
              needs=("evaluate",),
              retries="eval", description="The worst evaluation examples with their tags.")
