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
