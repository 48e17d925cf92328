from sleepray.general_text import corpus
from sleepray.lexicon import pools
from sleepray.world import SCHEMA, UNSEEN_QUESTIONS, World, chance_accuracy, probes_of, qa_prompt, render_fact


def test_world_is_deterministic_by_seed():
    a, b, c = World(3).episodes(3), World(3).episodes(3), World(4).episodes(3)
    assert [e.documents for e in a] == [e.documents for e in b]
    assert [e.documents for e in a] != [e.documents for e in c]


def test_episode_shape_and_unique_entities():
    w = World(1, people_per_episode=3, orgs_per_episode=1, places_per_episode=2, phrasings_per_fact=2)
    eps = w.episodes(4)
    entities = [f.entity for e in eps for f in e.facts]
    kinds = {}
    for e in eps:
        for f in e.facts:
            kinds.setdefault(f.entity, f.kind)
    # every entity lives in one episode only: new facts arrive in every wake period
    per_episode = [{f.entity for f in e.facts} for e in eps]
    assert sum(len(s) for s in per_episode) == len(set(entities)) == 4 * 6
    assert sorted(kinds.values()).count("person") == 12
    for e in eps:
        # one document per entity and phrasing version
        assert len(e.documents) == 2 * 6
        # every seen-phrasing probe, then every unseen-phrasing one
        n_seen = sum(len(SCHEMA[f.kind][f.attribute][2]) for f in e.facts)
        n_unseen = sum(len(UNSEEN_QUESTIONS[f.kind][f.attribute]) for f in e.facts)
        assert len(e.probes) == n_seen + n_unseen
        assert [p.phrasing for p in e.probes] == ["seen"] * n_seen + ["unseen"] * n_unseen
        assert len(probes_of(e.probes, "seen")) == n_seen


def test_every_fact_is_in_the_documents_in_several_phrasings():
    ep = World(2, phrasings_per_fact=3).episode(0)
    for f in ep.facts:
        renders = {render_fact(f, k) for k in range(3)}
        assert len(renders) == 3
        assert any(r in ep.context for r in renders)
        assert f.value in ep.context and f.entity in ep.context


def test_probes_ask_about_facts_and_values_come_from_pools():
    ep = World(5).episode(0)
    p = pools()
    for pr in ep.probes:
        assert pr.entity in pr.question
        assert pr.answer not in pr.question
        fact = next(f for f in ep.facts if f.entity == pr.entity and f.attribute == pr.attribute)
        assert fact.value == pr.answer
        pool = SCHEMA[fact.kind][fact.attribute][0]
        assert pr.answer in p[pool]
    assert 0 < chance_accuracy(ep.probes) < 0.1


def test_prompt_format():
    assert qa_prompt("Where?") == "Q: Where?\nA:"
    assert qa_prompt("Where?", "Doc.") == "Doc.\nQ: Where?\nA:"


def test_general_text_is_deterministic_and_varied():
    a, b = corpus(1, 20), corpus(1, 20)
    assert a == b and len(set(a)) == 20
    assert corpus(2, 5) != corpus(1, 5)
