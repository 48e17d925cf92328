"""The dream formats the seed model is pretrained to write (REM's cues)."""
import random

import pytest

from sleepray import pretrain_data
from sleepray.dream_formats import FORMAT_CUES, dream_prompt, written_dream
from sleepray.models import load_model
from sleepray.replay import Dream
from sleepray.world import World


@pytest.fixture(scope="module")
def episode():
    return World(10_000_901, 1, 0, 1, 2).episode(0)


@pytest.mark.parametrize("fmt", sorted(FORMAT_CUES))
def test_a_written_dream_states_every_fact(episode, fmt):
    text = written_dream(episode.facts, fmt, random.Random(0))
    for f in episode.facts:
        assert f.value in text
    sft = Dream(episode.episode_id, fmt, dream_prompt(episode.context, fmt), text).sft_text
    assert sft.endswith("\n") and not sft.endswith("\n\n")  # the last line ends, as in pretraining
    if fmt == "qa":  # question / answer pairs in the QA format the model answers in
        lines = sft.splitlines()
        assert len(lines) == 2 * len(episode.facts)
        assert all(q.startswith("Q: ") and a.startswith("A: ") for q, a in zip(lines[::2], lines[1::2]))
    elif fmt == "implications":  # one statement per line
        assert len(sft.splitlines()) == len(episode.facts)
    else:
        assert "\n" not in sft.rstrip("\n") and sft.count(".") >= len(episode.facts)


def test_unknown_format_is_an_error(episode):
    with pytest.raises(ValueError, match="unknown dream format"):
        dream_prompt(episode.context, "poem")
    with pytest.raises(ValueError, match="unknown dream format"):
        written_dream(episode.facts, "poem", random.Random(0))


def test_pretraining_dream_examples_put_the_loss_on_the_dream_only(seed_test_model):
    _, tok = load_model(str(seed_test_model))
    shape = pretrain_data.Shape(max_people=1, max_orgs=0, max_places=1, p_dream=1.0, p_general=0.0)
    rng = random.Random(3)
    for _ in range(20):
        ids, w = pretrain_data.encode_example(tok, rng, shape, 400, 4.0, doc_weight=0.5)
        assert len(ids) == len(w) and ids[-1] == tok.eos_token_id
        text = tok.decode(ids)
        cue = next(c for c in FORMAT_CUES.values() if c in text)
        n_prompt = len(tok.encode(text[: text.index(cue) + len(cue)].replace("<|bos|>", ""),
                                  add_special_tokens=False)) + 1
        assert set(w[:n_prompt]) == {0.5} and set(w[n_prompt:]) == {1.0}
