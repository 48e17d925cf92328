"""The paraphrase split: an evaluation-only "unseen" question family in the built-in world,
absent from pretraining, reported apart from the "seen" family."""
import random
import re

import pytest

from sleepray import pretrain_data
from sleepray.cycle import accuracy_by_phrasing
from sleepray.eval_report import methods_table
from sleepray.seed import PROFILES
from sleepray.world import SCHEMA, UNSEEN_QUESTIONS, Fact, Probe, World, probes_for, probes_of


def _fragments(template: str) -> list[str]:
    """The fixed text of a template, its slots removed (longest first)."""
    return sorted((f for f in re.split(r"\{name\}|\{v\}", template) if f.strip()), key=len, reverse=True)


UNSEEN = [q for attrs in UNSEEN_QUESTIONS.values() for qs in attrs.values() for q in qs]
MARKERS = [_fragments(q)[0] for q in UNSEEN]  # each unseen template's longest fixed fragment


def test_unseen_family_covers_every_attribute_and_is_well_formed():
    assert set(UNSEEN_QUESTIONS) == set(SCHEMA)
    for kind, attrs in SCHEMA.items():
        assert set(UNSEEN_QUESTIONS[kind]) == set(attrs), kind
        for attr, qs in UNSEEN_QUESTIONS[kind].items():
            assert len(qs) == 2 and len(set(qs)) == 2, (kind, attr)
            for q in qs:
                assert q.count("{name}") == 1 and q.endswith("?") and "{v}" not in q, q
    assert len(set(MARKERS)) == len(MARKERS)  # the markers tell the templates apart
    assert all(len(m.strip()) >= 10 for m in MARKERS)


def test_unseen_wording_is_disjoint_from_seen_templates_and_documents():
    questions = [q for attrs in SCHEMA.values() for _, _, qs in attrs.values() for q in qs]
    documents = [d for attrs in SCHEMA.values() for _, docs, _ in attrs.values() for d in docs]
    assert not set(UNSEEN) & set(questions + documents)
    for t in questions + documents:
        assert not _leaks(t), (t, _leaks(t))
    for q in UNSEEN:  # nor the other way: no seen question's fixed text is part of an unseen one
        for t in questions:
            assert _fragments(t)[0].lower() not in q.lower(), (q, t)


def test_probes_for_gives_seen_then_unseen_with_the_same_answer():
    fact = Fact("Ada Vel", "person", "birth_city", "Trekoude")
    probes = probes_for(fact)
    seen, unseen = probes_of(probes, "seen"), probes_of(probes, "unseen")
    assert probes == seen + unseen
    assert [p.question for p in seen] == [q.format(name="Ada Vel") for q in SCHEMA["person"]["birth_city"][2]]
    assert [p.question for p in unseen] == [q.format(name="Ada Vel") for q in UNSEEN_QUESTIONS["person"]["birth_city"]]
    assert {p.answer for p in probes} == {"Trekoude"} and all(p.entity == "Ada Vel" for p in probes)
    assert Probe("q?", "a", "", "user").phrasing == "seen"  # the default keeps old constructors working
    with pytest.raises(ValueError, match="phrasing"):
        probes_of(probes, "other")
    ep = World(11, orgs_per_episode=1, places_per_episode=1).episode(0)
    assert {(p.entity, p.attribute) for p in probes_of(ep.probes, "unseen")} == {(f.entity, f.attribute)
                                                                              for f in ep.facts}


class _ByteTok:
    """A tokenizer stand-in: bytes, so the ids decode back to the exact text."""
    bos_token_id, eos_token_id, pad_token_id = 0, 1, 2

    def encode(self, text, add_special_tokens=False):
        return [b + 3 for b in text.encode()]

    @staticmethod
    def decode(ids):
        return bytes(i - 3 for i in ids if i >= 3).decode(errors="replace")


def _leaks(text: str) -> list[str]:
    low = text.lower()
    return [m for m in MARKERS if m.lower() in low]


def test_pretraining_paraphrases_are_disjoint_from_the_unseen_family():
    from sleepray.paraphrases import PRETRAIN_QUESTIONS
    forms = [q for attrs in PRETRAIN_QUESTIONS.values() for qs in attrs.values() for q in qs]
    assert not set(forms) & set(UNSEEN)
    for q in forms:
        assert not _leaks(q), (q, _leaks(q))
    for q in UNSEEN:
        for f in forms:
            assert _fragments(f)[0].lower() not in q.lower(), (q, f)


