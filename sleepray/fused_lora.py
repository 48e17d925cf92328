"""LoRA layers whose adapters add inside the base layer's matrix product (``experts.fused_lora``).

PEFT's LoRA ``Linear`` computes ``base(x) + lora_B(lora_A(x)) * scaling``: after the base
product, three more passes over the layer's whole output (write B's product, scale it, add
it), and in the backward pass one to scale the gradient and one to add the adapter's part of
the input's gradient to the base's. On the MLP projections of a 1.7B model at 8,192 tokens
that is about 2 GB of memory traffic a block, 50 GB a step (a tenth of the bare loop's
time on an H200). Here the same sums are one autograd function (what unsloth's LoRA
kernels do):

* forward: ``y = x W^T``, then for each active adapter ``y += scaling (x A^T) B^T`` as
  cuBLAS's ``addmm_`` (the adapter's product accumulated into ``y`` in the GEMM's epilogue);
* backward: ``dx = dy W``, then ``dx += (scaling dy B) A`` the same way; ``dA`` and ``dB``
  from the rank-r products (``dy B`` and ``x A^T``, saved from the forward), ``dW`` and the
  bias's gradient only when the base trains.

:func:`install` puts :func:`fused_forward` on every PEFT LoRA ``Linear`` of a model, on the
instance (PEFT's class is untouched). A call takes the fused path only where it computes
what PEFT would: adapters not disabled or merged, plain LoRA (no DoRA or other variant, no
LoRA bias, no dropout while training), no ``adapter_names`` or other arguments, the input,
base weight and adapter weights of one dtype, no autocast, no hooks on the base layer or the
adapters, and (``only_cuda``) the input on a GPU; anything else runs PEFT's own forward.
Without gradients it is the same products with no autograd function around them.
"""
from __future__ import annotations

import types
from typing import Optional

import torch
from torch import nn

__all__ = ["FusedLoRALinear", "fused_forward", "install", "installed", "lora_variant", "uninstall"]

_ORIGINAL = "_sleepray_peft_forward"


