"""Compiled decoder blocks for NREM's forward and backward passes (``nrem.compile_blocks``).

NREM's student and teacher passes run a few thousand tokens a step (16 rows of ~70): on a
GPU they are bound by Python and kernel launches, not arithmetic (the H200 profile: the
student's forward takes as long at 64 rows as at 16). ``torch.compile`` of each decoder
block makes it one call of fused kernels: its norms, attention projections, rotary
embedding, MLP with the LoRA layers in it (casts, scaling, adds) and residual adds.

Every block runs the same code, so all share the compiled graphs (PyTorch's regional
compilation: compile time is one block's, not the model's). A block is compiled whole only
for passes without a KV cache (the student, the anchor): the teacher's pass after its
cached episode context indexes the cache by the block's number, which would compile once
per block, so it stays eager. The compiled calls are on only inside
:meth:`CompiledBlocks.on`; sampling keeps its own path (the CUDA-graph decode).
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


def switched_on(switch, on) -> bool:
    """A learner speed switch (``nrem.compile_blocks`` and the like) that is true, or "auto" with
    ``on`` (a model, or a tensor) on a GPU."""
    where = on if isinstance(on, torch.Tensor) else next(on.parameters())
    return switch is True or (switch == "auto" and where.is_cuda)


def graph_length(n: int, pad: int) -> int:
    """The length ``n`` tokens are right-padded to for a pass replayed from CUDA graphs (one graph
    per length): a multiple of ``pad``, or of a quarter of the largest power of two <= ``n`` where
    that is larger. So at most four lengths an octave above ``4 * pad``, and the padding is under a
    quarter of ``n`` (under ``pad`` below it): 73 -> 80 with ``pad`` 16, 300 -> 320, 600 -> 640."""
    if n < 1 or pad < 1:
        raise ValueError(f"graph_length needs n >= 1 and pad >= 1, got {n}, {pad}")
    step = max(pad, 1 << max(0, n.bit_length() - 3))
    return -(-n // step) * step


def allow_recompiles(n: int = 32) -> None:
    """torch.compile's recompile limit raised to at least ``n``: the modes (gradient or not, teacher
    or student adapters) and shapes the learner's compiled calls meet."""
    if torch._dynamo.config.recompile_limit < n:
        torch._dynamo.config.recompile_limit = n


def compile_once(model: nn.Module, name: str, fn, **kwargs):
    """``torch.compile(fn, **kwargs)``, made the first time and kept on ``model`` as ``name``."""
    compiled = getattr(model, name, None)
    if compiled is None:
        allow_recompiles()
        compiled = torch.compile(fn, **kwargs)
        object.__setattr__(model, name, compiled)
    return compiled


def repeat_call(fn):
    """``fn`` (a compiled function) with torch.compile checking only the guards that tell its
    graphs apart (``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``), for calls that repeat
    one just made with every guard checked: the same shapes, modes and kinds of weights. On a
    PEFT model with eight expert slots a full check is ~1 ms of host time a call (the H200
    profile), more than a decode step's kernels."""
    def call(*a, **k):
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
            return fn(*a, **k)
    return call


class CompiledBlocks:
    """``with blocks.on(): ...``: the decoder blocks run compiled, for passes without a KV cache
    (``backend``: torch.compile's, "inductor" by default; "aot_eager" traces without generating
    kernels). ``fast_guards``: blocks after the second skip the guards that do not tell graphs
    apart (:func:`repeat_call`); the first has an input without gradient, the second checks
    every guard, and the rest repeat it. ``graphs``: each block's forward and backward replayed
    from CUDA graphs (inductor's "reduce-overhead": PyTorch's CUDA graph trees record one graph
    per block, shape and gradient mode; a step begins with :func:`begin_step`)."""

    def __init__(self, model: nn.Module, backend: str = "inductor", fast_guards: bool = False,
                 graphs: bool = False):
        self.targets, self.backend, self.fast_guards = list(decoder_layers(model)), backend, fast_guards
        self.graphs = graphs
        allow_recompiles()
        mode = {"mode": "reduce-overhead"} if graphs else {}
        # the block's own forward: its graphs do not crowd the cache of nn.Module's call
        self.compiled = [torch.compile(m.forward, backend=backend, **mode) for m in self.targets]
        if fast_guards:
            self.compiled = self.compiled[:2] + [repeat_call(c) for c in self.compiled[2:]]
        self._depth = 0
        log.info("NREM: %d decoder blocks compiled (%s%s)", len(self.targets), backend,
                 ", CUDA graphs" if graphs else "")

    def begin_step(self) -> None:
        """A new training step: the CUDA graphs' outputs of the last one may be overwritten."""
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()

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
