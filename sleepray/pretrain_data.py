"""Pretraining examples for the seed model: read facts from context, answer questions.

Each example is documents about a few fresh entities followed by questions and
answers about them, or by a dream about them in one of REM's formats
(``sleepray.dream_formats``), or a paragraph of general text. Entities come from training
worlds (seeds below ``EVAL_WORLD_SEED_MIN``), so evaluation worlds stay unseen. Questions
are never in the unseen phrasing family (``sleepray.world.UNSEEN_QUESTIONS``), which is
evaluation-only: probes are taken in the seen family only (SCHEMA's templates, or a form
of ``sleepray.paraphrases`` with ``Shape.p_paraphrase``).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from sleepray import general_text
from sleepray.dream_formats import FORMAT_CUES, dream_prompt, written_dream
from sleepray.lexicon import pools
from sleepray.paraphrases import pretraining_questions
from sleepray.world import QA_FORMAT, Fact, Probe, World, probes_of, render_fact

TRAIN_WORLD_SEED_MAX = 10_000_000
EVAL_WORLD_SEED_MIN = 10_000_000  # worlds used by evaluation and by default configs are >= this or small


@dataclass
class Shape:
    max_people: int = 4
    max_orgs: int = 1
    max_places: int = 1
    max_phrasings: int = 2
    questions: int = 8
    p_general: float = 0.15
    p_cloze: float = 0.0  # questions asked as the fact's own sentence, cut before the value
    p_repeat: float = 0.0  # copy drills: a list of world words, then the same list again
    p_partial: float = 0.0  # contexts of a random subset of the facts (as few as one)
    p_dream: float = 0.0  # documents, a dream format's cue, then a dream in that format (REM's dreams)
    p_paraphrase: float = 0.0  # a question in a random pretraining form (sleepray.paraphrases), not SCHEMA's own


def _training_episode(rng: random.Random, shape: Shape) -> tuple[str, list[Fact], list[Probe]]:
    """(context, facts, probes) of a fresh random training world's episode, or of a random
    subset of its facts (``shape.p_partial``). Probes: seen phrasing only (``sleepray.world``:
    the unseen family is evaluation-only)."""
    world = World(seed=rng.randrange(1, TRAIN_WORLD_SEED_MAX),
                  people_per_episode=rng.randint(1, shape.max_people),
                  orgs_per_episode=rng.randint(0, shape.max_orgs),
                  places_per_episode=rng.randint(0, shape.max_places),
                  phrasings_per_fact=rng.randint(1, shape.max_phrasings))
    ep = world.episode(0)
    probes = probes_of(ep.probes, "seen")
    if rng.random() < shape.p_partial:
        # short contexts make the copy signal strong early: as few as one fact
        facts = rng.sample(ep.facts, rng.randint(1, len(ep.facts)))
        context = " ".join(render_fact(f, rng.randrange(3)) for f in facts)
        keep = {(f.entity, f.attribute) for f in facts}
        return context, facts, [p for p in probes if (p.entity, p.attribute) in keep]
    return ep.context, ep.facts, probes


def qa_example(rng: random.Random, shape: Shape) -> tuple[str, list[tuple[str, str]]]:
    """(context, [(question-prompt, answer)]) from a fresh random training world."""
    context, facts, probes = _training_episode(rng, shape)
    probes = rng.sample(probes, min(shape.questions, len(probes)))
    facts_by_key = {(f.entity, f.attribute): f for f in facts}
    qas = []
    for p in probes:
        if rng.random() < shape.p_cloze:
            fact = facts_by_key[(p.entity, p.attribute)]
            sentence = render_fact(fact, rng.randrange(3))
            cut = sentence.rfind(" " + fact.value)
            if cut > 0 and sentence.endswith(fact.value + "."):
                qas.append((QA_FORMAT.format(q=sentence[:cut] + " ..."), p.answer))
                continue
        if shape.p_paraphrase and rng.random() < shape.p_paraphrase:
            form = rng.choice(pretraining_questions(p.attribute))
            qas.append((QA_FORMAT.format(q=form.format(name=p.entity)), p.answer))
            continue
        qas.append((QA_FORMAT.format(q=p.question), p.answer))
    return context, qas


def encode_example(tok, rng: random.Random, shape: Shape, seq_len: int, answer_weight: float,
                   doc_weight: float = 1.0, question_weight: float = 0.0):
    """Token ids and per-token loss weights (answers weigh ``answer_weight``, questions
    ``question_weight``: a model that learns to write questions about its context can write
    its own consolidation data in a sleep)."""
    if rng.random() < shape.p_general:
        text = general_text.paragraph(rng, rng.randint(3, 12))
        ids = [tok.bos_token_id] + tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
        ids = ids[:seq_len]
        return ids, [1.0] * len(ids)
    if rng.random() < shape.p_repeat:
        return repeat_example(tok, rng, seq_len)
    if shape.p_dream and rng.random() < shape.p_dream:
        return dream_example(tok, rng, shape, seq_len, doc_weight)
    context, qas = qa_example(rng, shape)
    ids = [tok.bos_token_id] + tok.encode(context + "\n", add_special_tokens=False)
    w = [doc_weight] * len(ids)
    for q, a in qas:
        q_ids = tok.encode(q, add_special_tokens=False)
        a_ids = tok.encode(" " + a + "\n", add_special_tokens=False)
        if len(ids) + len(q_ids) + len(a_ids) > seq_len:
            break
        ids += q_ids + a_ids
        w += [question_weight] * len(q_ids) + [answer_weight] * len(a_ids)
    return ids[:seq_len], w[:seq_len]


def dream_example(tok, rng: random.Random, shape: Shape, seq_len: int, doc_weight: float = 1.0):
    """Documents, a dream format's cue, then a faithful dream in that format; the loss is on
    the dream (and its end), so the seed model can write REM's dreams."""
    context, facts, _ = _training_episode(rng, shape)
    fmt = rng.choice(sorted(FORMAT_CUES))
    prompt = [tok.bos_token_id] + tok.encode(dream_prompt(context, fmt), add_special_tokens=False)
    dream = tok.encode(written_dream(facts, fmt, rng), add_special_tokens=False) + [tok.eos_token_id]
    ids = (prompt + dream)[:seq_len]
    w = ([doc_weight] * len(prompt) + [1.0] * len(dream))[:seq_len]
    return ids, w