def _plain(x2: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
           scalings: tuple[float, ...], ab: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``x2 W^T + bias + sum_i s_i (x2 A_i^T) B_i^T`` (2-D), and each ``x2 A_i^T``."""
    y = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
    xas = []
    for i, s in enumerate(scalings):
        xa = x2 @ ab[2 * i].t()
        y.addmm_(xa, ab[2 * i + 1].t(), alpha=s)
        xas.append(xa)
    return y, xas


class FusedLoRALinear(torch.autograd.Function):
    """``y = x W^T + b + sum_i s_i (x A_i^T) B_i^T`` over the last dimension of ``x``, with the
    gradient of every input that needs one; ``ab`` = ``A_0, B_0, A_1, B_1, ...``."""

    @staticmethod
    def forward(ctx, x, weight, bias, scalings, *ab):
        x2 = x.reshape(-1, x.shape[-1])
        y, xas = _plain(x2, weight, bias, scalings, ab)
        ctx.scalings, ctx.x_shape, ctx.has_bias = scalings, x.shape, bias is not None
        ctx.save_for_backward(x2, weight, *ab, *xas)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, weight, *rest = ctx.saved_tensors
        k = len(ctx.scalings)
        ab, xas = rest[:2 * k], rest[2 * k:]
        need = ctx.needs_input_grad
        g = dy.reshape(-1, dy.shape[-1])
        dx = g @ weight if need[0] else None
        dab: list[Optional[torch.Tensor]] = []
        for i, s in enumerate(ctx.scalings):
            A, B = ab[2 * i], ab[2 * i + 1]
            gb = None
            if need[0] or need[4 + 2 * i]:
                gb = (g @ B).mul_(s)                  # dL/d(x A^T), rank r
            dab.append(gb.t() @ x2 if need[4 + 2 * i] else None)
            dab.append((g.t() @ xas[i]).mul_(s) if need[5 + 2 * i] else None)
            if need[0]:
                dx.addmm_(gb, A)
        dw = g.t() @ x2 if need[1] else None
        db = g.sum(0) if ctx.has_bias and need[2] else None
        if dx is not None:
            dx = dx.view(ctx.x_shape)
        return (dx, dw, db, None, *dab)


def lora_variant(m, adapter: str) -> Optional[str]:
    """What keeps LoRA layer ``m``'s ``adapter`` from being plain LoRA, ``W + scaling x B A``
    (which both this module's fused layers and ``sleepray.fused_decode``'s merge compute), or None."""
    if adapter in getattr(m, "lora_variant", {}) or getattr(m, "use_dora", {}).get(adapter):
        return "a LoRA variant (DoRA and the like)"
    if (getattr(m, "lora_bias", {}).get(adapter) or m.lora_A[adapter].bias is not None
            or m.lora_B[adapter].bias is not None):
        return "a LoRA bias"
    return None


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks)


def _fusable(layer, x: torch.Tensor, args, kwargs) -> Optional[list[str]]:
    """The active adapters of ``layer`` if this call can take the fused path, else None."""
    if args or kwargs or layer.disable_adapters or layer.merged or getattr(layer, "fan_in_fan_out", False):
        return None
    base = layer.base_layer
    if type(base) is not nn.Linear or _hooked(base) or base.weight.dtype != x.dtype:
        return None
    if layer._sleepray_only_cuda and not x.is_cuda:
        return None
    if x.is_floating_point() and torch.is_autocast_enabled(x.device.type):
        return None
    names = [a for a in layer.active_adapters if a in layer.lora_A]
    for a in names:
        A, B, drop = layer.lora_A[a], layer.lora_B[a], layer.lora_dropout[a]
        if lora_variant(layer, a):
            return None
        if A.weight.dtype != x.dtype or B.weight.dtype != x.dtype or _hooked(A) or _hooked(B):
            return None
        if not isinstance(drop, nn.Identity) and (drop.training and drop.p > 0):
            return None
    return names


def fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A PEFT LoRA ``Linear``'s forward, fused where it can be (module docstring), else PEFT's."""
    names = _fusable(self, x, args, kwargs)
    if names is None:
        return getattr(self, _ORIGINAL)(x, *args, **kwargs)
    base = self.base_layer
    scalings = tuple(float(self.scaling[a]) for a in names)
    ab = tuple(t for a in names for t in (self.lora_A[a].weight, self.lora_B[a].weight))
    tensors = (x, base.weight, base.bias, *ab)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return FusedLoRALinear.apply(x, base.weight, base.bias, scalings, *ab)
    y, _ = _plain(x.reshape(-1, x.shape[-1]), base.weight, base.bias, scalings, ab)
    return y.view(*x.shape[:-1], y.shape[-1])


def _lora_linears(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora.layer import Linear
    return [m for m in model.modules() if isinstance(m, Linear)]


def install(model: nn.Module, only_cuda: bool = False) -> int:
    """:func:`fused_forward` on every PEFT LoRA ``Linear`` of ``model`` (again: only the flag is
    updated); ``only_cuda``: the fused path only for inputs on a GPU. Returns how many layers."""
    layers = _lora_linears(model)
    for m in layers:
        if _ORIGINAL not in m.__dict__:
            m.__dict__[_ORIGINAL] = m.forward
            m.forward = types.MethodType(fused_forward, m)
        m._sleepray_only_cuda = only_cuda
    return len(layers)


def installed(model: nn.Module) -> bool:
    """Whether every PEFT LoRA ``Linear`` of ``model`` (at least one) runs :func:`fused_forward`."""
    layers = _lora_linears(model)
    return bool(layers) and all(_ORIGINAL in m.__dict__ for m in layers)


def uninstall(model: nn.Module) -> None:
    """PEFT's own forward back on every LoRA ``Linear`` of ``model``."""
    for m in _lora_linears(model):
        if _ORIGINAL in m.__dict__:
            del m.__dict__["forward"]
            del m.__dict__[_ORIGINAL]
