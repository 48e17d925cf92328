"""Sampling with the active experts folded into the weights (``nrem.merged_sampling``).

A decode step of a model with LoRA experts runs, for every adapted projection and active
expert, two skinny matrix products (``x A^T``, then ``B``) and an add. At decode batch sizes
each is a kernel at its latency floor: on the H200, 0.6B at 16 rows, 6 of a block's 13
matrix products, about 0.7 ms of a 3 ms graphed step. While the learner samples, the
weights stay fixed. So :meth:`MergedWeights.on` does three things:

* it writes each adapted weight ``W``, plus the active experts' deltas (PEFT's
  ``get_delta_weight``: scaling and the fan-in/fan-out layouts), into a buffer;
* it switches the LoRA layers off and puts the buffers in place of the weights;
* on exit, the weights and the active experts come back.

The buffers are allocated once, so their addresses stay fixed for the CUDA-graph decode
step. They cost one copy of the adapted weights' memory. The merged weights are rounded
once to the model's dtype. In float32 the logits equal the LoRA path's within 1e-5
(``tests/test_merged_sampling.py``).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn


def _mergeable(layer) -> bool:
    base = getattr(layer, "base_layer", None)
    return (isinstance(base, (nn.Linear, nn.Embedding)) or type(base).__name__ == "Conv1D") \
        and hasattr(layer, "get_delta_weight")


class MergedWeights:
    """``with MergedWeights(bank).on(): ...``: the model with its active experts merged, LoRA off."""

    def __init__(self, bank):
        layers = bank._lora_layers()
        bad = sorted({type(getattr(m, "base_layer", m)).__name__ for m in layers if not _mergeable(m)})
        if bad:
            raise ValueError(f"nrem.merged_sampling cannot merge experts into {bad} layers; set it false")
        self.bank, self.layers = bank, layers
        self.bufs: Optional[list[nn.Parameter]] = None

    @contextlib.contextmanager
    def on(self) -> Iterator[None]:
        active = [list(layer.active_adapters) for layer in self.layers]
        if self.bufs is None:
            self.bufs = [nn.Parameter(torch.empty_like(m.base_layer.weight), requires_grad=False)
                         for m in self.layers]
        originals = []
        with torch.no_grad():
            for layer, names, buf in zip(self.layers, active, self.bufs):
                buf.copy_(layer.base_layer.weight)
                for name in names:
                    if name in layer.lora_A or name in getattr(layer, "lora_embedding_A", {}):
                        buf.add_(layer.get_delta_weight(name).to(buf.dtype))
                originals.append(layer.base_layer.weight)
                layer.base_layer.weight = buf
        try:
            with self.bank._switched([]):
                yield
        finally:
            for layer, weight in zip(self.layers, originals):
                layer.base_layer.weight = weight
