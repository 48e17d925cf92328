"""Memory-lean NREM losses: the LM head and the loss fused, a chunk of positions at a time.

The plain path makes full-vocabulary logits for every position and then the loss
(``sleepray.losses``): at 256 rows x 64 tokens and a 152k vocabulary that is tens of GiB
before the float32 upcast. Here the inputs are the final hidden states at the positions
the loss is taken on, [N, H], and the head's weight; logits exist one chunk of positions
at a time:

* :func:`fused_jsd`: the generalized JSD (``losses.generalized_jsd``'s definition, beta = 0
  is KL(T || S), the anchor's KL) between the student's and the teacher's next-token
  distributions. Its gradient w.r.t. the logits is written in closed form and computed chunk
  by chunk during the forward pass (the loss is a scalar, so the backward is one multiply),
  so each chunk's logits are made once for the student and once for the teacher;
* :func:`fused_token_logprobs`: log p(target) at each position (LTI's policy gradient), [N];
  the backward recomputes one chunk's logits at a time.

Both are checked equal to the plain path (values and gradients) by tests/test_fused_losses.py.
"""
from __future__ import annotations

import functools
import math

import torch


def _chunks(n: int, chunk: int):
    for i in range(0, n, max(1, chunk)):
        yield i, min(n, i + chunk)