def repeat_example(tok, rng: random.Random, seq_len: int):
    """A copy drill: random world words, then the same words; the loss is on the copy.

    Copying from context is what reading facts needs, and a model learns the copy
    circuit (induction heads) far faster from drills than from facts alone.
    """
    words = [w for pool in ("first_name", "last_name", "city", "org", "major", "year")
             for w in rng.sample(pools()[pool], 3)]
    rng.shuffle(words)
    first = tok.encode(" " + " ".join(words[: rng.randint(6, len(words))]), add_special_tokens=False)
    first = first[: (seq_len - 1) // 2]
    ids = [tok.bos_token_id] + first + first
    return ids, [0.0] * (1 + len(first)) + [1.0] * len(first)


def batch(tok, rng: random.Random, shape: Shape, batch_size: int, seq_len: int,
          answer_weight: float = 4.0, doc_weight: float = 1.0,
          question_weight: float = 0.0) -> dict[str, torch.Tensor]:
    rows = [encode_example(tok, rng, shape, seq_len, answer_weight, doc_weight, question_weight)
            for _ in range(batch_size)]
    n = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((batch_size, n), tok.pad_token_id, dtype=torch.long)
    weights = torch.zeros((batch_size, n))
    attn = torch.zeros((batch_size, n), dtype=torch.long)
    for i, (ids, w) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        weights[i, : len(w)] = torch.tensor(w)
        attn[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attn, "weights": weights}


def tokenizer_corpus(seed: int, n_worlds: int, n_general: int):
    """Texts for tokenizer training: world documents, questions, answers and general text."""
    rng = random.Random(seed)
    for _ in range(n_worlds):
        ctx, qas = qa_example(rng, Shape(max_people=6, max_phrasings=3, questions=20))
        yield ctx + "\n" + "\n".join(f"{q} {a}" for q, a in qas)
    yield from general_text.corpus(seed, n_general)
