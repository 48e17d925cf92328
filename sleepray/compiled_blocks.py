"""Compiled pieces of a causal LM's decoder blocks for NREM's forward and backward passes.

NREM's student and teacher passes run a few thousand tokens a step (16 rows of ~70): on a
GPU they are bound by kernel launches and Python, not arithmetic. ``torch.compile`` fuses a
block's norms, its MLP with the LoRA layers in it (casts, scaling, adds) and its activation
into a few kernels. What is compiled is every piece of a decoder block that does not touch
the KV cache: the block's children other than its attention, and the attention's own
children that are not projections (Qwen3's q/k norms). Attention with the teacher's cached
episode context stays eager (a cache indexed by the layer's number would recompile once
per layer).

Every block's pieces run the same code, so they share compiled graphs (PyTorch's regional
compilation: compile time is one block's, not the model's). The compiled calls are on only
inside :meth:`CompiledBlocks.on` (the scorer's passes); sampling keeps its own path (the
CUDA-graph decode records eager kernels).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Optional

import torch
from torch import nn

log = logging.getLogger(__name__)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The longest ``nn.ModuleList`` in ``model``: its stack of decoder blocks."""
    best: Optional[nn.ModuleList] = None
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) and (best is None or len(m) > len(best)):
            best = m
    if best is None:
        raise ValueError(f"{type(model).__name__} has no list of decoder blocks")
    return best


def _touches_cache(m: nn.Module) -> bool:
    return any(hasattr(x, "layer_idx") for x in m.modules())


def _is_projection(m: nn.Module) -> bool:
    """A linear layer, bare or wrapped by PEFT (whose LoRA factors are ``lora_A``/``lora_B``)."""
    return isinstance(m, nn.Linear) or hasattr(m, "base_layer")


def compile_targets(model: nn.Module) -> list[nn.Module]:
    """The pieces of every decoder block :class:`CompiledBlocks` compiles."""
    out: list[nn.Module] = []
    for layer in decoder_layers(model):
        for child in layer.children():
            if not _touches_cache(child):
                out.append(child)
                continue
            out += [g for g in child.children()
                    if not _is_projection(g) and not _touches_cache(g) and any(True for _ in g.parameters())]
    return out


class CompiledBlocks:
    """``with blocks.on(): ...``: the pieces of :func:`compile_targets` run compiled (``backend``:
    torch.compile's, "inductor" by default; "aot_eager" traces without generating kernels)."""

    def __init__(self, model: nn.Module, backend: str = "inductor"):
        self.targets = compile_targets(model)
        # each piece's own forward (one code object per block class: a norm's and an MLP's
        # graphs do not crowd one cache); the few shapes and modes NREM runs fit the limit
        lim = getattr(torch._dynamo.config, "recompile_limit", None)
        if lim is not None and lim < 32:
            torch._dynamo.config.recompile_limit = 32
        self.compiled = [torch.compile(m.forward, backend=backend) for m in self.targets]
        self._depth = 0
        log.info("NREM: %d pieces of %d decoder blocks compiled (%s)", len(self.targets),
                 len(decoder_layers(model)), backend)

    @contextlib.contextmanager
    def on(self) -> Iterator[None]:
        self._depth += 1
        if self._depth == 1:
            for m, c in zip(self.targets, self.compiled):
                m._compiled_call_impl = c
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                for m in self.targets:
                    m._compiled_call_impl = None
