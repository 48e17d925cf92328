"""Distillation divergences for NREM (Knowledge Seeding), in torch only.

Notation: S = student distribution (the trainable model, new expert on, no memory in
context), T = teacher distribution (frozen model with the short-term memory in
context), both over the vocabulary at each token position.

``generalized_jsd`` is the per-token generalized Jensen-Shannon divergence of GKD
(Agarwal et al. 2024, "On-Policy Distillation of Language Models", Eq. 1), with the
same convention as TRL's ``GKDTrainer.generalized_jsd_loss``:

    M        = beta * T + (1 - beta) * S
    JSD_beta = beta * KL(T || M) + (1 - beta) * KL(S || M)

and the two ends defined as the plain KLs (not as the limit of the formula, which
goes to 0 at both ends):

    beta = 0  ->  KL(T || S)   forward KL  (mode covering)
    beta = 1  ->  KL(S || T)   reverse KL  (mode seeking)

All computations are in log space: log M = logsumexp(log S + log(1-beta),
log T + log(beta)). The teacher side never receives gradients.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["generalized_jsd", "topk_generalized_jsd", "sampled_token_kl",
           "sampled_token_kl_loss"]


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half / bfloat16 -> float32 (float32 and float64 are kept)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v), summed over the last dim.

    Terms with p_v = 0 (log p_v = -inf) count 0, so a support with -inf entries is fine.
    """
    p = logp.exp()
    diff = torch.where(p > 0, logp, torch.zeros_like(logp)) - logq
    return torch.where(p > 0, p * diff, torch.zeros_like(p)).sum(-1)


def _jsd_from_logprobs(s_logp: torch.Tensor, t_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-position generalized JSD from normalised log-probs [..., V] -> [...]."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0:
        return _kl(t_logp, s_logp)          # forward KL(T || S)
    if beta == 1:
        return _kl(s_logp, t_logp)          # reverse KL(S || T)
    log_m = torch.logsumexp(torch.stack([s_logp + math.log1p(-beta),
                                         t_logp + math.log(beta)]), dim=0)
    return beta * _kl(t_logp, log_m) + (1 - beta) * _kl(s_logp, log_m)


def _reduce(per_token: torch.Tensor, mask: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """"mean": sum(d * mask) / max(sum(mask), 1); "sum": sum(d * mask); "none": d, 0 where masked."""
    if mask is not None:
        mask = mask.to(device=per_token.device, dtype=torch.bool)
        per_token = torch.where(mask, per_token, torch.zeros_like(per_token))
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    if reduction == "mean":
        if mask is None:
            return per_token.mean()
        return per_token.sum() / mask.sum().clamp_min(1)
    raise ValueError(f"unknown reduction {reduction!r}")


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float,
                    temperature: float = 1.0, mask: torch.Tensor | None = None,
                    reduction: str = "mean") -> torch.Tensor:
    """Generalized JSD between student and teacher next-token distributions.

    S = softmax(student_logits / temperature), T = softmax(teacher_logits / temperature),
    D_t = beta KL(T||M) + (1-beta) KL(S||M), M = beta T + (1-beta) S (beta=0: KL(T||S),
    beta=1: KL(S||T)), summed over the vocabulary at each position t.

    Args:
        student_logits, teacher_logits: [B, T, V] (any leading shape works).
        beta: in [0, 1].
        temperature: softmax temperature applied to both (no T^2 rescaling, as TRL).
        mask: [B, T], 1 for the tokens to count (e.g. completion tokens).
        reduction: "mean" (average over masked tokens; equals TRL's
            ``reduction="batchmean"`` with labels), "sum", or "none" ([B, T], masked
            positions set to 0).
    """
    s_logp = F.log_softmax(_upcast(student_logits) / temperature, dim=-1)
    t_logp = F.log_softmax(_upcast(teacher_logits.detach()) / temperature, dim=-1)
    return _reduce(_jsd_from_logprobs(s_logp, t_logp.to(s_logp.dtype), beta), mask, reduction)


def topk_generalized_jsd(student_logits: torch.Tensor, teacher_topk_logprobs: torch.Tensor,
                         teacher_topk_ids: torch.Tensor, beta: float,
                         mask: torch.Tensor | None = None, reduction: str = "mean",
                         temperature: float = 1.0) -> torch.Tensor:
    """Generalized JSD restricted to the teacher's top-k support.

    Used when the teacher is only available as top-k log-probs (vLLM ``logprobs`` /
    ``prompt_logprobs``). With K_t the teacher's k token ids at position t:

        S~(v) = S(v) / sum_{u in K_t} S(u),   T~(v) = T(v) / sum_{u in K_t} T(u),  v in K_t

    (S from the student's full log-softmax, gathered at K_t, then renormalised in log
    space), and D_t = JSD_beta(S~ || T~) as in ``generalized_jsd``.

    Approximation: mass outside the teacher's top-k is ignored on both sides, so the
    student is not pushed away from tokens the teacher gives less than its k-th
    probability; as k grows to V this is exactly ``generalized_jsd``. Entries of
    ``teacher_topk_logprobs`` equal to -inf (fewer than k available) count as zero mass.

    Args:
        student_logits: [B, T, V].
        teacher_topk_logprobs: [B, T, k] teacher log-probs (normalised over the full
            vocabulary or not: they are renormalised here).
        teacher_topk_ids: [B, T, k] long token ids.
        temperature: applied to the student logits only (the teacher's top-k come
            already at the temperature they were scored with).
    """
    s_logp = F.log_softmax(_upcast(student_logits) / temperature, dim=-1)
    s_k = s_logp.gather(-1, teacher_topk_ids.long())
    s_k = s_k - torch.logsumexp(s_k, dim=-1, keepdim=True)
    t_k = _upcast(teacher_topk_logprobs.detach()).to(s_k.dtype)
    t_k = t_k - torch.logsumexp(t_k, dim=-1, keepdim=True)
    return _reduce(_jsd_from_logprobs(s_k, t_k, beta), mask, reduction)


def sampled_token_kl(student_logprobs_of_tokens: torch.Tensor,
                     teacher_logprobs_of_tokens: torch.Tensor,
                     mask: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """Single-sample estimate of the reverse KL on tokens sampled from the student.

    For y_t ~ S(. | y_<t):  k_t = log S(y_t) - log T(y_t),  E[k_t] = KL(S || T) at t.
    Inputs are [B, T] log-probs of the sampled tokens; only the sampled token's
    teacher log-prob is needed.

    This is the *value* of the estimator. Its own gradient (grad log S(y_t)) has zero
    mean, so do not minimise it directly: train with ``sampled_token_kl_loss``.
    """
    k = _upcast(student_logprobs_of_tokens) - _upcast(teacher_logprobs_of_tokens.detach())
    return _reduce(k, mask, reduction)


def sampled_token_kl_loss(student_logprobs_of_tokens: torch.Tensor,
                          teacher_logprobs_of_tokens: torch.Tensor,
                          mask: torch.Tensor | None = None) -> torch.Tensor:
    """Score-function surrogate whose gradient is the per-token reverse-KL gradient.

        L = mean_t [ stopgrad(log S(y_t) - log T(y_t)) * log S(y_t) ]
        grad L = mean_t [ k_t * grad log S(y_t) ],  E[...] = grad KL(S || T) at each t

    (the per-token "reward" -k_t of on-policy distillation, no credit to later tokens).
    """
    s = _upcast(student_logprobs_of_tokens)
    k = (s - _upcast(teacher_logprobs_of_tokens)).detach()
    return _reduce(k * s, mask, "mean")
