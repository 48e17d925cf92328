"""REM's dreams: writing them (SEAL-style self-edits) and choosing which to try.

:func:`write_dreams` samples, per episode, ``m`` dreams from the frozen model (the
on-experts, not the training one) WITH the episode in context, in the formats
"implications", "qa" and "rewrite", with one random unused expert slot switched on while
sampling (diversity) and the dream writer adapter on when there is one.
:func:`score_dreams` scores each dream by its SFT gradient on the training expert: cosine
with the probe-loss gradient ("grad_align") or its norm ("grad_norm"); :func:`select`
keeps the top k plus b random others.
"""
from __future__ import annotations

import contextlib
import logging
import math
import random
from typing import TYPE_CHECKING, Optional, Sequence

import torch

from sleepray.dream_formats import dream_prompt
from sleepray.dream_writer import only_adapters
from sleepray.rem_probes import ProbeTarget, by_episode, mean_nll
from sleepray.replay import Dream
from sleepray.sampling import sample_ids
from sleepray.world import Episode

if TYPE_CHECKING:
    from sleepray.dream_writer import DreamWriter

log = logging.getLogger(__name__)

__all__ = ["DreamRollouts", "sample_text", "score_dreams", "select", "select_indices", "write_dreams"]


def sample_text(model, tok, prompts: list[str], max_new_tokens: int, temperature: float,
                seed: int) -> list[str]:
    """Sampled continuations of ``prompts`` (several lines: stops at EOS or the length only),
    seeded by ``seed`` without touching the global torch RNG state."""
    outs = sample_ids(model, tok, prompts, max_new_tokens, temperature, stop=(), seed=seed)
    return [tok.decode(ids, skip_special_tokens=True).rstrip() for ids in outs]


def write_dreams(bank, tok, episode: Episode, rcfg, rng: random.Random,
                 writer: Optional["DreamWriter"] = None, rollouts: Optional["DreamRollouts"] = None) -> list[Dream]:
    """``rcfg.dreams_per_episode`` dreams about ``episode``, formats taken in turn from ``rcfg.formats``.

    Sampled from the frozen model (on-experts only) with the episode in context, plus the
    random unused expert (``rcfg.random_expert``) and the dream writer when given: by this
    process, or by the generation engines (``rollouts``: the same adapters exported as one
    and published to them).
    """
    formats = list(rcfg.formats)
    if not formats:
        raise ValueError("rem.formats is empty: no dream format to write")
    fmts = [formats[i % len(formats)] for i in range(rcfg.dreams_per_episode)]
    prompts = [dream_prompt(episode.context, f) for f in fmts]
    # drawn before the random expert takes its draws: the same rng gives the same sampling
    # noise with and without it, so only the expert changes the dreams
    seed = rng.randrange(2**31)
    extra = [writer.name] if writer is not None else []
    with contextlib.ExitStack() as stack:
        if rcfg.random_expert:
            if bank.free_slots:
                extra.append(stack.enter_context(
                    bank.random_free_slot_context(rng, rcfg.random_expert_scale)))
            else:
                log.warning("no free expert slot: dreaming without the random expert")
        if rollouts is not None:
            texts = rollouts.sample(bank, tok, list(bank.on) + extra, episode.episode_id, prompts, rcfg, seed)
        else:
            stack.enter_context(only_adapters(bank, list(bank.on) + extra))
            bank.model.eval()
            texts = sample_text(bank.model, tok, prompts, rcfg.max_new_tokens, rcfg.temperature, seed)
    return [Dream(episode.episode_id, f, p, t) for f, p, t in zip(fmts, prompts, texts)]


class DreamRollouts:
    """Dreams sampled by generation engines: ``generate(list[GenRequest], {name: folder})``
    (a ``RolloutPool``'s). The adapters a dream is written with (on-experts, the random expert,
    the dream writer) are exported as ONE adapter into ``folder/<name>`` and published with
    the request; selection, trials and training stay with the learner."""

    def __init__(self, generate, folder, prefix: str):
        from pathlib import Path
        self.generate, self.folder, self.prefix = generate, Path(folder), prefix
        self.published: list[str] = []

    def sample(self, bank, tok, adapters: list[str], episode_id: str, prompts: list[str], rcfg,
               seed: int) -> list[str]:
        from sleepray.engines.base import GenRequest
        name = None
        if adapters:
            name = f"{self.prefix}-{episode_id}-{len(self.published):03d}"
            bank.export_combined(self.folder / name, overwrite=True, adapters=adapters)
            self.published.append(name)
        reqs = [GenRequest(prompt=p, max_tokens=rcfg.max_new_tokens, temperature=rcfg.temperature,
                           adapter=name, seed=seed + i, stop=[]) for i, p in enumerate(prompts)]
        outs = self.generate(reqs, {name: str(self.folder / name)} if name else {})
        return [tok.decode(list(o.token_ids), skip_special_tokens=True).rstrip() for o in outs]


def _flat_grad(loss, params) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                      for g, p in zip(grads, params)])


def score_dreams(bank, tok, dreams: list[Dream], probe_targets: list[ProbeTarget],
                 method: str = "grad_align") -> list[float]:
    """One score per dream from its SFT gradient on the training expert's parameters.

    "grad_align": cosine between the dream's gradient and the gradient of the closed-book
    probe loss of its episode (descending the dream's loss then lowers the probe loss to
    first order); "grad_norm": the dream gradient's norm.
    """
    if method not in ("grad_align", "grad_norm"):
        raise ValueError(f"unknown selection method {method!r}")
    params = bank.trainable_parameters()
    bank.model.eval()
    targets = by_episode(probe_targets)
    probe_grads: dict[str, Optional[torch.Tensor]] = {}
    scores = []
    for d in dreams:
        if not d.sft_text.strip():
            scores.append(0.0)
            continue
        g = _flat_grad(mean_nll(bank.model, tok, [d.sft_text]), params)
        if method == "grad_norm":
            scores.append(float(g.norm()))
            continue
        if d.episode_id not in probe_grads:
            ts = targets.get(d.episode_id, [])
            probe_grads[d.episode_id] = _flat_grad(
                mean_nll(bank.model, tok, [t.text for t in ts], [t.prompt for t in ts]), params) if ts else None
            if not ts:
                log.warning("no probe targets for %s: its dreams score 0", d.episode_id)
        pg = probe_grads[d.episode_id]
        denom = float(g.norm()) * (float(pg.norm()) if pg is not None else 0.0)
        scores.append(float(g @ pg) / denom if denom > 0 else 0.0)
    return scores


def select_indices(scores: Sequence[float], k: int, b: int, rng: random.Random) -> list[int]:
    """Indices of the top ``k`` scores (ties: earlier first) then ``b`` random others."""
    key = [s if isinstance(s, (int, float)) and math.isfinite(s) else -math.inf for s in scores]
    order = sorted(range(len(key)), key=lambda i: (-key[i], i))
    top = order[: max(0, k)]
    rest = order[max(0, k):]
    return top + rng.sample(rest, min(max(0, b), len(rest)))


def select(dreams: list[Dream], scores: Sequence[float], k: int, b: int,
           rng: random.Random) -> list[Dream]:
    """The top ``k`` dreams by score plus ``b`` random others (distinct)."""
    if len(dreams) != len(scores):
        raise ValueError(f"{len(dreams)} dreams but {len(scores)} scores")
    return [dreams[i] for i in select_indices(scores, k, b, rng)]
