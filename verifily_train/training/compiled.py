"""``training.compile``: ``torch.compile`` of the model's repeated decoder block (regional compilation).

A LoRA step on a small model on a GPU is bound by the host: every adapted linear layer launches its own
handful of kernels (dropout, A, B, the add), every norm, rotary embedding and activation a few more, and
each launch costs microseconds of Python and driver time while the GPU finishes the work in less
(docs/benchmarks.md, GPU). Compiling the decoder block fuses its elementwise work into a few generated
kernels and runs the block's Python once per trace instead of once per call.

Only the block is compiled, not the whole model: the blocks are instances of one class, so with
PyTorch's default ``inline_inbuilt_nn_modules`` one compiled graph serves all of them (the parameters
are inputs), and compile time is that of one block, not of the stacked model. ``dynamic=True`` marks
the batch and sequence sizes symbolic from the first call, so the varying padded lengths of dynamic
padding reuse the same graph instead of recompiling per length. Each block is compiled in place
(``nn.Module.compile``): parameter names, and so the saved adapter, are unchanged. (accelerate's
``compile_regions`` does the same search but wraps each block in a new ``OptimizedModule``, whose
``_orig_mod.`` prefix would change every saved key: hence this module.)

The first block's input is the frozen embeddings' output, which needs no gradient, while every later
block's input does: two graphs where one would do (a guard on ``requires_grad``). So the embeddings'
output is marked as needing one (transformers' ``enable_input_require_grads``, as gradient checkpointing
does): the first block's backward then also computes a gradient for its input, a few small products
against a second cold compile.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from typing import List

from verifily_train.errors import EnvironmentProblem

BACKEND = "inductor"  # torch.compile's default; the tests trace with "aot_eager" (no code generation)


def check_compile_support(device: str) -> None:
    """Refuse ``training.compile`` before any work where its code generator cannot run (one line, the key named).

    Inductor writes C++ for a CPU (it needs a C++ compiler) and Triton kernels for a CUDA GPU (it needs
    the ``triton`` package); without them the first training step would fail after the model is loaded.
    """
    if device == "cuda" and importlib.util.find_spec("triton") is None:
        raise EnvironmentProblem(None, "training.compile", "compiling for a CUDA GPU needs Triton: pip install "
                                                           "triton, or set training.compile: false")
    if device == "cpu":
        compilers = [os.environ.get("CXX"), "g++", "clang++", "c++"]
        if not any(shutil.which(c) for c in compilers if c):
            raise EnvironmentProblem(None, "training.compile", "compiling for the CPU needs a C++ compiler "
                                                               "(g++ or clang++) on PATH, or set training.compile: false")


def repeated_blocks(model) -> List:
    """Every block of every outermost ``nn.ModuleList`` whose entries (two or more, with parameters) share one class.

    A decoder-only model has one such list (its layers); an encoder-decoder has two (T5's encoder and
    decoder blocks, one graph each). Lists inside a chosen block (a mixture of experts, say) are left to
    the block's graph.
    """
    import torch

    chosen: List[str] = []
    blocks: List = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in chosen):
            continue
        if (isinstance(module, torch.nn.ModuleList) and len(module) >= 2 and len({type(c) for c in module}) == 1
                and all(any(True for _ in child.parameters()) for child in module)):
            chosen.append(name)
            blocks.extend(module)
    return blocks


def compile_repeated_blocks(model, dynamic: bool = True, backend: str = None) -> int:
    """Compile each repeated block in place; returns how many (0 when the model has none)."""
    blocks = repeated_blocks(model)
    if blocks and hasattr(model, "enable_input_require_grads"):
        try:
            model.enable_input_require_grads()
        except NotImplementedError:  # a model without input embeddings: one more graph, nothing worse
            pass
    for block in blocks:
        block.compile(dynamic=dynamic, backend=backend or BACKEND)
    return len(blocks)
