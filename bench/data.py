"""Synthetic SFT datasets over three learnable tasks, in two length regimes.

``skewed``: inputs of log-normal length (long tail), so random batches carry a lot of padding.
``short``: one to four words of input (rows of about 30 tokens on SmolLM2), where much instruction data
lives (one-line answers, classification-style prompts): little padding, and per-step overhead weighs most.

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


REGIMES = ("skewed", "short")
SHORT_WORDS = (1, 4)  # the short regime's input length in words, uniform between these bounds


def skewed_row(rng: random.Random, median_words: float) -> dict:
    """One row; the input's word count is log-normal around ``median_words`` (sigma 0.8), capped at 200."""
    return task_row(rng, max(1, min(200, int(round(math.exp(rng.gauss(math.log(median_words), 0.8)))))))


def short_row(rng: random.Random) -> dict:
    """One row of the short regime: the same three tasks on an input of one to four words."""
    return task_row(rng, rng.randint(*SHORT_WORDS))


def task_row(rng: random.Random, n: int) -> dict:
    """One row of a random task (reverse, list the animals, count the colours) on ``n`` random words."""
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


def short_rows(n: int, seed: int) -> List[dict]:
    rng = random.Random(seed)
    return [short_row(rng) for _ in range(n)]


def write_skewed_splits(folder: Path, sizes: Dict[str, int], seed: int = 7, median_words: float = 8.0) -> Dict[str, Path]:
    """``<folder>/<split>.jsonl`` for each split size (skewed regime); returns split -> path."""
    return write_splits(folder, sizes, "skewed", seed, median_words)


def write_splits(folder: Path, sizes: Dict[str, int], regime: str = "skewed", seed: int = 7,
                 median_words: float = 8.0) -> Dict[str, Path]:
    """``<folder>/<split>.jsonl`` for each split size in one length regime; returns split -> path."""
    if regime not in REGIMES:
        raise ValueError(f"regime {regime!r}: choose among {', '.join(REGIMES)}")
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for offset, (split, n) in enumerate(sizes.items()):
        path = folder / f"{split}.jsonl"
        split_seed = seed + 1000 * offset
        rows = skewed_rows(n, split_seed, median_words) if regime == "skewed" else short_rows(n, split_seed)
        with open(path, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
        paths[split] = path
    return paths


def read_rows(path: Path) -> List[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
