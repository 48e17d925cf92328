"""REM's probes: questions the model writes about an episode and the teacher's answers to them.

Every probe, trial, revert check, retention check and repair of REM is measured on these
(:class:`ProbeTarget`); an episode's evaluation questions (``Episode.probes``) are never read.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from sleepray import lm
from sleepray.prompts import QuestionWriter
from sleepray.replay import ReplayBuffer
from sleepray.prompt_format import PLAIN, PromptFormat, format_of
from sleepray.world import Episode

__all__ = ["ProbeTarget", "accuracy_by_episode", "by_episode", "mean_nll", "older_probe_targets",
           "probe_accuracy", "probe_hits", "probe_loss", "teacher_probe_targets"]


@dataclass(frozen=True)
class ProbeTarget:
    """A probe question and the teacher's answer to it (with the episode in context)."""
    episode_id: str
    question: str
    target: str
    fmt: PromptFormat = field(default=PLAIN, compare=False, repr=False)

    @property
    def prompt(self) -> str:
        return self.fmt.question(self.question)

    @property
    def text(self) -> str:  # plain: the pretraining format "Q: ...\nA: answer\n"
        return self.fmt.answered(self.question, self.target)


def teacher_probe_targets(bank, tok, episode: Episode, n: int, question_writer: QuestionWriter,
                          max_new_tokens: int = 12) -> list[ProbeTarget]:
    """Up to ``n`` questions the model wrote about the episode (``question_writer``: the frozen
    model with the episode in context, :func:`sleepray.prompts.model_question_writer`),
    answered greedily by the teacher with the episode in context. The episode's own
    ``probes`` (evaluation data) are never read. Empty answers are dropped."""
    from sleepray.qa import generate_answers
    questions = list(dict.fromkeys(question_writer(episode.context, n)))[:n]
    if not questions:
        return []
    fmt = format_of(tok)
    with bank.teacher_mode():
        answers = generate_answers(bank.model, tok, [fmt.question(q, episode.context) for q in questions],
                                   max_new_tokens)
    return [ProbeTarget(episode.episode_id, q, a, fmt) for q, a in zip(questions, answers) if a.strip()]


def mean_nll(model, tok, texts: list[str], prompts: Optional[list[str]] = None):
    """The per-token NLL of ``texts`` (after ``prompts``), over the whole batch."""
    nll, cnt = lm.token_nll(model, tok, texts, prompts)
    return nll.sum() / cnt.sum().clamp_min(1)


def probe_loss(bank, tok, targets: list[ProbeTarget]) -> float:
    """Closed-book per-token NLL of the teacher's answers (the student as the bank stands now)."""
    if not targets:
        return float("nan")
    with torch.no_grad():
        return float(mean_nll(bank.model, tok, [t.text for t in targets], [t.prompt for t in targets]))


def probe_hits(bank, tok, targets: list[ProbeTarget], max_new_tokens: int = 12) -> list[bool]:
    """For each target: does the model give the teacher's answer closed-book (greedy, exact match)?"""
    from sleepray.qa import exact_match, generate_answers
    if not targets:
        return []
    answers = generate_answers(bank.model, tok, [t.prompt for t in targets], max_new_tokens)
    return [bool(exact_match(a, t.target)) for a, t in zip(answers, targets)]


def probe_accuracy(bank, tok, targets: list[ProbeTarget], max_new_tokens: int = 12) -> float:
    """Closed-book greedy exact match against the teacher's answers."""
    hits = probe_hits(bank, tok, targets, max_new_tokens)
    return sum(hits) / len(hits) if hits else float("nan")


def accuracy_by_episode(targets: list[ProbeTarget], hits: Sequence[bool]) -> dict[str, float]:
    """The fraction of each episode's targets that were hit."""
    out: dict[str, list[bool]] = {}
    for t, h in zip(targets, hits):
        out.setdefault(t.episode_id, []).append(bool(h))
    return {e: sum(v) / len(v) for e, v in out.items()}


def by_episode(targets: list[ProbeTarget]) -> dict[str, list[ProbeTarget]]:
    """The targets grouped by episode, in order."""
    out: dict[str, list[ProbeTarget]] = {}
    for t in targets:
        out.setdefault(t.episode_id, []).append(t)
    return out


def older_probe_targets(buffer: Optional[ReplayBuffer], episodes: Sequence[Episode], rcfg,
                        seed: int = 0, fmt: PromptFormat = PLAIN) -> list[ProbeTarget]:
    """Up to ``rcfg.retention_probes`` probe answers about older episodes from the buffer (the
    teacher's, written by earlier sleeps): the retention check. Only those the model gave
    closed-book after their own sleep (what it had learned), spread evenly over the older
    episodes so that the first one is not outweighed as episodes pile up; random within each."""
    if buffer is None or rcfg.retention_probes <= 0:
        return []
    rng = random.Random(seed)
    pools: dict[str, list[ProbeTarget]] = {}
    for e, q, a in buffer.probe_answers([ep.episode_id for ep in episodes], learned_only=True):
        pools.setdefault(e, []).append(ProbeTarget(e, q, a, fmt))
    for pool in pools.values():
        rng.shuffle(pool)
    picked: list[ProbeTarget] = []
    while len(picked) < rcfg.retention_probes and any(pools.values()):
        for pool in pools.values():  # round robin over the episodes
            if pool and len(picked) < rcfg.retention_probes:
                picked.append(pool.pop())
    return picked
