"""Per-row gradients of the trainable parameters, and the seeded random projection that keeps them small.

Fast path (LoRA, a linear head): every trainable parameter belongs to an ``nn.Linear``, whose per-row
weight gradient is ``sum_t g_t x_t^T`` over the row's positions (the layer's output gradient times its
input, Opacus-style). One batched forward and backward then gives each row's exact gradient, since rows
of a batch never interact (padding is masked out of attention and loss). Anything else (a full
fine-tune's embeddings and norms) takes one backward per row.
"""

from __future__ import annotations

import hashlib
from typing import Dict, List

from verifily_train.attribution.rows.runtime import ScoringModel, row_losses

PROJECTION_BLOCK = 1 << 16  # rows of the projection matrix drawn per generator: memory stays bounded
PROJECTION_CACHE_BYTES = 512 << 20  # keep the drawn matrix when it fits, else draw it again per batch


class PerRowGradients:
    """Computes a batch's per-row gradients, flattened in the scoring model's (sorted) parameter order."""

    def __init__(self, scoring: ScoringModel):
        import torch

        self.scoring = scoring
        self.offsets: Dict[int, tuple] = {}
        start = 0
        for p in scoring.params:
            self.offsets[id(p)] = (start, p.numel())
            start += p.numel()
        self.size = start
        trainable = {id(p) for p in scoring.params}
        self.linears = [m for m in scoring.model.modules() if isinstance(m, torch.nn.Linear)
                        and any(id(q) in trainable for q in m.parameters(recurse=False))]
        covered = {id(q) for m in self.linears for q in m.parameters(recurse=False) if id(q) in trainable}
        self.uses_hooks = covered == trainable

    def __call__(self, batch: dict, normalizer: float):
        """(grads (rows, P), per-row loss sum, per-row token count, logits or None) for one collated batch."""
        if self.uses_hooks:
            return self._hooked(batch, normalizer)
        return self._looped(batch, normalizer)

    def _hooked(self, batch: dict, normalizer: float):
        import torch

        calls: Dict[torch.nn.Module, list] = {m: [] for m in self.linears}

        def forward_hook(module, inputs, output):
            slot = [inputs[0].detach(), None]
            calls[module].append(slot)
            if output.requires_grad:
                output.register_hook(lambda grad: slot.__setitem__(1, grad.detach()))

        handles = [m.register_forward_hook(forward_hook) for m in self.linears]
        try:
            loss_sum, count, logits = row_losses(self.scoring, batch)
            torch.autograd.grad((loss_sum / normalizer).sum(), self.scoring.params, allow_unused=True)
        finally:
            for handle in handles:
                handle.remove()
        rows = loss_sum.shape[0]
        flat = torch.zeros(rows, self.size)
        for module, slots in calls.items():
            for x, g in slots:
                if g is None:  # this call did not reach the loss
                    continue
                x3, g3 = x.reshape(rows, -1, x.shape[-1]).float(), g.reshape(rows, -1, g.shape[-1]).float()
                self._add(flat, module.weight, lambda: torch.einsum("bto,bti->boi", g3, x3))
                if module.bias is not None:
                    self._add(flat, module.bias, lambda: g3.sum(dim=1))
        return flat, loss_sum.detach(), count.detach(), None if logits is None else logits.detach()

    def _add(self, flat, param, compute) -> None:
        if id(param) in self.offsets:
            start, n = self.offsets[id(param)]
            flat[:, start:start + n] += compute().reshape(flat.shape[0], n)

    def _looped(self, batch: dict, normalizer: float):
        import torch

        rows = batch["input_ids"].shape[0]
        flat = torch.zeros(rows, self.size)
        sums, counts, logits_out = [], [], []
        for i in range(rows):
            one = {k: v[i:i + 1] for k, v in batch.items()}
            if "attention_mask" in one:  # cut the row's own padding (the batch's longest row set the width)
                width = int(one["attention_mask"].sum())
                one = {k: (v[:, :width] if k in ("input_ids", "attention_mask") or (
                    k == "labels" and v.dim() == 2 and v.shape[1] == batch["input_ids"].shape[1]) else v)
                       for k, v in one.items()}
            loss_sum, count, logits = row_losses(self.scoring, one)
            grads = torch.autograd.grad((loss_sum / normalizer).sum(), self.scoring.params, allow_unused=True)
            flat[i] = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                                 for g, p in zip(grads, self.scoring.params)])
            sums.append(loss_sum.detach())
            counts.append(count.detach())
            if logits is not None:
                logits_out.append(logits.detach())
        return flat, torch.cat(sums), torch.cat(counts), torch.cat(logits_out) if logits_out else None


def summed_gradient(scoring: ScoringModel, loss):
    """The gradient of a scalar ``loss`` over the trainable parameters, flattened (zeros where unused)."""
    import torch

    grads = torch.autograd.grad(loss, scoring.params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                      for g, p in zip(grads, scoring.params)])


class Projection:
    """``x -> x R``, R (P, dim) drawn per parameter (and block) from the seed alone; ``dim`` 0 is the identity.

    Dense Rademacher / sqrt(dim) (TRAK, LESS) when R fits in ``cache_bytes``; above that a sparse sign
    projection (CountSketch: each weight adds +-1 x its value to one seeded bucket), which estimates inner
    products without bias at the same variance for spread-out gradients, in O(P) memory and time. Drawing a
    dense R again per batch cost 22 s per batch at SmolLM2's 0.92M LoRA weights. The same seed and names
    give the same R in every process and shard, whatever the batch.
    """

    def __init__(self, names: List[str], numels: List[int], dim: int, seed: int,
                 cache_bytes: int = PROJECTION_CACHE_BYTES):
        self.dim, self.seed = dim, seed
        self.blocks = []  # (start, n, name, block index)
        start = 0
        for name, n in zip(names, numels):
            for b, offset in enumerate(range(0, n, PROJECTION_BLOCK)):
                self.blocks.append((start + offset, min(PROJECTION_BLOCK, n - offset), name, b))
            start += n
        self.size = start
        self.kind = "identity" if not dim else ("rademacher" if start * dim * 4 <= cache_bytes else "sparse-sign")
        self.cache: dict = {}

    def _generator(self, name: str, index: int, kind: str):
        import torch

        digest = hashlib.sha256(f"verifily-rows-projection/{kind}/{self.seed}/{name}/{index}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))

    def _block(self, start: int, n: int, name: str, index: int):
        import torch

        key = (start, n)
        if key not in self.cache:
            generator = self._generator(name, index, self.kind)
            if self.kind == "rademacher":
                signs = torch.randint(0, 2, (n, self.dim), generator=generator, dtype=torch.int8)
                self.cache[key] = (signs.float() * 2 - 1) / self.dim ** 0.5
            else:
                buckets = torch.randint(0, self.dim, (n,), generator=generator)
                signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.int8).float() * 2 - 1
                self.cache[key] = (buckets, signs)
        return self.cache[key]

    def __call__(self, flat):
        """Project a (rows, P) tensor to (rows, dim) (float64 accumulation: shards agree to rounding)."""
        import torch

        if not self.dim:
            return flat.double()
        out = torch.zeros(flat.shape[0], self.dim, dtype=torch.float64)
        for start, n, name, index in self.blocks:
            block = self._block(start, n, name, index)
            if self.kind == "rademacher":
                out += (flat[:, start:start + n] @ block).double()
            else:
                buckets, signs = block
                out.index_add_(1, buckets, (flat[:, start:start + n] * signs).double())
        return out
