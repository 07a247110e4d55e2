"""A synthetic SFT dataset with a realistic, right-skewed length distribution (log-normal, long tail).

Words come from the fixture vocabulary so the word-level tokenizer of the offline bench model covers
them; the tasks are learnable (reverse, filter, count), so the loss falls and "equal loss" means something.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Dict, List

from verifily_train.fixtures.data import ANIMALS, COLORS, OPPOSITES, SOURCES, SOURCE_WEIGHTS

WORDS = COLORS + ANIMALS + [w for pair in OPPOSITES for w in pair]


def skewed_row(rng: random.Random, median_words: float) -> dict:
    """One row; the input's word count is log-normal around ``median_words`` (sigma 0.8), capped at 200."""
    n = max(1, min(200, int(round(math.exp(rng.gauss(math.log(median_words), 0.8))))))
    words = [rng.choice(WORDS) for _ in range(n)]
    kind = rng.choice(["reverse", "animals", "count"])
    if kind == "reverse":
        instruction, out = "Repeat the words in reverse order.", " ".join(reversed(words))
    elif kind == "animals":
        instruction, out = "List only the animals, in order.", " ".join(w for w in words if w in ANIMALS) or "none"
    else:
        instruction, out = "Say how many colors there are.", f"{sum(w in COLORS for w in words)} colors"
    source = rng.choices(SOURCES, SOURCE_WEIGHTS)[0]
    return {"instruction": instruction, "input": " ".join(words), "output": out,
            "tags": {"source": source, "kind": kind}}


def skewed_rows(n: int, seed: int, median_words: float = 8.0) -> List[dict]:
    rng = random.Random(seed)
    return [skewed_row(rng, median_words) for _ in range(n)]


def write_skewed_splits(folder: Path, sizes: Dict[str, int], seed: int = 7, median_words: float = 8.0) -> Dict[str, Path]:
    """``<folder>/<split>.jsonl`` for each split size; returns split -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for offset, (split, n) in enumerate(sizes.items()):
        path = folder / f"{split}.jsonl"
        with open(path, "w", encoding="utf-8") as handle:
            for row in skewed_rows(n, seed + 1000 * offset, median_words):
                handle.write(json.dumps(row) + "\n")
        paths[split] = path
    return paths


def read_rows(path: Path) -> List[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
