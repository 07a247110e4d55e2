"""Attach a LoRA adapter (PEFT) to a base model, or leave every weight trainable when LoRA is off."""

from __future__ import annotations

import contextlib
import contextvars
import functools

from verifily_train.config.schema import LoraSection
from verifily_train.errors import ConfigError
from verifily_train.model.last_layer import selected_rows
from verifily_train.model.loading import KIND_CAUSAL, KIND_SEQ2SEQ, ModelSpec
from verifily_train.model.registry import family


def resolve_target_modules(lora: LoraSection, spec: ModelSpec):
    """``auto``: the family's targets (model/registry.py), else PEFT's mapping for the model type, else every
    linear layer except the output head."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as MAPPING

    if lora.target_modules != "auto":
        return lora.target_modules
    targets = family(spec.model_type).lora_targets
    if targets is not None:
        return list(targets)
    return list(MAPPING[spec.model_type]) if spec.model_type in MAPPING else "all-linear"


def build_adapter(model, lora: LoraSection, spec: ModelSpec):
    """Wrap ``model`` with LoRA; for classification PEFT keeps the head trainable (modules_to_save)."""
    from peft import LoraConfig, TaskType, get_peft_model

    task_type = {KIND_CAUSAL: TaskType.CAUSAL_LM, KIND_SEQ2SEQ: TaskType.SEQ_2_SEQ_LM}.get(spec.kind, TaskType.SEQ_CLS)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=resolve_target_modules(lora, spec), task_type=task_type)
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise ConfigError(None, "lora.target_modules", str(err).splitlines()[0]) from err


def store_frozen_linears_in(model, dtype) -> int:
    """Keep frozen linear layers' weights in ``dtype``, the autocast dtype; returns how many were converted.

    Under autocast a linear layer's fp32 weight is cast to bf16 on every forward, and autocast caches only
    casts of weights that require grad: with LoRA that is every frozen weight, every step (on a GPU a large
    share of a small model's step, in copies and in their launches; docs/models.md, "Speed levers"). Storing them in ``dtype`` gives the matrix products the very same operands (the same
    round-to-nearest cast, done once), so the loss and gradients are unchanged. Weights shared with the
    input embeddings stay fp32: the embedding output is not autocast and feeds the residual stream.
    """
    import torch

    embeddings = model.get_input_embeddings()
    tied = {id(p) for p in embeddings.parameters()} if embeddings is not None else set()
    count = 0
    for module in model.modules():
        if (isinstance(module, torch.nn.Linear) and module.weight.dtype != dtype and not module.weight.requires_grad
                and id(module.weight) not in tied and (module.bias is None or not module.bias.requires_grad)):
            module.to(dtype)
            count += 1
    return count


# the number of real tokens at the head of a packed sequence whose tail is bucket padding (training.loss)
_REAL_ROWS: contextvars.ContextVar = contextvars.ContextVar("verifily_real_rows", default=None)


@contextlib.contextmanager
def real_rows(count):
    """While a packed forward runs: its first ``count`` tokens are real, the rest padding (None: all real).

    :class:`BernoulliDropout` draws bits for the real tokens only, so padding a batch leaves every mask and
    the random stream as they are without it.
    """
    token = _REAL_ROWS.set(count)
    try:
        yield
    finally:
        _REAL_ROWS.reset(token)


@functools.lru_cache(maxsize=None)
def _dropout_class():
    import torch

    class BernoulliDropout(torch.nn.Module):
        """``nn.Dropout`` whose keep-mask is drawn from 16 random bits per element instead of one Bernoulli draw.

        PyTorch's CPU dropout draws each element's mask with ``bernoulli_``, one slow draw an element, and
        LoRA applies a fresh dropout to the input of every adapted layer, so a CPU LoRA step spends a
        visible share of its time there (docs/models.md, "Speed levers"). Here one ``random_`` on int64
        words gives four 16-bit uniforms per word; an element is kept when its uniform is at least
        ``p`` x 65536. The drop probability is ``p`` rounded to a multiple of 1/65536 (off by under
        8e-6) and kept elements are scaled by 1/(1 - that p), so the expectation is exact. The bits come
        from torch's default generator: seeded runs repeat bit for bit. Same distribution, other masks
        than ``nn.Dropout``'s for the same seed.
        """

        def __init__(self, p: float):
            super().__init__()
            self.threshold = int(round(p * 65536))
            self.p = self.threshold / 65536
            self.scale = 1.0 / (1.0 - self.p) if self.p < 1 else 0.0

        # inside a sub-forward over some rows of a packed sequence (model/last_layer.py), the mask is drawn
        # for every row and the computed rows' part kept: the random stream is the whole layer's
        follows_selected_rows = True

        def forward(self, x):
            if not self.training or self.threshold == 0:
                return x
            rows, real = selected_rows(), _REAL_ROWS.get()
            select = padding = None
            if x.dim() == 3 and x.shape[0] == 1:  # a packed sequence (training.loss)
                live = real if real is not None and x.shape[1] > real else x.shape[1]
                padding = x.shape[1] - live or None  # bucket padding at the tail: no bits drawn for it
                if rows is not None and rows[1].shape[0] == live:  # the computed rows of a longer sequence
                    whole, select = rows
                n = (whole if select is not None else live) * x.shape[-1]
            else:
                n = x.numel()
            words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-2 ** 63, None)
            uniform16 = words.view(torch.int16)[:n]  # signed: -32768..32767
            if select is not None:
                uniform16 = uniform16.view(whole, x.shape[-1]).index_select(0, select)
            if padding is not None:  # the padding rows' mask: drop (their output is never read)
                uniform16 = torch.cat([uniform16.view(-1, x.shape[-1]),
                                       uniform16.new_full((padding, x.shape[-1]), -32768)])
            keep = uniform16.view(x.shape) >= self.threshold - 32768
            return x * keep.to(x.dtype).mul_(self.scale)

        def extra_repr(self) -> str:
            return f"p={self.p}"

    return BernoulliDropout


def use_cheap_dropout(model) -> int:
    """Swap PEFT's LoRA ``nn.Dropout`` modules for :class:`BernoulliDropout` (CPU training); returns how many."""
    import torch

    cls = _dropout_class()
    count = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict):
            for name, layer in list(dropouts.items()):
                if type(layer) is torch.nn.Dropout and layer.p > 0:
                    dropouts[name] = cls(layer.p)
                    count += 1
    return count


