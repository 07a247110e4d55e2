"""Length-grouped training batches: rows of similar length share a batch, so padding is a few percent."""

from __future__ import annotations

from typing import Iterator, List, Sequence

# Rows are grouped inside windows of this many batches: wide enough that most batches hold rows of nearly
# equal length, narrow enough that each epoch's batches still mix rows from the whole split.
WINDOW_BATCHES = 50


def length_grouped_order(lengths: Sequence[int], batch_size: int, seed: int) -> List[int]:
    """A permutation of ``range(len(lengths))`` whose consecutive ``batch_size`` chunks hold similar lengths.

    Shuffle, sort by length inside windows of ``WINDOW_BATCHES`` batches, cut into batches, then shuffle
    the full batches (a short last batch stays last): unlike transformers' LengthGroupedSampler the epoch does not run longest-to-shortest, and
    the order depends only on (lengths, batch_size, seed), so a resumed run sees the same batches.
    """
    import torch

    generator = torch.Generator()
    generator.manual_seed(seed)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    window = max(batch_size, batch_size * WINDOW_BATCHES)
    batches: List[List[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i], reverse=True)
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    # only the last window can end in a short batch; it stays last so the loader's cuts match these batches
    full = len(batches) - (1 if batches and len(batches[-1]) < batch_size else 0)
    shuffled = torch.randperm(full, generator=generator).tolist() + list(range(full, len(batches)))
    return [i for b in shuffled for i in batches[b]]


def padding_fraction(lengths: Sequence[int], order: Sequence[int], batch_size: int) -> float:
    """Share of the padded positions that are padding when batches are cut from ``order``."""
    real = padded = 0
    for start in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[start:start + batch_size]]
        real += sum(batch)
        padded += max(batch) * len(batch)
    return 1.0 - real / padded if padded else 0.0


class LengthGroupedSampler:
    """A torch Sampler over :func:`length_grouped_order`, reshuffled per epoch from ``seed + epoch``."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer before each epoch (and on resume, with the resumed epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        return iter(length_grouped_order(self.lengths, self.batch_size, self.seed + self.epoch))