def _jsd_and_grad(s_logits: torch.Tensor, t_logits: torch.Tensor, beta: float, temperature: float):
    """Sum over rows of JSD_beta(S || T) and its gradient w.r.t. the student's logits, in closed
    form (a few passes over the [rows, V] chunk instead of autograd's dozens).

    With z = logits / temperature, S = softmax(z), M = beta T + (1 - beta) S and
    g_v = dJ/dS_v, the softmax gives dJ/dz_u = S_u (g_u - sum_v S_v g_v), where
        0 < beta < 1:  g = (1 - beta) (log S - log M)   (the M-terms cancel)
        beta = 0:      J = KL(T || S), dJ/dz = S - T
        beta = 1:      J = KL(S || T), g = log S - log T + 1 (the +1 cancels in the softmax)
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    s_logp = torch.log_softmax(s_logits.float() / temperature, -1)
    t_logp = torch.log_softmax(t_logits.float() / temperature, -1)
    s_p = s_logp.exp()
    t_p = t_logp.exp()
    if beta == 0:
        loss = (t_p * (t_logp - s_logp)).sum()
        return loss, (s_p - t_p) / temperature
    if beta == 1:
        g = s_logp - t_logp
        loss = (s_p * g).sum()
    else:
        log_m = torch.logaddexp(t_logp + math.log(beta), s_logp + math.log1p(-beta))   # no underflow
        g = s_logp - log_m
        loss = beta * (t_p * (t_logp - log_m)).sum() + (1 - beta) * (s_p * g).sum()
        g = g * (1 - beta)
    grad = s_p * (g - (s_p * g).sum(-1, keepdim=True))
    return loss, grad / temperature


def jsd_and_grad_fn(compiled: bool):
    """:func:`_jsd_and_grad`, or (``compiled``) the same compiled once per process with
    ``torch.compile`` (the number of rows dynamic): its dozen passes over the [rows, V] chunk
    fused into a few kernels."""
    return _compiled_jsd_and_grad() if compiled else _jsd_and_grad


@functools.cache
def _compiled_jsd_and_grad():
    from sleepray.compiled_blocks import allow_recompiles
    allow_recompiles()
    return torch.compile(_jsd_and_grad, dynamic=True)


class _FusedJSD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_s, h_t, weight, head, beta, temperature, chunk, fn=_jsd_and_grad):
        grad_h = torch.zeros_like(h_s) if h_s.requires_grad else None
        grad_w = torch.zeros_like(weight) if weight.requires_grad else None
        total = h_s.new_zeros((), dtype=torch.float32)
        for i, j in _chunks(h_s.shape[0], chunk):
            with torch.no_grad():
                t_logits = head(h_t[i:j])
            with torch.enable_grad():
                hs = h_s[i:j].detach().requires_grad_(grad_h is not None)
                w = weight.detach().requires_grad_(grad_w is not None)
                s_logits = head(hs, w)
                loss, g_logits = fn(s_logits.detach(), t_logits, beta, temperature)
                del t_logits
                wanted = [x for x in (hs, w) if x.requires_grad]
                grads = list(torch.autograd.grad(s_logits, wanted, g_logits.to(s_logits.dtype))) if wanted else []
            total += loss
            if grad_h is not None:
                grad_h[i:j] = grads.pop(0)
            if grad_w is not None:
                grad_w += grads.pop(0)
        ctx.save_for_backward(*(g for g in (grad_h, grad_w) if g is not None))
        ctx.has = (grad_h is not None, grad_w is not None)
        return total

    @staticmethod
    def backward(ctx, go):
        saved = list(ctx.saved_tensors)
        gh = saved.pop(0) * go if ctx.has[0] else None
        gw = saved.pop(0) * go if ctx.has[1] else None
        return gh, None, gw, None, None, None, None, None


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, head, chunk):
        out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        with torch.no_grad():
            for i, j in _chunks(h.shape[0], chunk):
                out[i:j] = _logprob(head(h[i:j]), targets[i:j])
        ctx.save_for_backward(h, weight, targets)
        ctx.head, ctx.chunk = head, chunk
        return out

    @staticmethod
    def backward(ctx, go):
        h, weight, targets = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gh = torch.zeros_like(h) if need_h else None
        gw = torch.zeros_like(weight) if need_w else None
        for i, j in _chunks(h.shape[0], ctx.chunk):
            with torch.enable_grad():
                hs = h[i:j].detach().requires_grad_(need_h)
                w = weight.detach().requires_grad_(need_w)
                wanted = [x for x in (hs, w) if x.requires_grad]
                if not wanted:
                    break
                grads = list(torch.autograd.grad(_logprob(ctx.head(hs, w), targets[i:j]), wanted,
                                                 grad_outputs=go[i:j]))
            if need_h:
                gh[i:j] = grads.pop(0)
            if need_w:
                gw += grads.pop(0)
        return gh, gw, None, None, None


def _logprob(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    return logits.gather(-1, targets[:, None])[:, 0] - torch.logsumexp(logits, -1)


def fused_jsd(h_student: torch.Tensor, h_teacher: torch.Tensor, head, beta: float,
              temperature: float = 1.0, chunk: int = 512, compiled: bool = False) -> torch.Tensor:
    """Mean over the N positions of the generalized JSD(beta) between the student's and the
    teacher's next-token distributions, from their final hidden states [N, H].

    ``head``: an ``sleepray.lm_forward.Head`` (``head(h, weight=None)`` -> logits). The
    teacher side gets no gradient; the head's weight gets one only if it requires it.
    ``compiled``: the loss and its gradient on each chunk's logits from ``torch.compile``
    (``nrem.compile_loss``).
    """
    if h_student.shape != h_teacher.shape:
        raise ValueError(f"student {tuple(h_student.shape)} and teacher {tuple(h_teacher.shape)} "
                         "hidden states differ in shape")
    if h_student.shape[0] == 0:
        return h_student.sum() * 0.0
    total = _FusedJSD.apply(h_student, h_teacher.detach(), head.weight, head, beta, temperature, chunk,
                            jsd_and_grad_fn(compiled))
    return total / h_student.shape[0]


def fused_token_logprobs(h: torch.Tensor, targets: torch.Tensor, head, chunk: int = 512) -> torch.Tensor:
    """log p(targets[n] | position n) for each of the N positions, float32 [N]."""
    return _TokenLogprobs.apply(h, head.weight, targets.to(h.device), head, chunk)
