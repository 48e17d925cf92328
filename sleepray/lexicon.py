"""The fixed vocabulary of the built-in world: fictional names and attribute values.

The pools are generated once from syllables with a fixed seed, so every world (any
``world.seed``) draws from the same words: the seed model's tokenizer knows them,
while which value belongs to which entity is new in every world.
"""
from __future__ import annotations

import random
from functools import lru_cache

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "gr", "kl", "st", "th", "tr", "sh", "ch", "pl"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "nd", "rk", "x"]

_SUFFIX_ORG = ["Labs", "Group", "Works", "Systems", "Holdings", "Foundry"]
_SUFFIX_UNI = ["University", "Institute", "College", "Academy"]

MAJORS = ["physics", "botany", "geology", "history", "chemistry", "music", "law",
          "medicine", "economics", "poetry", "astronomy", "zoology", "linguistics",
          "sculpture", "architecture", "philosophy", "statistics", "anatomy",
          "oceanography", "theology", "robotics", "ecology", "cartography", "optics"]
HOBBIES = ["chess", "sailing", "pottery", "archery", "fencing", "gardening", "rowing",
           "knitting", "juggling", "painting", "fishing", "climbing", "cycling",
           "origami", "birdwatching", "baking", "skating", "surfing", "hiking",
           "calligraphy", "woodworking", "dancing", "singing", "swimming"]
INDUSTRIES = ["shipping", "mining", "textiles", "banking", "farming", "software",
              "printing", "brewing", "aviation", "insurance", "glassmaking",
              "publishing", "forestry", "robotics", "fishing", "tourism"]
LANDMARKS = ["lighthouse", "bridge", "cathedral", "harbour", "fortress", "market",
             "observatory", "library", "windmill", "aqueduct", "garden", "tower",
             "canal", "amphitheatre", "monastery", "waterfall"]
YEARS = [str(y) for y in range(1940, 2006)]
FOUNDED = [str(y) for y in range(1800, 1991, 5)]


def _word(rng: random.Random, n_syll: int) -> str:
    parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(n_syll)]
    return ("".join(parts) + rng.choice(_CODAS)).capitalize()


def _unique_words(rng: random.Random, n: int, taken: set[str], n_syll=(2, 3)) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        w = _word(rng, rng.choice(n_syll))
        if w not in taken and 4 <= len(w) <= 10:
            taken.add(w)
            out.append(w)
    return out


@lru_cache(maxsize=1)
def pools() -> dict[str, list[str]]:
    """All word pools, deterministic (seed fixed)."""
    rng = random.Random(20260603)
    taken: set[str] = set()
    first = _unique_words(rng, 120, taken)
    last = _unique_words(rng, 120, taken)
    cities = _unique_words(rng, 60, taken)
    regions = _unique_words(rng, 12, taken)
    rivers = _unique_words(rng, 20, taken)
    org_stems = _unique_words(rng, 48, taken)
    uni_stems = _unique_words(rng, 24, taken)
    orgs = [f"{s} {_SUFFIX_ORG[i % len(_SUFFIX_ORG)]}" for i, s in enumerate(org_stems)]
    unis = [f"{s} {_SUFFIX_UNI[i % len(_SUFFIX_UNI)]}" for i, s in enumerate(uni_stems)]
    return {
        "first_name": first, "last_name": last, "city": cities, "region": regions,
        "river": rivers, "org": orgs, "university": unis, "major": MAJORS,
        "hobby": HOBBIES, "industry": INDUSTRIES, "landmark": LANDMARKS,
        "year": YEARS, "founded": FOUNDED,
    }
