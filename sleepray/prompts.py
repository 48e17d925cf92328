"""Consolidation prompts made from the memory (DESIGN.md, NREM step 1).

A prompt is what the student sees (no memory in context); the teacher sees the
episode's documents followed by the same prompt. Prompts are probe questions (by
template for the built-in world, written by the model for free text) and
continuation prefixes cut from the documents. Ground-truth answers are never read.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable, Optional

from sleepray.world import Episode, qa_prompt

_SENTENCE = re.compile(r"[^.!?\n]+[.!?]")


@dataclass(frozen=True)
class ConsolidationPrompt:
    episode_id: str
    context: str
    prompt: str
    kind: str  # "probe" | "prefix" | "query"

    @property
    def teacher_prompt(self) -> str:
        return f"{self.context}\n{self.prompt}"


def continuation_prefixes(documents: list[str], rng: random.Random) -> list[str]:
    """Each sentence of the documents cut at a random word boundary (at least one word left out)."""
    out = []
    for doc in documents:
        for sent in _SENTENCE.findall(doc):
            words = sent.strip().split()
            if len(words) < 3:
                continue
            out.append(" ".join(words[: rng.randint(2, len(words) - 1)]))
    return out


QuestionWriter = Callable[[str, int], list[str]]


def consolidation_prompts(episode: Episode, n: int, rng: random.Random,
                          write_questions: Optional[QuestionWriter] = None,
                          probe_fraction: float = 0.5) -> list[ConsolidationPrompt]:
    """``n`` prompts about one episode: probe questions and continuation prefixes.

    Built-in episodes carry probe questions (their answers stay unread); for free text the
    questions come from ``write_questions(context, k)`` (the model, with the episode in context).
    """
    context = episode.context
    questions = [p.question for p in episode.probes]
    n_q = round(n * probe_fraction)
    if not questions and write_questions is not None and n_q:
        questions = write_questions(context, n_q)
    kind_q = "probe" if episode.probes else "query"
    prefixes = continuation_prefixes(episode.documents, rng)
    if not prefixes:
        n_q = n
    if not questions:
        n_q = 0
    chosen = [ConsolidationPrompt(episode.episode_id, context, qa_prompt(q), kind_q)
              for q in _covering(questions, n_q, rng)]
    chosen += [ConsolidationPrompt(episode.episode_id, context, p, "prefix")
               for p in _covering(prefixes, n - n_q, rng)]
    return chosen


def _covering(items: list[str], k: int, rng: random.Random) -> list[str]:
    """``k`` draws that take every item once (in random order) before any item twice."""
    out: list[str] = []
    while items and len(out) < k:
        rnd = list(items)
        rng.shuffle(rnd)
        out += rnd
    return out[:k]
