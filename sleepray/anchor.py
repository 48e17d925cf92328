"""Drift control for NREM: keep the model what it was on text that has nothing to do
with the episode.

The anchor term is the token-level KL(frozen || student) on a small batch of anchor
texts each step, where "frozen" is the model before expansion (the teacher without any
context) and "student" the model with the new expert on. It is zero while the expert
changes nothing off the episode, and it grows as the expert bends the model's
distribution elsewhere -- perplexity drift is exactly that bend. Weight: ``nrem.anchor_weight``
(0 switches it off).

Anchor texts: documents of the built-in world drawn from a seed range that neither the
stream nor the evaluation uses, and general text of another held-out seed -- the two
kinds of text the seed models are trained on. Users of other models pass their own
(``nrem.anchor_path``: a text file, one paragraph per line).

Rehearsal: with REM's replay on, dreams about older episodes from the rehearsal buffer
join the anchor batch (``nrem.anchor_replay`` a step in NREM, ``rem.anchor_replay`` in
REM's dream SFT). The model before the sleep knows those episodes; keeping the
student's distribution there is keeping that knowledge while the new expert learns the
new episode (generative replay).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from sleepray.lm import _batch

ANCHOR_WORLD_SEED = 20_000_000
ANCHOR_TEXT_SEED = 8_000_000


def anchor_texts(cfg, n: int = 64) -> list[str]:
    if cfg.nrem.anchor_path:
        lines = [x.strip() for x in Path(cfg.nrem.anchor_path).read_text().splitlines() if x.strip()]
        if not lines:
            raise ValueError(f"nrem.anchor_path {cfg.nrem.anchor_path} has no text")
        return lines
    from sleepray import general_text
    from sleepray.world import World
    wc = cfg.world
    docs = [d for e in World(ANCHOR_WORLD_SEED, wc.people_per_episode, wc.orgs_per_episode,
                             wc.places_per_episode, wc.phrasings_per_fact).episodes(max(1, n // 4))
            for d in e.documents]
    return docs[: n // 2] + general_text.corpus(ANCHOR_TEXT_SEED, n - min(len(docs), n // 2))


def anchor_kl(bank, tok, texts: list[str], scorer=None) -> torch.Tensor:
    """Mean per-token KL(frozen model || student) on ``texts`` (gradient into the student).

    ``scorer``: NREM's ``nrem_forward.Scorer`` (fused head and loss); None: full logits."""
    if scorer is not None:
        return scorer.anchor_kl(texts)
    device = next(bank.model.parameters()).device
    ids, attn, mask = _batch(tok, texts, device)
    with torch.no_grad(), bank.teacher_mode():
        ref = torch.log_softmax(bank.model(input_ids=ids, attention_mask=attn).logits[:, :-1].float(), -1)
    cur = torch.log_softmax(bank.model(input_ids=ids, attention_mask=attn).logits[:, :-1].float(), -1)
    kl = (ref.exp() * (ref - cur)).sum(-1)
    m = mask[:, 1:]
    return (kl * m).sum() / m.sum().clamp_min(1.0)


def draw(texts: list[str], k: int, rng: random.Random) -> list[str]:
    return [rng.choice(texts) for _ in range(k)] if texts and k > 0 else []


def rehearsal_weight(pcfg) -> float:
    """The weight of the KL on older episodes' dreams: ``rehearsal_weight``, else ``anchor_weight``."""
    return pcfg.anchor_weight if pcfg.rehearsal_weight is None else pcfg.rehearsal_weight


def rehearses(pcfg) -> bool:
    """Whether the phase rehearses older episodes' dreams in its anchor (weight and count > 0)."""
    return rehearsal_weight(pcfg) > 0 and pcfg.anchor_replay > 0


@dataclass
class AnchorBatch:
    """One step's anchor: unrelated texts (drift control) and older episodes' dreams (rehearsal)."""
    texts: list[str]
    rehearse: list[str]


def anchor_batch(pcfg, anchor_texts: list[str] | None, replay_texts: list[str] | None,
                 rng: random.Random) -> AnchorBatch | None:
    """``anchor_batch`` unrelated texts (when ``anchor_weight`` > 0) and ``anchor_replay``
    dreams about older episodes (when the rehearsal weight > 0); None when both are off.
    ``pcfg``: the phase's config section (``nrem`` or ``rem``); both have these fields."""
    texts = draw(anchor_texts or [], pcfg.anchor_batch, rng) if pcfg.anchor_weight > 0 else []
    rehearse = draw(replay_texts or [], pcfg.anchor_replay, rng) if rehearsal_weight(pcfg) > 0 else []
    return AnchorBatch(texts, rehearse) if texts or rehearse else None


def anchor_loss(bank, tok, pcfg, batch: AnchorBatch | None, scorer=None) -> tuple[torch.Tensor | float, dict]:
    """``anchor_weight`` * KL on the unrelated texts + rehearsal weight * KL on the older
    dreams, and the two KLs for the step's record, as 0-d tensors (reading one waits for the
    device); 0 and {} without a batch."""
    loss, rec = 0.0, {}
    if batch is None:
        return loss, rec
    for key, texts, weight in (("anchor_kl", batch.texts, pcfg.anchor_weight),
                               ("rehearsal_kl", batch.rehearse, rehearsal_weight(pcfg))):
        if texts and weight > 0:
            kl = anchor_kl(bank, tok, texts, scorer)
            loss = loss + weight * kl
            rec[key] = kl.detach()
    return loss, rec
