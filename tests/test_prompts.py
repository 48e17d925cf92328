import random

from sleepray.prompts import consolidation_prompts, continuation_prefixes
from sleepray.world import Episode, World


def test_prompts_come_from_the_episode_and_never_hold_answers():
    ep = World(11, people_per_episode=2).episode(0)
    prompts = consolidation_prompts(ep, 40, random.Random(0))
    assert len(prompts) == 40
    kinds = {p.kind for p in prompts}
    assert kinds == {"probe", "prefix"}
    answers = {p.answer for p in ep.probes}
    for p in prompts:
        assert p.context == ep.context and p.teacher_prompt.endswith(p.prompt)
        if p.kind == "probe":
            assert p.prompt.startswith("Q: ") and p.prompt.endswith("\nA:")
            assert not any(a in p.prompt for a in answers)
        else:
            assert p.prompt in ep.context  # a true prefix of a document sentence


def test_prefixes_leave_words_out():
    prefixes = continuation_prefixes(["Ann Lee was born in Rome. Ann Lee likes tea."], random.Random(1))
    assert len(prefixes) == 2
    for p in prefixes:
        assert 2 <= len(p.split()) < 6


def test_free_text_uses_the_question_writer():
    ep = Episode("u1", ["Zed keeps bees on the roof."], facts=[])
    asked = []

    def writer(context, k):
        asked.append(context)
        return ["What does Zed keep?"] * k

    prompts = consolidation_prompts(ep, 4, random.Random(0), write_questions=writer)
    assert asked == [ep.context]
    assert {p.kind for p in prompts} == {"query", "prefix"}


def test_every_probe_question_is_asked_before_any_is_asked_twice():
    ep = World(12, people_per_episode=1, orgs_per_episode=0, places_per_episode=1).episode(0)
    n_questions = len({p.question for p in ep.probes})
    prompts = consolidation_prompts(ep, 2 * n_questions + 6, random.Random(3))
    asked = [p.prompt for p in prompts if p.kind == "probe"]
    assert len(asked) == n_questions + 3
    assert len(set(asked[:n_questions])) == n_questions  # all of them, once each, first
    prefixes = continuation_prefixes(ep.documents, random.Random(0))
    only_questions = consolidation_prompts(Episode("q", [], facts=[], probes=ep.probes), 5, random.Random(0))
    assert [p.kind for p in only_questions] == ["probe"] * 5 and prefixes
