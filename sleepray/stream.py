"""The episode stream a config names: the built-in world, or the user's own files.

An episode's documents are memory; its ``probes`` (questions with answers) are evaluation
data: the MemoryStore keeps only documents, so no question reaches a sleep. For user
files, ``world.qa_as_memory=true`` is the one opt-in that puts the question/answer records
into memory too (their probes are then labelled phrasing ``"trained"``, and the
evaluation refuses the stream: :func:`evaluation_episodes`).
"""
from __future__ import annotations

import dataclasses

from sleepray.world import Episode, World, qa_prompt


def episodes_from_config(wc, n: int | None = None) -> list[Episode]:
    """The first ``n`` (default ``wc.n_episodes``) episodes of the configured stream."""
    n = n or wc.n_episodes
    if wc.source == "builtin":
        if wc.qa_as_memory:
            raise ValueError("world.qa_as_memory applies to world.source=file only")
        return World.from_config(wc).episodes(n)
    if not wc.data_path:
        raise ValueError("world.source=file needs world.data_path (JSONL or Parquet)")
    from sleepray.userdata import load_episodes
    episodes = load_episodes(wc.data_path)[:n]
    if wc.qa_as_memory:  # opted in by name: the pairs are memory too, and graded as what they are
        episodes = [Episode(e.episode_id, e.documents + [f"{qa_prompt(p.question)} {p.answer}" for p in e.probes],
                            e.facts, [dataclasses.replace(p, phrasing="trained") for p in e.probes])
                    for e in episodes]
    return episodes


def evaluation_episodes(wc, n: int | None = None) -> list[Episode]:
    """The stream for an evaluation: refused when its questions would also be memory."""
    if wc.qa_as_memory:
        raise ValueError("world.qa_as_memory=true puts the question/answer records into memory, so sleeps "
                         "train on the very questions the evaluation grades; the evaluation refuses it. "
                         "Leave it false: the records are then evaluation data only")
    return episodes_from_config(wc, n)
