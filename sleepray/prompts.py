"""Consolidation prompts made from the memory alone (DESIGN.md, NREM step 1).

A prompt is what the student sees (no memory in context); the teacher sees the
episode's documents followed by the same prompt. Prompts are questions the teacher
writes itself with the episode in context (:func:`model_question_writer`) and
continuation prefixes cut from the documents. Nothing else is read: an episode's
``probes`` are evaluation data and never become prompts (a user's later questions are
unknown at sleep time), for the built-in world as for free text.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable, Optional

from sleepray.prompt_format import PLAIN, PromptFormat
from sleepray.world import Episode

_SENTENCE = re.compile(r"[^.!?\n]+(?:[.!?]|$)", re.MULTILINE)  # a last fragment without a stop too
_WORD = re.compile(r"[^\W_][\w'-]*")


@dataclass(frozen=True)
class ConsolidationPrompt:
    episode_id: str
    context: str
    prompt: str
    kind: str  # "query" (a question the model wrote) | "prefix" (a document's sentence, cut)
    teacher: str = ""  # the teacher's prompt (the same with the memory in it); default: context first

    @property
    def teacher_prompt(self) -> str:
        return self.teacher or f"{self.context}\n{self.prompt}"


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


def _bare(word: str) -> str:
    word = word.lower()
    return word[:-2] if word.endswith("'s") else word


def grounded(question: str, context: str) -> bool:
    """Is the question about something in the context? One of its names (capitalised words after
    the first, a possessive 's dropped) must occur there, or, when it has none, one of its words
    of five letters or more. A question about nothing in the episode would only distill the
    teacher's guess."""
    words = {_bare(w) for w in _WORD.findall(context)}
    q = [_bare(w) if w[0].islower() else _bare(w).capitalize() for w in _WORD.findall(question)]
    names = [w for w in q[1:] if w[0].isupper()]
    keys = names or [w for w in q if len(w) >= 5]
    return any(w.lower() in words for w in keys)


def model_question_writer(bank, tok, temperature: float = 1.0, max_new_tokens: int = 24,
                          seed: int = 0, oversample: int = 3) -> QuestionWriter:
    """Questions about an episode written by the frozen model (the teacher) with the episode in
    its context: ``oversample * k`` samples of ``"<context>\\nQ:"``, cut at the question mark,
    kept when :func:`grounded`, without repeats, in order of first appearance. Each call is
    seeded (``seed`` plus a call counter), so a sleep writes the same questions when redone."""
    from sleepray.sampling import sample_ids
    calls = [0]

    def write(context: str, k: int) -> list[str]:
        if k <= 0:
            return []
        calls[0] += 1
        with bank.teacher_mode():
            outs = sample_ids(bank.model, tok, [f"{context}\nQ:"] * (oversample * k), max_new_tokens,
                              temperature, seed=seed * 1_000_003 + calls[0])
        qs = []
        for ids in outs:
            text = tok.decode(ids, skip_special_tokens=True).strip()
            if "?" in text:
                q = text[: text.index("?") + 1].strip()
                if q not in qs and grounded(q, context):
                    qs.append(q)
        return qs[:k]
    return write


def consolidation_prompts(episode: Episode, n: int, rng: random.Random,
                          write_questions: Optional[QuestionWriter] = None,
                          query_fraction: float = 0.5, fmt: PromptFormat = PLAIN) -> list[ConsolidationPrompt]:
    """``n`` prompts about one episode: self-written questions and continuation prefixes.

    ``write_questions(context, k)`` gives up to ``k`` questions (the model, with the episode in
    context); without it, or when it writes none, every prompt is a prefix. The episode's
    ``probes`` are never read. A question is asked in ``fmt`` (the model's chat template, when
    it has one: ``sleepray.prompt_format``); a prefix is plain text after the documents.
    """
    context = episode.context
    n_q = round(n * query_fraction) if write_questions is not None else 0
    questions = write_questions(context, n_q) if n_q else []
    prefixes = continuation_prefixes(episode.documents, rng)
    if not prefixes:
        n_q = n
    if not questions:
        n_q = 0
    chosen = [ConsolidationPrompt(episode.episode_id, context, fmt.question(q), "query", fmt.question(q, context))
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
