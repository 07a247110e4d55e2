"""Training data order: a row-keyed shuffle (removing rows leaves the others' order unchanged) and
length-grouped batches (rows of similar length share a batch, so padding is a few percent)."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections import Counter
from typing import Callable, Iterator, List, Optional, Sequence

# Rows are grouped inside windows of this many batches: wide enough that most batches hold rows of nearly
# equal length, narrow enough that each epoch's batches still mix rows from the whole split.
WINDOW_BATCHES = 50


def row_keys(row_hashes: Sequence[str]) -> List[str]:
    """Each row's ordering key: its content hash and its occurrence among identical rows (duplicates stay distinct)."""
    seen: Counter = Counter()
    keys = []
    for h in row_hashes:
        keys.append(f"{h}#{seen[h]}")
        seen[h] += 1
    return keys


def keyed_order(keys: Sequence[str], seed: int) -> List[int]:
    """A permutation of ``range(len(keys))`` that sorts rows by ``sha256(seed, key)``.

    A row's place depends only on its own key and the seed, so a dataset with some rows removed is
    ordered exactly as the full one with those rows deleted, and the file order of the rows does not
    matter: two attribution arms at the same seed see the same sequence of shared rows (paired arms).
    """
    prefix = f"verifily-order/{int(seed)}/".encode()
    priority = [hashlib.sha256(prefix + k.encode("utf-8")).digest() for k in keys]
    return sorted(range(len(keys)), key=priority.__getitem__)


def length_grouped_order(lengths: Sequence[int], batch_size: int, seed: int,
                         keys: Optional[Sequence[str]] = None) -> List[int]:
    """A permutation of ``range(len(lengths))`` whose consecutive ``batch_size`` chunks hold similar lengths.

    Shuffle, sort by length inside windows of ``WINDOW_BATCHES`` batches, cut into batches, then shuffle
    the full batches (a short last batch stays last): unlike transformers' LengthGroupedSampler the epoch does not run longest-to-shortest, and
    the order depends only on (lengths, batch_size, seed), so a resumed run sees the same batches.
    """
    import torch

    generator = torch.Generator()
    generator.manual_seed(seed)
    order = keyed_order(keys, seed) if keys is not None else torch.randperm(len(lengths), generator=generator).tolist()
    window = max(batch_size, batch_size * WINDOW_BATCHES)
    batches: List[List[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i], reverse=True)
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    # only the last window can end in a short batch; it stays last so the loader's cuts match these batches
    full = len(batches) - (1 if batches and len(batches[-1]) < batch_size else 0)
    shuffled = torch.randperm(full, generator=generator).tolist() + list(range(full, len(batches)))
    return [i for b in shuffled for i in batches[b]]


def padding_fraction(lengths: Sequence[int], order: Sequence[int], batch_size: int,
                     groups: Optional[Callable[[List[int]], List[List[int]]]] = None) -> float:
    """Share of the computed positions that are padding when batches are cut from ``order``.

    ``groups(batch lengths)``: how the loss splits each batch into sub-batches (lists of positions in the
    batch), each padded to its own longest row; None: every batch runs whole.
    """
    real = padded = 0
    for start in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[start:start + batch_size]]
        parts = groups(batch) if groups is not None else [list(range(len(batch)))]
        real += sum(batch)
        padded += sum(max(batch[i] for i in part) * len(part) for part in parts)
    return 1.0 - real / padded if padded else 0.0


class _EpochSampler(ABC):
    """A torch Sampler whose order is a function of ``seed + epoch`` (so a resumed run sees the same batches)."""

    def __init__(self, size: int, seed: int):
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer before each epoch (and on resume, with the resumed epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        return iter(self.order(self.seed + self.epoch))

    @abstractmethod
    def order(self, seed: int) -> List[int]:
        """This sampler's permutation of the rows for one epoch's seed."""


class KeyedOrderSampler(_EpochSampler):
    """Rows in :func:`keyed_order`, reshuffled per epoch (the default training order)."""

    def __init__(self, keys: Sequence[str], seed: int):
        super().__init__(len(keys), seed)
        self.keys = list(keys)

    def order(self, seed: int) -> List[int]:
        return keyed_order(self.keys, seed)


class LengthGroupedSampler(_EpochSampler):
    """Rows in :func:`length_grouped_order`, reshuffled per epoch."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, keys: Optional[Sequence[str]] = None):
        super().__init__(len(lengths), seed)
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.keys = list(keys) if keys is not None else None

    def order(self, seed: int) -> List[int]:
        return length_grouped_order(self.lengths, self.batch_size, seed, self.keys)
