"""The typed stage contract: outputs declare every field, stages read only what they need, the Run merges fragments."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from verifily_train.artifacts.record import RunFragment, merged
from verifily_train.pipeline.contract import (Baseline, Evaluated, Fingerprint, HardExamples, Sliced, Tokenized,
                                              Validated, gguf_identity)
from verifily_train.pipeline.runner import BY_NAME, STAGES
from verifily_train.pipeline.stage import Stage, StageContext

HARD = {"stage": "hard_examples", "file": "hard_examples.jsonl", "count": 2, "headline": None, "lift": {}}
FP = Fingerprint.from_json({
    "stage": "fingerprint", "dataset": {"data_hash": "d" * 64, "ref": "local@x", "manifest_path": None,
                                        "data_path": "/data"},
    "data_hash": "d" * 64, "config_hash": "c" * 64, "model": {"source": "m", "kind": "causal_lm"},
    "model_identity": gguf_identity("a" * 64), "gguf_conversion": "reused", "tokenizer_identity": None,
    "device": {"device": "cpu", "precision": "fp32", "warnings": ["w"]}, "numeric_env": {}})


def test_a_new_stage_output_field_is_a_type_error_until_the_contract_declares_it():
    with pytest.raises(TypeError, match="does not declare rows_seen"):
        HardExamples.from_json(dict(HARD, rows_seen=10))  # a stage.json (or a library manifest) with a new key
    with pytest.raises(TypeError):
        HardExamples(**HARD, rows_seen=10)  # a stage building its output with a new field

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Declared(HardExamples):
        rows_seen: int = 0

    assert Declared.from_json(dict(HARD, rows_seen=10)).to_json()["rows_seen"] == 10


def test_a_stage_that_returns_an_undeclared_shape_fails():
    def returns_a_dict(ctx, out_dir, work_dir):
        return dict(HARD)

    stage = dataclasses.replace(BY_NAME["hard_examples"], run=returns_a_dict)
    with pytest.raises(TypeError, match="returned dict, not HardExamples"):
        stage.produce(StageContext(None, FP, {}), Path("."), Path("."))


def test_an_output_of_another_stage_is_refused():
    with pytest.raises(TypeError, match="output of stage 'evaluate', not 'baseline'"):
        Evaluated(stage="baseline", skipped=True, note="n", split=None, metrics={})


@pytest.mark.parametrize("output", [
    Validated(stage="validate", dataset={"ref": "x"}, data_hash="d"),
    Evaluated(stage="evaluate", skipped=True, note="no eval split", split=None, metrics={}),
    Baseline(stage="baseline", skipped=False, note=None, split="test", metrics={"loss": 1.0},
             predictions="predictions.parquet", quantization="4bit", key="k", cache_hit=True, dir="/c"),
    Sliced(stage="slice", slices={}, note="skipped", file="slices.json"),
    HardExamples(**HARD, key="k", output_hash="h", cache_hit=False, seconds=0.5, dir="/c", private="/p"),
])
def test_stage_json_round_trips_and_leaves_absent_fields_absent(output):
    data = output.to_json()
    assert type(output).from_json(data) == output
    assert all(value is not None for name, value in data.items()
               if name in ("predictions", "format", "gold", "classification_report", "quantization", "overall", "key"))
    tail = [name for name in data if name in ("cache_hit", "seconds", "dir", "private")]
    assert list(data)[len(data) - len(tail):] == tail  # as the cache hands a read manifest back


def test_every_stage_declares_its_output_and_what_it_needs_ran_before_it():
    seen = set()
    for stage in STAGES:
        assert isinstance(stage, Stage) and stage.output.STAGE == stage.name
        assert set(stage.needs) <= seen, stage.name
        seen.add(stage.name)
    assert [s.name for s in STAGES if s.reports_progress] == ["train"]


def test_a_stage_reads_only_what_it_needs():
    hard = BY_NAME["hard_examples"]
    evaluated = Evaluated(stage="evaluate", skipped=True, note="n", split=None, metrics={})
    with pytest.raises(RuntimeError, match="needs evaluate"):
        hard.context(None, FP, {})
    ctx = hard.context(None, FP, {"evaluate": evaluated, "validate": Validated(stage="validate", dataset={},
                                                                                data_hash="d")})
    assert ctx["evaluate"] is evaluated
    with pytest.raises(KeyError, match="reads only the stages it needs"):
        ctx["validate"]


def test_the_fingerprint_is_one_type_for_the_flow_and_replay():
    assert FP.is_gguf and FP.max_positions is None and FP.chat_template_hash is None
    with pytest.raises(TypeError, match="does not declare tokens"):
        Fingerprint.from_json(dict(FP.to_json(), tokens=1))
    assert Fingerprint.from_json(FP.to_json()) == FP
    validated = Validated(stage="validate", dataset={"ref": "local@x", "num_rows": 3}, data_hash="d" * 64)
    assert FP.dataset_now(validated) == {"ref": "local@x", "num_rows": 3, "manifest_path": None, "data_path": "/data"}


def test_two_stages_contributing_one_run_key_is_refused():
    with pytest.raises(ValueError, match="two stages contribute run.json key precision"):
        merged([RunFragment(record={"precision": "fp32"}).record, RunFragment(record={"precision": "bf16"}).record],
               "run.json key")


def test_the_tokenized_fragment_reports_truncation_per_split():
    tokenized = Tokenized(stage="tokenize", splits={"train": {"file": "train.parquet", "truncated": 2, "dropped": 1}},
                          labels=[], eval_split=None, eval_note=None, truncated_rows=2, max_seq_length=8, prompt=None,
                          render_check=None, stop_token_ids=[], warnings=["cut"])
    fragment = tokenized.run_fragment(FP)
    assert fragment.metrics == {"truncated_rows": 2} and fragment.warnings == ("cut",)
    assert fragment.metrics_file["answer_cut_by_split"] == {"train": 0}
    assert fragment.metrics_file["dropped_by_split"] == {"train": 1}