def _fused_lora_forward(self, x, *args, **kwargs):
    """PEFT's vanilla LoRA forward with the adapter's output added inside one ``addmm``.

    PEFT computes ``result + lora_B(lora_A(dropout(x))) * scaling``: after B's product, one pass over
    the layer's output to scale it and one to add it (and their backward). Here the scaling goes into
    B's (rank x out) weight and the add into the product: ``addmm(result, h, (scaling * B)^T)``, the
    same sum in exact arithmetic (rounding may differ in the last bits). Anything but one plain
    adapter (merged, disabled, mixed batches, variants such as DoRA, a bias on B) takes PEFT's forward.
    """
    import torch

    adapters = self.active_adapters
    if (self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None or len(adapters) != 1
            or adapters[0] in self.lora_variant or adapters[0] not in self.lora_A
            or self.lora_B[adapters[0]].bias is not None):
        return type(self).forward(self, x, *args, **kwargs)
    from peft.tuners.lora.layer import VARIANT_KWARG_KEYS

    self._check_forward_args(x, *args, **kwargs)
    kwargs.pop("adapter_names", None)
    for key in VARIANT_KWARG_KEYS:  # PEFT keeps these from the base layer too
        kwargs.pop(key, None)
    name = adapters[0]
    result = self.base_layer(x, *args, **kwargs)
    lora_a, lora_b = self.lora_A[name], self.lora_B[name]
    h = lora_a(self.lora_dropout[name](self._cast_input_dtype(x, lora_a.weight.dtype)))
    out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]),
                      lora_b.weight.t() * self.scaling[name])
    return out.view(result.shape).to(result.dtype)


def use_fused_lora_output(model) -> int:
    """Give PEFT's plain ``lora.Linear`` layers :func:`_fused_lora_forward`; returns how many."""
    import types

    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:  # no PEFT: nothing to fuse
        return 0
    import torch

    count = 0
    for module in model.modules():
        if type(module) is LoraLinear and type(module.base_layer) is torch.nn.Linear:
            module.forward = types.MethodType(_fused_lora_forward, module)
            count += 1
    return count


def count_parameters(model) -> tuple:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
