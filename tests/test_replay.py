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
