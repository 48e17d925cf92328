"""General text made locally: simple narrative English from a small grammar.

Used to train the tokenizer, to keep the seed model a general language model, and
(held-out seeds) to measure perplexity drift after sleeps.
"""
from __future__ import annotations

import random

_DET = ["the", "a", "every", "one", "that"]
_ADJ = ["old", "young", "quiet", "bright", "small", "tall", "careful", "busy", "kind",
        "tired", "clever", "gentle", "brave", "patient", "curious", "proud"]
_NOUN = ["farmer", "teacher", "child", "sailor", "baker", "doctor", "painter", "student",
         "merchant", "dog", "horse", "cat", "bird", "neighbour", "traveller", "captain"]
_OBJ = ["basket", "letter", "lamp", "book", "boat", "map", "song", "story", "cart",
        "bread", "coat", "key", "ladder", "garden", "window", "candle"]
_PLACE = ["market", "river", "village", "hill", "school", "harbour", "forest", "bridge",
          "kitchen", "station", "field", "square", "library", "road", "shore", "valley"]
_VERB_T = ["carried", "found", "opened", "painted", "repaired", "sold", "borrowed",
           "cleaned", "remembered", "shared", "watched", "wrapped"]
_VERB_I = ["walked", "waited", "rested", "sang", "worked", "listened", "laughed", "slept"]
_PREP = ["to", "near", "across", "behind", "beside", "towards", "past", "through"]
_TIME = ["in the morning", "after lunch", "before dawn", "at night", "on sunday",
         "every spring", "in the rain", "at noon"]
_CONJ = ["because", "while", "after", "before", "although", "when"]


def _np(rng: random.Random, nouns: list[str]) -> str:
    if rng.random() < 0.5:
        return f"{rng.choice(_DET)} {rng.choice(_ADJ)} {rng.choice(nouns)}"
    return f"{rng.choice(_DET)} {rng.choice(nouns)}"


def _clause(rng: random.Random) -> str:
    subj = _np(rng, _NOUN)
    r = rng.random()
    if r < 0.4:
        body = f"{subj} {rng.choice(_VERB_T)} {_np(rng, _OBJ)}"
    elif r < 0.7:
        body = f"{subj} {rng.choice(_VERB_I)} {rng.choice(_PREP)} {_np(rng, _PLACE)}"
    else:
        body = f"{subj} {rng.choice(_VERB_T)} {_np(rng, _OBJ)} {rng.choice(_PREP)} {_np(rng, _PLACE)}"
    if rng.random() < 0.3:
        body += f" {rng.choice(_TIME)}"
    return body


def sentence(rng: random.Random) -> str:
    s = _clause(rng)
    if rng.random() < 0.3:
        s += f" {rng.choice(_CONJ)} {_clause(rng)}"
    return s[0].upper() + s[1:] + "."


def paragraph(rng: random.Random, n_sentences: int = 5) -> str:
    return " ".join(sentence(rng) for _ in range(n_sentences))


def corpus(seed: int, n_paragraphs: int, n_sentences: int = 5) -> list[str]:
    rng = random.Random(seed)
    return [paragraph(rng, n_sentences) for _ in range(n_paragraphs)]


# held-out general text for drift measurements uses seeds from this offset up
HELDOUT_SEED = 9_000_000
