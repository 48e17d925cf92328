"""The seed world: a deterministic stream of fictional entities and their facts.

``World(seed)`` makes people, organisations and places with attributes; each fact
has several phrasings (for documents) and question templates (for probes). The
stream is split into episodes: what arrives during one wake period.

Questions come in two phrasing families. ``"seen"``: the templates of ``SCHEMA``, which
the seed model meets in pretraining. ``"unseen"``: ``UNSEEN_QUESTIONS``, an
evaluation-only family of paraphrases: never in pretraining (``sleepray.pretrain_data``
takes seen probes only) and never in a sleep (no question enters memory:
``sleepray.stream``), so accuracy on it is the honest generalisation figure.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from sleepray.lexicon import pools

# attribute -> (value pool, document phrasings, question templates)
SCHEMA: dict[str, dict[str, tuple[str, list[str], list[str]]]] = {
    "person": {
        "birth_city": ("city", [
            "{name} was born in {v}.", "{name}'s birthplace is {v}.",
            "{name} came into the world in {v}."],
            ["Where was {name} born?", "What is {name}'s birthplace?"]),
        "birth_year": ("year", [
            "{name} was born in the year {v}.", "{name}'s birth year is {v}.",
            "The year {name} was born is {v}."],
            ["In what year was {name} born?", "What is {name}'s birth year?"]),
        "university": ("university", [
            "{name} studied at {v}.", "{name} graduated from {v}.",
            "{name} is an alumnus of {v}."],
            ["Where did {name} study?", "Which school did {name} graduate from?"]),
        "major": ("major", [
            "{name} majored in {v}.", "{name}'s field of study was {v}.",
            "{name} earned a degree in {v}."],
            ["What did {name} major in?", "What was {name}'s field of study?"]),
        "employer": ("org", [
            "{name} works for {v}.", "{name} is employed by {v}.",
            "{name}'s employer is {v}."],
            ["Who does {name} work for?", "Who employs {name}?"]),
        "hobby": ("hobby", [
            "{name} enjoys {v}.", "In free time, {name} likes {v}.",
            "{name}'s favourite pastime is {v}."],
            ["What does {name} enjoy?", "What is {name}'s favourite pastime?"]),
    },
    "org": {
        "hq_city": ("city", [
            "{name} is headquartered in {v}.", "The head office of {name} is in {v}.",
            "{name} has its headquarters in {v}."],
            ["Where is {name} headquartered?", "Where is the head office of {name}?"]),
        "founded": ("founded", [
            "{name} was founded in {v}.", "{name} dates back to {v}.",
            "The founding year of {name} is {v}."],
            ["When was {name} founded?", "What is the founding year of {name}?"]),
        "industry": ("industry", [
            "{name} operates in {v}.", "{name} is a company in {v}.",
            "The business of {name} is {v}."],
            ["What industry is {name} in?", "What is the business of {name}?"]),
    },
    "place": {
        "region": ("region", [
            "{name} lies in the region of {v}.", "{name} is part of {v}.",
            "The region of {name} is {v}."],
            ["In which region is {name}?", "What region is {name} part of?"]),
        "river": ("river", [
            "The river {v} flows through {name}.", "{name} stands on the river {v}.",
            "{name}'s river is the {v}."],
            ["Which river flows through {name}?", "What river does {name} stand on?"]),
        "landmark": ("landmark", [
            "{name} is known for its {v}.", "{name} is famous for its {v}.",
            "The pride of {name} is its {v}."],
            ["What is {name} known for?", "What is {name} famous for?"]),
    },
}

# kind -> attribute -> evaluation-only question templates (the "unseen" phrasing family):
# paraphrases in question forms that occur nowhere in SCHEMA's templates nor documents
UNSEEN_QUESTIONS: dict[str, dict[str, list[str]]] = {
    "person": {
        "birth_city": ["Which city is the hometown of {name}?", "{name} was born in which city?"],
        "birth_year": ["What was the year of {name}'s birth?", "{name} was born in which year?"],
        "university": ["At which institution was {name} a student?",
                       "What college or university did {name} attend?"],
        "major": ["Which subject did {name} specialise in?", "What was the subject of {name}'s degree?"],
        "employer": ["At which organisation does {name} have a job?", "Which company has {name} on its staff?"],
        "hobby": ["What activity does {name} do for fun?", "Which leisure activity does {name} love?"],
    },
    "org": {
        "hq_city": ["In which city is {name} based?", "Which city hosts the main offices of {name}?"],
        "founded": ["What year marks the establishment of {name}?", "{name} was set up in what year?"],
        "industry": ["Which sector does {name} belong to?", "What line of work is {name} engaged in?"],
    },
    "place": {
        "region": ["{name} is located in which region?", "Which territory contains {name}?"],
        "river": ["Along which river is {name} built?", "What is the name of the river in {name}?"],
        "landmark": ["Which sight draws visitors to {name}?", "What is the best-known attraction of {name}?"],
    },
}
PHRASINGS = ("seen", "unseen")

QA_FORMAT = "Q: {q}\nA:"


@dataclass(frozen=True)
class Fact:
    entity: str
    kind: str
    attribute: str
    value: str


@dataclass(frozen=True)
class Probe:
    """A question about one fact; ``answer`` is the ground truth (evaluation only).

    ``phrasing``: ``"seen"`` (a template of ``SCHEMA``, met in pretraining) or ``"unseen"``
    (an evaluation-only template of ``UNSEEN_QUESTIONS``).
    """
    question: str
    answer: str
    entity: str
    attribute: str
    phrasing: str = "seen"


@dataclass
class Episode:
    """What arrives during one wake period: documents, and the facts they hold.

    ``probes`` of a world episode: every seen-phrasing probe, then every unseen one.
    """
    episode_id: str
    documents: list[str]
    facts: list[Fact]
    probes: list[Probe] = field(default_factory=list)

    @property
    def context(self) -> str:
        return "\n".join(self.documents)


def render_fact(fact: Fact, phrasing: int) -> str:
    _, phr, _ = SCHEMA[fact.kind][fact.attribute]
    return phr[phrasing % len(phr)].format(name=fact.entity, v=fact.value)


def probes_for(fact: Fact) -> list[Probe]:
    """The seen-phrasing probes of ``fact`` (SCHEMA's order), then the unseen ones."""
    _, _, qs = SCHEMA[fact.kind][fact.attribute]
    return ([Probe(q.format(name=fact.entity), fact.value, fact.entity, fact.attribute) for q in qs]
            + [Probe(q.format(name=fact.entity), fact.value, fact.entity, fact.attribute, "unseen")
               for q in UNSEEN_QUESTIONS[fact.kind][fact.attribute]])


def probes_of(probes: list[Probe], phrasing: str) -> list[Probe]:
    """The probes of one phrasing family, in order."""
    if phrasing not in PHRASINGS:
        raise ValueError(f"unknown phrasing {phrasing!r} (choose from {PHRASINGS})")
    return [p for p in probes if p.phrasing == phrasing]


def qa_prompt(question: str, context: str | None = None) -> str:
    """The prompt format the seed model is pretrained on (context optional)."""
    qa = QA_FORMAT.format(q=question)
    return f"{context}\n{qa}" if context else qa


class World:
    """A deterministic world: ``World(seed).episode(i)`` is the same on every machine."""

    def __init__(self, seed: int = 0, people_per_episode: int = 4, orgs_per_episode: int = 1,
                 places_per_episode: int = 1, phrasings_per_fact: int = 2):
        self.seed = seed
        self.sizes = {"person": people_per_episode, "org": orgs_per_episode,
                      "place": places_per_episode}
        self.phrasings = phrasings_per_fact
        self._p = pools()
        self._rng = random.Random(seed)
        self._episodes: list[Episode] = []
        self._used_names: set[str] = set()
        self._orgs = list(self._p["org"])
        self._places = list(self._p["city"])
        self._rng.shuffle(self._orgs)
        self._rng.shuffle(self._places)

    @classmethod
    def from_config(cls, wc) -> "World":
        return cls(wc.seed, wc.people_per_episode, wc.orgs_per_episode,
                   wc.places_per_episode, wc.phrasings_per_fact)

    def episode(self, i: int) -> Episode:
        while len(self._episodes) <= i:
            self._episodes.append(self._make(len(self._episodes)))
        return self._episodes[i]

    def episodes(self, n: int) -> list[Episode]:
        return [self.episode(i) for i in range(n)]

    # -- generation ------------------------------------------------------------------
    def _person_name(self) -> str:
        for _ in range(10_000):
            name = f"{self._rng.choice(self._p['first_name'])} {self._rng.choice(self._p['last_name'])}"
            if name not in self._used_names:
                self._used_names.add(name)
                return name
        raise RuntimeError("person name pool exhausted")

    def _take(self, pool: list[str], kind: str) -> str:
        if not pool:
            raise RuntimeError(f"{kind} name pool exhausted: use fewer {kind}s per episode or episodes")
        return pool.pop()

    def _entity_facts(self, kind: str, name: str) -> list[Fact]:
        return [Fact(name, kind, attr, self._rng.choice(self._p[pool_name]))
                for attr, (pool_name, _, _) in SCHEMA[kind].items()]

    def _make(self, idx: int) -> Episode:
        facts: list[Fact] = []
        firsts, lasts = set(), set()
        for _ in range(self.sizes["person"]):
            # distinct first and last names inside one episode keep references unambiguous
            for _ in range(1000):
                name = self._person_name()
                f, l = name.split(" ")
                if f not in firsts and l not in lasts:
                    break
            firsts.add(f)
            lasts.add(l)
            facts += self._entity_facts("person", name)
        for _ in range(self.sizes["org"]):
            facts += self._entity_facts("org", self._take(self._orgs, "org"))
        for _ in range(self.sizes["place"]):
            facts += self._entity_facts("place", self._take(self._places, "place"))
        documents = self._documents(facts)
        probes = [p for f in facts for p in probes_for(f)]
        probes.sort(key=lambda p: p.phrasing != "seen")  # stable: every seen probe, then every unseen one
        return Episode(f"w{self.seed}-e{idx}", documents, facts, probes)

    def _documents(self, facts: list[Fact]) -> list[str]:
        by_entity: dict[str, list[Fact]] = {}
        for f in facts:
            by_entity.setdefault(f.entity, []).append(f)
        docs = []
        for version in range(self.phrasings):
            for ent_facts in by_entity.values():
                order = list(ent_facts)
                self._rng.shuffle(order)
                n_phr = len(SCHEMA[order[0].kind][order[0].attribute][1])
                docs.append(" ".join(render_fact(f, (version + self._rng.randrange(n_phr)) % n_phr)
                                     for f in order))
        return docs


def chance_accuracy(probes: list[Probe], kind_of: dict[str, str] | None = None) -> float:
    """Expected exact-match accuracy of guessing uniformly from each attribute's value pool."""
    p = pools()
    total = 0.0
    for pr in probes:
        for kind, attrs in SCHEMA.items():
            if pr.attribute in attrs:
                total += 1.0 / len(p[attrs[pr.attribute][0]])
                break
    return total / max(1, len(probes))
