"""REM's trials: does a dream, learned alone, help the expert answer the probes?

:func:`run_trials` fine-tunes an isolated copy of the training expert on each kept dream
(snapshot, ``trial_steps`` of SFT, closed-book probe score, exact restore); reward 1 when
the probe score improves. The rewarded dreams are ReST-EM's E-step filter
(:func:`sleepray.dream_writer.restem_update`) and what the expert's dream SFT learns.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sleepray import lm
from sleepray.rem_probes import ProbeTarget, by_episode, probe_accuracy, probe_loss
from sleepray.replay import Dream

__all__ = ["TrialResult", "restore", "run_trials", "snapshot"]


@dataclass
class TrialResult:
    reward: int
    before: float
    after: float
    metric: str


def snapshot(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """Copies of ``params``, for :func:`restore`."""
    return [p.detach().clone() for p in params]


def restore(params: list[torch.nn.Parameter], saved: list[torch.Tensor]) -> None:
    """Copy ``saved`` back into ``params`` exactly, and drop their gradients."""
    with torch.no_grad():
        for p, v in zip(params, saved):
            p.copy_(v)
            p.grad = None


def _probe_metric(bank, tok, targets, rcfg) -> float:
    if rcfg.trial_metric == "accuracy":
        return probe_accuracy(bank, tok, targets, rcfg.probe_max_new_tokens)
    return probe_loss(bank, tok, targets)


def _improved(before: float, after: float, metric: str) -> bool:
    if math.isnan(before) or math.isnan(after):
        return False
    return after > before if metric == "accuracy" else after < before


def run_trials(bank, tok, kept: list[Dream], probe_targets: list[ProbeTarget], rcfg,
               seed: int = 0) -> list[TrialResult]:
    """Fine-tune an isolated copy of the training expert on each kept dream; reward 1 if the probes improve.

    The expert's tensors are snapshotted before each trial and copied back after it, so
    trials are independent and the expert is exactly as before when this returns.
    """
    params = bank.trainable_parameters()
    bank.model.eval()
    targets = by_episode(probe_targets)
    before: dict[str, float] = {}
    results = []
    for i, d in enumerate(kept):
        ts = targets.get(d.episode_id, [])
        if d.episode_id not in before:
            before[d.episode_id] = _probe_metric(bank, tok, ts, rcfg)
        pre = before[d.episode_id]
        if not ts or not d.sft_text.strip():
            results.append(TrialResult(0, pre, float("nan"), rcfg.trial_metric))
            continue
        saved = snapshot(params)
        try:
            lm.sft(params, bank.model, tok, [d.sft_text], rcfg.trial_steps, rcfg.trial_lr,
                   batch_size=1, seed=seed + i)
            post = _probe_metric(bank, tok, ts, rcfg)
        finally:
            restore(params, saved)
        results.append(TrialResult(int(_improved(pre, post, rcfg.trial_metric)), pre, post,
                                   rcfg.trial_metric))
    return results