def test_pretraining_stream_and_tokenizer_corpus_hold_no_unseen_wording():
    tok = _ByteTok()
    n = 0
    for name, p in PROFILES.items():
        rng = random.Random(5)
        for _ in range(1500):
            ids, _ = pretrain_data.encode_example(tok, rng, p.shape, 4096, 4.0)
            text = tok.decode(ids)
            assert not _leaks(text), (name, _leaks(text), text)
            n += "\nQ: " in text or text.startswith("Q: ")
        rng = random.Random(6)
        for _ in range(500):
            ctx, qas = pretrain_data.qa_example(rng, p.shape)
            assert not _leaks(ctx + " ".join(q for q, _ in qas))
    assert n > 500  # questions were there to check
    for text in pretrain_data.tokenizer_corpus(0, 1500, 200):
        assert not _leaks(text), _leaks(text)


def test_markers_would_be_caught():
    ep = World(12).episode(0)
    assert any(_leaks(p.question) for p in probes_of(ep.probes, "unseen"))
    assert not any(_leaks(p.question) for p in probes_of(ep.probes, "seen"))


def test_accuracy_by_phrasing():
    probes = [Probe("a?", "x", "e", "a"), Probe("b?", "y", "e", "a", "unseen"), Probe("c?", "z", "e", "a", "unseen")]
    assert accuracy_by_phrasing(probes, ["x", "y", "no"]) == {"seen": 1.0, "unseen": 0.5}


def test_methods_table_shows_phrasing_columns_only_when_measured():
    stat = {"mean": 0.5, "std": 0.0, "n": 1}
    none = {"mean": None, "std": None, "n": 0}
    keys = ("ACC", "BWT", "FWT", "LA", "ACC_in_context", "F1", "drift", "drift_world", "seconds")
    old = {"methods": ["m"], "summary": {"m": {k: stat for k in keys}}}  # a schema 1 summary
    assert "seen" not in methods_table(old)
    new = {"methods": ["m"], "summary": {"m": {**{k: stat for k in keys}, "ACC_seen": stat, "ACC_unseen": stat,
                                               "LA_seen": stat, "LA_unseen": stat, "ACC_in_context_seen": none,
                                               "ACC_in_context_unseen": none}}}
    head = methods_table(new).splitlines()[0]
    assert "| ACC seen | ACC unseen | LA seen | LA unseen |" in head and "in-context ACC seen" not in head


def test_run_table_shows_both_phrasings():
    from jobs.run import _shown, _summary
    probes = probes_of(World(13).episode(0).probes, "seen")[:5] + probes_of(World(13).episode(0).probes, "unseen")[:5]
    shown = [probes[i].phrasing for i in _shown(probes, 4)]
    assert shown == ["seen", "seen", "unseen", "unseen"]
    assert _shown(probes[:3], 8) == [0, 1, 2]
    table = _summary({"all": {"in context": [1.0, 0.5], "closed book": [0.0, 0.5]},
                      "seen": {"in context": [1.0, 1.0], "closed book": [0.0, 1.0]},
                      "unseen": {"in context": [1.0, 0.0], "closed book": [0.0, 0.0]}}).splitlines()
    assert table[0].split() == ["questions", "in", "context", "closed", "book"]
    assert [r.split() for r in table[1:]] == [["all", "0.75", "0.25"], ["seen", "1.00", "0.50"],
                                              ["unseen", "0.50", "0.00"]]


def test_cycle_evaluate_reports_each_phrasing(tmp_path, seed_test_model):
    from pathlib import Path

    from sleepray.config import load_config
    from sleepray.cycle import evaluate
    from sleepray.qa import evaluate_probes
    cfg = load_config(Path(__file__).resolve().parents[1] / "examples" / "eval_quick.yaml",
                      [f"model.path={seed_test_model}"])
    eps = World(cfg.world.seed, 1, 0, 0, 1).episodes(2)
    out = evaluate(cfg, tmp_path, eps)
    assert set(out["closed_book_by_phrasing"]) == {"seen", "unseen"}
    for ep in eps:
        by = {ph: out["closed_book_by_phrasing"][ph][ep.episode_id] for ph in ("seen", "unseen")}
        # as many questions of each family: the accuracy over all is their mean
        assert out["closed_book"][ep.episode_id] == pytest.approx((by["seen"] + by["unseen"]) / 2)
    # the bank evaluate loads (no version yet: the base model) answers as the base model does
    from sleepray.models import load_model
    model, tok = load_model(str(seed_test_model))
    ep = eps[0]
    assert out["closed_book_by_phrasing"]["unseen"][ep.episode_id] == pytest.approx(
        evaluate_probes(model, tok, probes_of(ep.probes, "unseen"), None).accuracy)
