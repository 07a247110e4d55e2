"""Fit an SFT row into ``training.max_seq_length`` by cutting its user content, never the template's parts.

Every candidate is rendered and tokenized again, so the assistant header (the end of the prompt) and the
answer's end token survive by construction, whatever the template. Order of cuts (docs/datasets.md):

1. the answer is shortened only as far as needed to keep within half the window (or what the full
   prompt leaves, when that is more), keeping its end token;
2. user content, in the row's cut order (instruction rows: the input, then the instruction;
   conversations: the oldest exchanges, then the last user turn), each cut at its end or middle;
3. if the fixed parts of the prompt still leave no room, the answer again, down to one token and its
   end token; a row that cannot keep that much is reported (it would train on nothing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

MIDDLE_MARK = " ... "  # joins the kept beginning and end of a text cut in its middle


class TextCut:
    """A text cut to its first ``k`` tokens (``end``) or its first and last ``k / 2`` (``middle``).

    Cuts are made at the tokens' character offsets, so what is kept is the original text, not a decoding.
    """

    def __init__(self, tok, text: str, mode: str = "end"):
        self.text, self.mode, self.tok = text, mode, tok
        fast = getattr(tok, "is_fast", False)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=fast)
        self.ids: List[int] = enc["input_ids"]
        self.offsets = enc["offset_mapping"] if fast else None

    @property
    def n(self) -> int:
        return len(self.ids)

    def _head(self, k: int) -> str:
        if k <= 0:
            return ""
        if self.offsets is not None:
            return self.text[:self.offsets[k - 1][1]]
        return self.tok.decode(self.ids[:k])

    def _tail(self, k: int) -> str:
        if k <= 0:
            return ""
        if self.offsets is not None:
            return self.text[self.offsets[self.n - k][0]:]
        return self.tok.decode(self.ids[self.n - k:])

    def keep(self, k: int) -> str:
        """The text with ``k`` of its tokens kept (all of it when ``k >= n``)."""
        if k >= self.n:
            return self.text
        if self.mode == "end" or k <= 1:
            return self._head(k)
        head = (k + 1) // 2
        return self._head(head).rstrip() + MIDDLE_MARK + self._tail(k - head).lstrip()


@dataclass
class Cut:
    """One reducible part of a row: ``apply(k)`` gives the row's parts with ``k`` of its ``n`` units kept."""

    name: str
    n: int
    apply: Callable[[int], object]


@dataclass
class Fitted:
    encoded: Optional[object]  # None: even the shortest answer does not fit (reported by the caller)
    parts: object = None  # the row's parts as cut
    truncated: bool = False
    answer_cut: bool = False
    min_prompt_len: int = 0  # tokens the prompt needs with every user part cut away (for the report)


def _largest(lo: int, hi: int, ok: Callable[[int], bool]) -> Optional[int]:
    """The largest k in [lo, hi] with ok(k), assuming ok holds below some point; None when ok(lo) fails."""
    if not ok(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def fit_row(parts, encode: Callable[[object], object], user_cuts: Sequence[Callable[[object], Cut]],
            answer_cut: Callable[[object], Cut], fits: Callable[[object], bool], answer_share: Callable[[object], int]
            ) -> Fitted:
    """Cut ``parts`` until ``fits(encode(parts))``; see the module docstring for the order.

    Args:
        user_cuts: in cut order, each builds its ``Cut`` from the parts as the earlier cuts left them.
    """
    enc = encode(parts)
    if fits(enc):
        return Fitted(enc, parts)
    answer_cut_made = False
    share = answer_share(enc)
    if enc.answer_len > share:  # 1. the answer keeps at least its share of the window
        cut = answer_cut(parts)
        k = _largest(1, cut.n, lambda k: encode(cut.apply(k)).answer_len <= share)
        if k is not None and k < cut.n:
            parts, answer_cut_made = cut.apply(k), True
            enc = encode(parts)
    for make_cut in user_cuts:  # 2. user content, in order
        if fits(enc):
            break
        cut = make_cut(parts)
        k = _largest(0, cut.n, lambda k: fits(encode(cut.apply(k))))
        parts = cut.apply(k or 0)
        enc = encode(parts)
    min_prompt = enc.prompt_len
    if not fits(enc):  # 3. the fixed prompt leaves too little room: the answer again, down to one token
        cut = answer_cut(parts)
        k = _largest(1, cut.n, lambda k: fits(encode(cut.apply(k))))
        if k is None:
            return Fitted(None, parts, True, True, min_prompt)
        parts, answer_cut_made = cut.apply(k), True
        enc = encode(parts)
    return Fitted(enc, parts, True, answer_cut_made, min_prompt)


def causal_limits(max_len: int) -> Tuple[Callable, Callable]:
    """``fits`` and ``answer_share`` for a decoder: prompt and answer share one window."""
    return (lambda enc: len(enc.input_ids) <= max_len,
            lambda enc: max(max_len - enc.prompt_len, max_len // 2))


def seq2seq_limits(max_len: int) -> Tuple[Callable, Callable]:
    """``fits`` and ``answer_share`` for an encoder-decoder: the input and the target each get the window."""
    return (lambda enc: enc.prompt_len <= max_len and enc.answer_len <= max_len, lambda enc: max_len)
