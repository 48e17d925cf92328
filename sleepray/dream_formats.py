"""The dream formats: the cue that asks for each, and what a well-written dream of each
looks like for the built-in world.

A dream is what the model writes after ``episode context + cue`` (DESIGN.md section 1,
Dreaming step 1). REM only ever samples dreams from the model; :func:`written_dream` is
used by the seed model's pretraining (``sleepray.pretrain_data``) so that the seed
model, like any instruction-following LLM, knows what the cues ask for:

- ``"implications"``: one statement per line, each fact on its own;
- ``"qa"``: question / answer pairs in the QA format the model answers in;
- ``"rewrite"``: the facts again, in other words and another order.
"""
from __future__ import annotations

import random
from typing import Sequence

from sleepray.world import SCHEMA, Fact, render_fact

FORMAT_CUES = {"implications": "\nImplications:\n", "qa": "\nQ:", "rewrite": "\nIn other words:"}


def _check_format(fmt: str) -> None:
    if fmt not in FORMAT_CUES:
        raise ValueError(f"unknown dream format {fmt!r} (choose from {sorted(FORMAT_CUES)})")


def dream_prompt(context: str, fmt: str) -> str:
    _check_format(fmt)
    return context + FORMAT_CUES[fmt]


def written_dream(facts: Sequence[Fact], fmt: str, rng: random.Random) -> str:
    """A dream about ``facts`` in format ``fmt``: the text that follows the format's cue."""
    _check_format(fmt)
    order = list(facts)
    rng.shuffle(order)
    if fmt == "qa":
        pairs = []
        for f in order:
            questions = SCHEMA[f.kind][f.attribute][2]
            pairs.append(f"{rng.choice(questions).format(name=f.entity)}\nA: {f.value}")
        return " " + "\nQ: ".join(pairs) + "\n"
    lines = [render_fact(f, rng.randrange(len(SCHEMA[f.kind][f.attribute][1]))) for f in order]
    if fmt == "implications":
        return "\n".join(lines) + "\n"
    return " " + " ".join(lines) + "\n"
