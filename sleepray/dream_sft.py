"""REM's dream SFT: the training expert learns the rewarded dreams, with replay and the anchor.

:func:`train_dreams` is the SFT of the expert on the rewarded dreams plus replayed older
dreams (:class:`~sleepray.replay.ReplayBuffer`), ordered by a curriculum, with the KL
anchor on unrelated text and on older episodes' dreams (rehearsal).
:func:`sft_made_worse` is the verdict REM keeps or reverts the whole SFT by.
"""
from __future__ import annotations

import math
import random
from typing import Optional, Sequence

import torch

from sleepray import lm
from sleepray.anchor import anchor_batch, anchor_loss, rehearses
from sleepray.rem_probes import mean_nll
from sleepray.replay import Dream, ReplayBuffer

__all__ = ["dream_difficulty", "sft_made_worse", "train_dreams"]


@torch.no_grad()
def dream_difficulty(bank, tok, dreams: list[Dream], batch_size: int = 8) -> list[float]:
    """The student's per-token loss on each dream's SFT text (the bank as it stands)."""
    out: list[float] = []
    for i in range(0, len(dreams), batch_size):
        nll, cnt = lm.token_nll(bank.model, tok, [d.sft_text for d in dreams[i: i + batch_size]])
        out += (nll / cnt.clamp_min(1)).tolist()
    return out


def _curriculum(difficulty: list[float], kind: str, rng: random.Random) -> list[int]:
    idx = list(range(len(difficulty)))
    if kind == "easy_to_hard":
        return sorted(idx, key=lambda i: (difficulty[i], i))
    if kind == "hard_to_easy":
        return sorted(idx, key=lambda i: (-difficulty[i], i))
    if kind == "random":
        rng.shuffle(idx)
        return idx
    raise ValueError(f"unknown curriculum {kind!r}")


def _n_replay(n_new: int, fraction: float, cap: int) -> int:
    if fraction <= 0:
        return 0
    if fraction >= 1:
        return cap
    return math.ceil(max(n_new, 1) * fraction / (1 - fraction))


def train_dreams(bank, tok, dreams: list[Dream], rcfg, buffer: Optional[ReplayBuffer] = None,
                 rng: Optional[random.Random] = None,
                 exclude_episodes: Optional[Sequence[str]] = None,
                 anchor_texts: Optional[list[str]] = None) -> dict:
    """SFT of the training expert on ``dreams`` plus replayed older dreams, in curriculum order.

    Replay: older dreams from ``buffer`` (none about ``exclude_episodes``, by default the
    episodes of ``dreams``) so that they make about ``rcfg.replay_fraction`` of the mix.
    Curriculum: each dream's difficulty is the student's loss on it before training;
    the ordered list is stretched over ``rcfg.sft_steps`` batches of ``rcfg.batch_size``.
    Drift control: ``rcfg.anchor_weight`` * KL(frozen || student) on ``rcfg.anchor_batch``
    of ``anchor_texts`` a step (``sleepray.anchor``), plus ``rcfg.anchor_replay`` of the
    buffer's dreams about older episodes: the SFT on older dreams alone did not keep
    them; the KL to the model before the sleep, which knows them, does.
    """
    rng = rng or random.Random(0)
    params = bank.trainable_parameters()
    new = [d for d in dreams if d.sft_text.strip()]
    replayed: list[Dream] = []
    rehearse: list[str] = []
    if rcfg.replay and buffer is not None:
        exclude = set(exclude_episodes) if exclude_episodes is not None else {d.episode_id for d in dreams}
        replayed = [d for d in buffer.sample(_n_replay(len(new), rcfg.replay_fraction, rcfg.buffer_size),
                                             exclude, rng) if d.sft_text.strip()]
        rehearse = buffer.texts(exclude) if rehearses(rcfg) else []
    items = new + replayed
    info = {"trained_dreams": len(new), "replayed": len(replayed), "rehearsal_texts": len(rehearse), "sft_steps": 0,
            "sft_loss_first": float("nan"), "sft_loss_last": float("nan")}
    if not items or rcfg.sft_steps <= 0:
        return info
    bank.model.eval()
    difficulty = dream_difficulty(bank, tok, items, rcfg.batch_size)
    order = _curriculum(difficulty, rcfg.curriculum, rng)
    n, steps, bs = len(items), rcfg.sft_steps, min(rcfg.batch_size, len(items))
    opt = torch.optim.AdamW(params, lr=rcfg.sft_lr, weight_decay=0.0)
    losses = []
    for s in range(steps):
        start = (s * n) // steps
        batch = [items[order[(start + j) % n]] for j in range(bs)]
        loss = mean_nll(bank.model, tok, [d.sft_text for d in batch])
        loss = loss + anchor_loss(bank, tok, rcfg, anchor_batch(rcfg, anchor_texts, rehearse, rng))[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
    for p in params:
        p.grad = None
    info.update(sft_steps=steps, sft_loss_first=losses[0], sft_loss_last=losses[-1],
                difficulty_order=[difficulty[i] for i in order])
    return info


def sft_made_worse(loss: tuple, accuracy: tuple, retention: tuple, tolerance: float = 0.0) -> bool:
    """The dream SFT's verdict from (before, after) pairs: probe loss rose, fewer of the
    teacher's answers came out, or the older episodes' accuracy fell by more than
    ``tolerance`` (None or NaN: not measured)."""
    def measured(pair):
        return all(v is not None and not math.isnan(v) for v in pair)
    return ((measured(loss) and loss[1] > loss[0]) or (measured(accuracy) and accuracy[1] < accuracy[0])
            or (measured(retention) and retention[1] < retention[0] - tolerance))
