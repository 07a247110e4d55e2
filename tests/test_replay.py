"""Pieces of the identical-re-run replay that need no training: the chart memo and the device signature.

The end-to-end behaviour (a replayed Run equal to the flow's, damaged entries and changed inputs going
through the flow) is in tests/test_cache.py.
"""

from __future__ import annotations

import json

from verifily_train.artifacts.report import ChartMemo, loss_curve
from verifily_train.pipeline.replay import device_signature

LOG = [{"step": s, "loss": 3.0 / s} for s in range(1, 9)] + [{"step": 8, "eval_loss": 0.7}]


def test_chart_memo_draws_once_and_redraws_a_damaged_chart(tmp_path):
    calls = []

    def counted(rows):
        calls.append(1)
        return loss_curve(rows)

    counted.__name__ = "loss_curve"
    memo = ChartMemo(tmp_path / "charts")
    first = memo(counted, LOG)
    assert first.startswith("data:image/png;base64,") and len(calls) == 1
    assert memo(counted, LOG) == first and len(calls) == 1  # reused, not drawn
    assert memo(counted, LOG[:-1]) != first and len(calls) == 2  # other data, another chart
    for saved in (tmp_path / "charts").glob("*.json"):
        record = json.loads(saved.read_text())
        saved.write_text(json.dumps(dict(record, uri=record["uri"][:-8] + "AAAAAAAA")))
    assert memo(counted, LOG) == first and len(calls) == 3  # a damaged file is drawn again, not served
    assert ChartMemo(None)(counted, LOG) == first and len(calls) == 4  # no cache: always drawn


def test_device_signature_follows_the_device_environment(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    base = device_signature()
    assert base == device_signature()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert device_signature() != base
    assert base["torch"] and base["cpu_count"]


def test_a_computed_manifest_and_its_cache_hit_are_equal_in_value_and_order(tmp_path):
    """A replay reads every stage from the cache: the manifest it gets must be the one the computing run got,
    key order included (#39: a replay printed the slices in another order than the run it replays)."""
    from verifily_train.pipeline.cache import CacheMode, run_cached

    def compute(out, work):
        (out / "slices.json").write_text("{}")
        return {"stage": "slice", "slices": {"source": {"values": [{"value": "human", "n": 3}]},
                                             "difficulty": {"values": [{"value": "hard", "n": 2}]}},
                "overall": {"n": 5, "metrics": {"loss": 1.5, "exact_match": 0.2}}, "file": "slices.json"}

    mode = CacheMode(read=True, write=True)
    fresh = run_cached("slice", "a" * 64, tmp_path, mode, compute)
    hit = run_cached("slice", "a" * 64, tmp_path, mode, compute)
    assert not fresh["cache_hit"] and hit["cache_hit"]
    shown = [{k: v for k, v in m.items() if k not in ("cache_hit", "seconds")} for m in (fresh, hit)]
    assert json.dumps(shown[0]) == json.dumps(shown[1])  # not sort_keys: the order itself is compared


def test_slices_are_shown_in_the_configs_order_whatever_order_the_manifest_holds():
    from verifily_train.artifacts.tables import ordered_slices, slice_table

    block = {"values": [{"value": "x", "n": 1, "metrics": {"loss": 1.0}, "ci95": {}, "delta": {"loss": 0.0},
                         "low_confidence": True}]}
    summary = {"slices": {"slices": {"difficulty": block, "other": block, "source": block}},
               "record": {"job": {"config": {"eval": {"slice_by_tags": ["source", "difficulty"]}}}}}
    assert [k for k, _ in ordered_slices(summary)] == ["source", "difficulty", "other"]
    assert [r["tag"] for r in slice_table(summary)] == ["source", "difficulty", "other"]
