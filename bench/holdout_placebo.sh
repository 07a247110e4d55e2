#!/usr/bin/env bash
# A coin-flip placebo tag on a dataset no calibration used, through the CLI at the defaults (issue #35).
# Usage: bash bench/holdout_placebo.sh [WORKDIR]. Result of 2026-12-07: bench/results/attribution-holdout-placebo.json
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
export W="${1:-$(mktemp -d)}"
mkdir -p "$W" && cd "$W"
. "$REPO/.venv/bin/activate"
export VERIFILY_HOME="$W/home" HF_HUB_OFFLINE=1
python - <<'PY'
import json, os, random
from pathlib import Path
from verifily_train.fixtures.data import ANIMALS, COLORS, NEGATIVE, NEUTRAL, POSITIVE
from verifily_train.fixtures.models import build_model
work = Path(os.environ["W"])
build_model("bert", work / "tiny-bert", seed=7)
rng = random.Random(2026)  # a distribution no calibration used: animals and colours, the fixture's words
def row():
    label = rng.choice(["positive", "negative", "neutral"])
    words = {"positive": POSITIVE, "negative": NEGATIVE, "neutral": NEUTRAL}[label]
    text = f"the {rng.choice(ANIMALS)} was {rng.choice(COLORS)} and {rng.choice(words)}"
    return {"text": text, "label": label, "tags": {"coin": rng.choice(["heads", "tails"])}}
for split, n in (("train", 150), ("val", 12), ("test", 80)):
    (work / f"{split}.jsonl").write_text("".join(json.dumps(row()) + "\n" for _ in range(n)))
PY
verifily dataset create --id ds_weather --version v1 --task classification --train train.jsonl --val val.jsonl --test test.jsonl
cat > train.yaml <<YAML
task: classification
base_model: $W/tiny-bert
dataset_version: ds_weather@v1
training: {num_epochs: 50, max_steps: 30, batch_size: 16, gradient_accumulation_steps: 1, learning_rate: 0.003, lr_scheduler: constant, warmup_ratio: 0.0, max_seq_length: 32, save_steps: 1000, eval_steps: 1000}
lora: {enabled: false}
eval: {bootstrap_samples: 0, hard_examples: 5, slice_by_tags: [coin]}
YAML
verifily train -c train.yaml
run=$(ls runs | head -1)
verifily attribute "$run" --by coin --dry-run
verifily attribute "$run" --by coin
