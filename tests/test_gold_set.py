"""eval.gold_set: a separate SFT JSONL scored by normalized exact match and token F1."""

from __future__ import annotations

import json

import pytest

from conftest import train, write_config

pytestmark = pytest.mark.slow


def test_gold_set_is_scored_and_reported(tmp_path, models, sft_splits, prefect_api):
    gold = tmp_path / "gold.jsonl"
    rows = [{"instruction": "Give the opposite of the word.", "input": "hot", "output": "cold"},
            {"instruction": "Write the animal twice.", "input": "cat", "output": "cat cat"},
            {"instruction": "Repeat the colors exactly.", "output": "red blue"}]
    gold.write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_config(tmp_path, "sft", models["llama"], sft_splits, training={"max_steps": 2},
                 eval={"gold_set": str(gold), "max_new_tokens": 4, "bootstrap_samples": 50})
    result, run = train(tmp_path, prefect_api)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run / "run.json").read_text())["metrics"]
    assert metrics["gold_examples"] == 3
    assert 0.0 <= metrics["gold_exact_match"] <= 1.0 and 0.0 <= metrics["gold_token_f1"] <= 1.0
    assert "gold set: exact_match=" in result.stdout
