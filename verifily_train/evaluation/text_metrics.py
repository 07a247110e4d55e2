"""Per-example SFT text metrics: normalized exact match, token F1, format compliance.

Normalization (SQuAD-style, documented in docs/evaluation.md): Unicode NFKC, lower case, punctuation
removed, the articles a/an/the removed, whitespace collapsed.
"""

from __future__ import annotations

import json
import re
import string
import unicodedata
from collections import Counter
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

from verifily_train.config.metricspec import generation_metrics
from verifily_train.config.validate import check_format_setting  # noqa: F401  (eval.format is a config value)

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
JSON_AUTO_THRESHOLD = 0.9  # eval.format: auto checks JSON when at least 90% of references parse


def normalize_answer(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """F1 over normalized whitespace tokens (multiset overlap); two empty strings score 1."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def _parses_as_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def resolve_format(setting: str, references: Sequence[str]) -> Optional[str]:
    """``auto`` -> ``json`` when >= 90% of references are JSON, else None (off); ``none`` -> None."""
    if setting == "none":
        return None
    if setting == "auto":
        if not references:
            return None
        share = sum(_parses_as_json(r.strip()) for r in references) / len(references)
        return "json" if share >= JSON_AUTO_THRESHOLD else None
    return setting


def format_ok(prediction: str, fmt: str) -> float:
    """1.0 when the prediction has the required format (``json`` or ``regex:<pattern>``, full match)."""
    if fmt == "json":
        return float(_parses_as_json(prediction.strip()))
    pattern = fmt[len("regex:"):]
    return float(re.fullmatch(pattern, prediction.strip(), flags=re.DOTALL) is not None)


class RowScorer(NamedTuple):
    score: Callable[[str, str, Optional[str]], float]  # (prediction, reference, format) -> the row's score
    needs_format: bool = False  # scored only when eval.format resolves to a format


# a generation metric's per-row scorer, under its predictions column (config/metricspec.py names the column)
ROW_SCORERS: Dict[str, RowScorer] = {
    "exact_match": RowScorer(lambda prediction, reference, fmt: exact_match(prediction, reference)),
    "token_f1": RowScorer(lambda prediction, reference, fmt: token_f1(prediction, reference)),
    "format_ok": RowScorer(lambda prediction, reference, fmt: format_ok(prediction, fmt), needs_format=True),
}


def score_texts(predictions: List[str], references: List[str], fmt: Optional[str]) -> dict:
    """Per-example score lists of every generation metric (format_ok only when a format applies), by column."""
    out = {}
    for spec in generation_metrics():
        scorer = ROW_SCORERS[spec.column]
        if scorer.needs_format and fmt is None:
            continue
        out[spec.column] = [scorer.score(p, r, fmt) for p, r in zip(predictions, references)]
    return out
