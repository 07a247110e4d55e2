#!/usr/bin/env bash
# A second held-out placebo (issue #35), at the defaults of 2026-12-07 evening (8 seeds x 2 random controls per
# size, the subset variance counted 1.5 times): a dataset built for this check only, never used by a
# calibration or a test (reviews in a new template, an unbalanced 30/70 coin-flip tag, 200 train rows), and
# the low-noise training of the converged regime (200 steps, cosine), where placebo calls are likeliest.
# Usage: bash bench/holdout_placebo_2.sh [WORKDIR]. Writes bench/results/attribution-holdout-placebo-2.json.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
export W="${1:-$(mktemp -d)}"
mkdir -p "$W" && cd "$W"
. "$REPO/.venv/bin/activate"
export VERIFILY_HOME="$W/home" HF_HUB_OFFLINE=1
python - <<'PY'
import json, os, random
from pathlib import Path
from verifily_train.fixtures.data import NEGATIVE, NEUTRAL, POSITIVE, SUBJECTS
from verifily_train.fixtures.models import build_model
work = Path(os.environ["W"])
build_model("bert", work / "tiny-bert", seed=11)
rng = random.Random("holdout-2/20261207")
def row():
    label = rng.choice(["positive", "negative", "neutral"])
    words = {"positive": POSITIVE, "negative": NEGATIVE, "neutral": NEUTRAL}[label]
    text = f"review of the {rng.choice(SUBJECTS)}: {rng.choice(words)}, then {rng.choice(words)}"
    return {"text": text, "label": label, "tags": {"coin": "heads" if rng.random() < 0.3 else "tails"}}
for split, n in (("train", 200), ("val", 12), ("test", 90)):
    (work / f"{split}.jsonl").write_text("".join(json.dumps(row()) + "\n" for _ in range(n)))
PY
verifily dataset create --id ds_reviews --version v1 --task classification --train train.jsonl --val val.jsonl --test test.jsonl
cat > train.yaml <<YAML
task: classification
base_model: $W/tiny-bert
dataset_version: ds_reviews@v1
training: {num_epochs: 100, max_steps: 200, batch_size: 16, gradient_accumulation_steps: 1, learning_rate: 0.001, lr_scheduler: cosine, warmup_ratio: 0.1, max_seq_length: 32, save_steps: 1000, eval_steps: 1000, attribution_snapshots: 0}
lora: {enabled: false}
eval: {bootstrap_samples: 0, hard_examples: 5, slice_by_tags: [coin]}
output: {dir: runs/}
YAML
verifily train -c train.yaml
run=$(ls runs | head -1)
verifily attribute "runs/$run" --by coin --dry-run
verifily attribute "runs/$run" --by coin --json > attribution.json
python - "$REPO/bench/results/attribution-holdout-placebo-2.json" <<'PY'
import json, sys
r = json.load(open("attribution.json"))
out = {"what": "held-out placebo 2: reviews, 30/70 coin tag, 200 train / 90 test rows, converged training; "
               "verifily attribute RUN --by coin at the defaults",
       "seeds": r["seeds"], "method": r["method"], "target": r["target"]["words"], "cost": r["cost"],
       "values": {v: {"verdict": e["verdict"], "why": e["why"], "p_adjusted": e["p_adjusted"],
                      "removed_rows": e["removed_rows"]} for v, e in r["values"].items()}}
json.dump(out, open(sys.argv[1], "w"), indent=1)
print(json.dumps(out["values"], indent=1))
PY
