#!/usr/bin/env bash
# A third held-out placebo (issue #35), at the defaults of 2026-12-07 night (8 seeds x 2 random controls per
# size; one-sided claims: a "hurts" from the one-draw test, a "helps" from the distribution-free rank p): a
# dataset built for this check only, never used by a calibration or a test (support tickets in a new template,
# a three-valued random tag: the annotator batch each row was assigned to at random, 240 train rows), and the
# converged regime's training (200 steps, cosine), where placebo calls are likeliest.
# Usage: bash bench/holdout_placebo_3.sh [WORKDIR]. Writes bench/results/attribution-holdout-placebo-3.json
# (every value's per-seed effects and control runs kept, so a change of the test can re-judge it).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
export W="${1:-$(mktemp -d)}"
mkdir -p "$W" && cd "$W"
. "$REPO/.venv/bin/activate"
export VERIFILY_HOME="$W/home" HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
python - <<'PY'
import json, os, random
from pathlib import Path
from verifily_train.fixtures.data import NEGATIVE, NEUTRAL, POSITIVE, SUBJECTS
from verifily_train.fixtures.models import build_model
work = Path(os.environ["W"])
build_model("bert", work / "tiny-bert", seed=23)
rng = random.Random("holdout-3/20261207-night")
def row():
    label = rng.choice(["positive", "negative", "neutral"])
    words = {"positive": POSITIVE, "negative": NEGATIVE, "neutral": NEUTRAL}[label]
    text = f"ticket: customer called the {rng.choice(SUBJECTS)} {rng.choice(words)}"
    return {"text": text, "label": label, "tags": {"batch": rng.choice(["b1", "b2", "b3"])}}
for split, n in (("train", 240), ("val", 12), ("test", 100)):
    (work / f"{split}.jsonl").write_text("".join(json.dumps(row()) + "\n" for _ in range(n)))
PY
verifily dataset create --id ds_tickets --version v1 --task classification --train train.jsonl --val val.jsonl --test test.jsonl
cat > train.yaml <<YAML
task: classification
base_model: $W/tiny-bert
dataset_version: ds_tickets@v1
training: {num_epochs: 100, max_steps: 200, batch_size: 16, gradient_accumulation_steps: 1, learning_rate: 0.001, lr_scheduler: cosine, warmup_ratio: 0.1, max_seq_length: 32, save_steps: 1000, eval_steps: 1000, attribution_snapshots: 0}
lora: {enabled: false}
eval: {bootstrap_samples: 0, hard_examples: 5, slice_by_tags: [batch]}
output: {dir: runs/}
YAML
verifily train -c train.yaml
run=$(ls runs | head -1)
verifily attribute "runs/$run" --by batch --dry-run
verifily attribute "runs/$run" --by batch
cp "attributions/$run-by-batch/attribution.json" attribution.json  # the call above wrote it (a second call re-spawns every cached arm)
python - "$REPO/bench/results/attribution-holdout-placebo-3.json" <<'PY'
import json, sys
r = json.load(open("attribution.json"))
keep = ("effect", "p", "rank_p", "control_runs", "per_seed", "removal_per_seed", "random_per_run", "controls")
out = {"what": "held-out placebo 3: support tickets, a three-valued random tag (batch), 240 train / 100 test rows, "
               "converged training; verifily attribute RUN --by batch at the defaults",
       "seeds": r["seeds"], "method": r["method"], "target": r["target"]["words"], "cost": r["cost"],
       "family": r.get("family"),
       "values": {v: {"verdict": e["verdict"], "why": e["why"], "p_adjusted": e["p_adjusted"],
                      "removed_rows": e["removed_rows"],
                      "cell": {k: e["slices"][e["verdict_slice"]][r["primary_metric"]].get(k) for k in keep}}
                  for v, e in r["values"].items()}}
json.dump(out, open(sys.argv[1], "w"), indent=1)
print(json.dumps({v: (e["verdict"], e["p_adjusted"]) for v, e in out["values"].items()}, indent=1))
PY
