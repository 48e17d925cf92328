import random

from sleepray.prompts import consolidation_prompts, continuation_prefixes, grounded
from sleepray.world import Episode, World


def _writer(questions, asked=None):
    def write(context, k):
        if asked is not None:
            asked.append((context, k))
        return list(questions)[:k]
    return write


def test_prompts_are_self_written_questions_and_prefixes_never_the_episodes_probes():
    ep = World(11, people_per_episode=2).episode(0)
    asked = []
    own = ["Who is the person in the first document?", "Where does the river flow?"]
    prompts = consolidation_prompts(ep, 40, random.Random(0), _writer(own, asked))
    assert len(prompts) == 40 and asked == [(ep.context, 20)]  # the writer sees the documents, nothing else
    assert {p.kind for p in prompts} == {"query", "prefix"}
    evaluation = {p.question for p in ep.probes} | {p.answer for p in ep.probes}
    for p in prompts:
        assert p.context == ep.context and p.teacher_prompt.endswith(p.prompt)
        assert not any(e in p.prompt for e in evaluation if len(e) > 3)
        if p.kind == "query":
            assert p.prompt in {f"Q: {q}\nA:" for q in own}
        else:
            assert p.prompt in ep.context  # a true prefix of a document sentence
    # the evaluation's questions change nothing: the same prompts without them
    bare = Episode(ep.episode_id, ep.documents, [], [])
    again = consolidation_prompts(bare, 40, random.Random(0), _writer(own))
    assert [p.prompt for p in again] == [p.prompt for p in prompts]


def test_without_a_question_writer_every_prompt_is_a_prefix():
    ep = World(11, people_per_episode=1).episode(0)
    assert ep.probes  # the episode has evaluation questions, and none of them is used
    prompts = consolidation_prompts(ep, 10, random.Random(0))
    assert [p.kind for p in prompts] == ["prefix"] * 10
    empty_writer = consolidation_prompts(ep, 10, random.Random(0), _writer([]))
    assert [p.kind for p in empty_writer] == ["prefix"] * 10


def test_prefixes_leave_words_out():
    prefixes = continuation_prefixes(["Ann Lee was born in Rome. Ann Lee likes tea."], random.Random(1))
    assert len(prefixes) == 2
    for p in prefixes:
        assert 2 <= len(p.split()) < 6


def test_every_written_question_is_asked_before_any_is_asked_twice():
    ep = World(12, people_per_episode=1, orgs_per_episode=0, places_per_episode=1).episode(0)
    own = [f"What is fact {i} of Zorba?" for i in range(5)]
    prompts = consolidation_prompts(ep, 16, random.Random(3), _writer(own * 3))
    asked = [p.prompt for p in prompts if p.kind == "query"]
    assert len(asked) == 8 and len(set(asked[:5])) == 5  # all of them, once each, first
    # a text with no sentences to cut: every prompt is a question
    only_questions = consolidation_prompts(Episode("q", ["Zorba"], []), 5, random.Random(0), _writer(own))
    assert [p.kind for p in only_questions] == ["query"] * 5


def test_a_question_must_name_something_of_the_episode():
    context = "Vandrel Okoth was born in Brisa. Vandrel Okoth works for Kelmo Labs."
    assert grounded("Where was Vandrel Okoth born?", context)
    assert grounded("Who employs okoth?", context)  # case does not matter
    assert not grounded("Where was Zibber Plonk born?", context)
    assert not grounded("Who is it?", context)  # short words do not count
    assert grounded("What is Okoth's birthplace?", context)  # a possessive names the same person


def test_text_without_a_full_stop_still_gives_prefixes():
    assert continuation_prefixes(["Ann Lee lives in Paris"], random.Random(0))
    ep = Episode("m", ["Ann Lee lives in Paris"], [])
    assert [p.kind for p in consolidation_prompts(ep, 3, random.Random(0))] == ["prefix"] * 3
