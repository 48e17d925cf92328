"""REM (Dreaming) on the `test` seed model with tiny settings: dreams, selection, trials,
ReST-EM, dream SFT with replay, the rehearsal buffer, and no ground-truth leak."""
import ast
import dataclasses
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import sleepray.dreams as dreams_mod
import sleepray.rem as rem
import sleepray.retention as retention
from sleepray import lm
from sleepray.config import REMConfig, load_config
from sleepray.experts import ExpertBank
from sleepray.models import load_model
from sleepray.replay import BUFFER_COLUMNS, BUFFER_SCHEMA, Dream, ReplayBuffer, probe_row
from sleepray.world import Episode, Probe, World

TINY = ["rem.dreams_per_episode=4", "rem.keep_top_k=2", "rem.keep_random=1", "rem.trial_steps=2",
        "rem.restem_steps=2", "rem.sft_steps=3", "rem.max_new_tokens=24", "rem.batch_size=4",
        "rem.probes_per_episode=4"]


@pytest.fixture(scope="module")
def rcfg():
    return load_config(None, TINY).rem


@pytest.fixture(scope="module")
def episode():
    return World(10_000_321, 1, 0, 0, 1).episode(0)


@pytest.fixture
def bank_tok(seed_test_model):
    cfg = load_config(None, ["experts.rank=4"])
    model, tok = load_model(str(seed_test_model))
    bank = ExpertBank(model, cfg.experts)
    bank.open_new_expert()
    return bank, tok


def _hand_dreams(episode):
    first = episode.documents[0].split(". ")
    texts = [first[0] + ".", " ".join(first[1:3]), "Q: " + episode.probes[0].question, "Nothing at all."]
    return [Dream(episode.episode_id, f, episode.context + rem.FORMAT_CUES[f], t)
            for f, t in zip(["implications", "rewrite", "qa", "implications"], texts)]


def _state(bank):
    return ({n: p.detach().clone() for n, p in bank.model.named_parameters()},
            {n: p.requires_grad for n, p in bank.model.named_parameters()},
            list(bank.model.active_adapters))


def _changed(bank, before):
    return {n for n, p in bank.model.named_parameters() if not torch.equal(p, before[n])}


def _targets(episode):  # probe targets without a model: the documents' own wording, not Probe.answer
    return [rem.ProbeTarget(episode.episode_id, q, a) for q, a in
            [(episode.probes[0].question, episode.documents[0].split()[-1].rstrip("."))]]


def test_random_expert_changes_dreams_and_restores_state(bank_tok, episode, rcfg):
    """At the default rem.random_expert_scale the random expert is a small perturbation: against the
    same sampling noise without it, it changes some of the dreams on the test model (6 of these 32:
    about one in five; at 0.5, 24), so several draws are compared. The bank comes back exactly."""
    bank, tok = bank_tok
    assert rcfg.random_expert_scale == REMConfig.model_fields["random_expert_scale"].default
    params, grads, active = _state(bank)
    off_cfg = rcfg.model_copy(update={"random_expert": False})
    on = [rem.write_dreams(bank, tok, episode, rcfg, random.Random(seed)) for seed in range(8)]
    assert _changed(bank, params) == set()
    assert {n: p.requires_grad for n, p in bank.model.named_parameters()} == grads
    assert list(bank.model.active_adapters) == active and bank.free_slots == bank.slots[1:]
    off = [rem.write_dreams(bank, tok, episode, off_cfg, random.Random(seed)) for seed in range(8)]
    again = rem.write_dreams(bank, tok, episode, off_cfg, random.Random(0))
    assert [d.text for d in off[0]] == [d.text for d in again]  # same seed, same dreams
    changed = sum(a.text != b.text for dreams_on, dreams_off in zip(on, off) for a, b in zip(dreams_on, dreams_off))
    assert changed > 0  # only the random expert differs
    assert len(on[0]) == 4 and [d.format for d in on[0]] == ["implications", "qa", "rewrite", "implications"]
    assert on[0][1].prompt == episode.context + "\nQ:" and on[0][0].prompt.endswith("\nImplications:\n")


def test_dreams_are_not_cut_at_the_first_newline(bank_tok, episode, rcfg, monkeypatch):
    """Dreams span several lines: sampling stops at EOS or the length only. (Whether a given
    test-model build happens to write a newline depends on the build, so the call is checked.)"""
    bank, tok = bank_tok
    calls = []
    real = dreams_mod.sample_ids

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(dreams_mod, "sample_ids", spy)
    dreams = rem.write_dreams(bank, tok, episode, rcfg, random.Random(0))
    assert calls and all(c["stop"] == () for c in calls) and len(dreams) == 4


def test_dreams_written_by_an_engine_through_the_exported_adapter_match_the_learners(
        bank_tok, episode, rcfg, tmp_path, seed_test_model):
    """``DreamRollouts``: the frozen experts, the random expert and the dream writer go to a real
    generation engine (transformers here; vLLM on Ray in tests/test_actors.py) as ONE exported
    adapter; near-greedy, its dreams are the learner's own, draw for draw, and the bank comes
    back exactly."""
    from sleepray.config import EngineConfig
    from sleepray.dream_writer import DreamWriter
    from sleepray.engines.factory import make_engine
    bank, tok = bank_tok
    frozen = bank.training
    with torch.no_grad():                                   # an on-expert that does something
        for p in bank.slot_parameters(frozen):
            p.add_(0.05 * torch.randn_like(p))
    bank.freeze_current()
    bank.open_new_expert()
    writer = DreamWriter(bank, tok, rank=4)
    with torch.no_grad():
        for p in writer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    greedy = rcfg.model_copy(update={"temperature": 1e-5, "max_new_tokens": 12})
    params, grads, active = _state(bank)
    engine = make_engine("transformers", str(seed_test_model), EngineConfig(), device="cpu")

    def generate(reqs, adapters):
        for name, path in adapters.items():
            engine.load_adapter(name, path)
        return engine.generate(reqs)

    rollouts = dreams_mod.DreamRollouts(generate, tmp_path, "s0001-dream")
    try:
        remote = rem.write_dreams(bank, tok, episode, greedy, random.Random(3), writer, rollouts)
    finally:
        engine.close()
    local = rem.write_dreams(bank, tok, episode, greedy, random.Random(3), writer)
    assert [d.text for d in remote] == [d.text for d in local] and any(d.text for d in local)
    [name] = rollouts.published
    import json
    conf = json.loads((tmp_path / name / "adapter_config.json").read_text())
    assert conf["r"] == 4 + 4 + 4                           # frozen expert + random expert + writer
    assert _changed(bank, params) == set() and list(bank.model.active_adapters) == active
    assert {n: p.requires_grad for n, p in bank.model.named_parameters()} == grads


def test_scores_and_selection(bank_tok, episode):
    bank, tok = bank_tok
    dreams = _hand_dreams(episode)
    from sleepray.prompts import grounded, model_question_writer
    memory = Episode(episode.episode_id, episode.documents, [], [])  # what a sleep gets: no questions
    targets = rem.teacher_probe_targets(bank, tok, memory, 4, model_question_writer(bank, tok, seed=0))
    assert len(targets) == 4 and all(t.target for t in targets)
    assert all(t.question.endswith("?") and grounded(t.question, episode.context) for t in targets)
    with torch.no_grad():  # an expert that is not zero, as after NREM: every tensor has a gradient
        for p in bank.trainable_parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    norms = rem.score_dreams(bank, tok, dreams, targets, "grad_norm")
    align = rem.score_dreams(bank, tok, dreams, targets, "grad_align")
    assert all(p.grad is None for p in bank.model.parameters())
    # the scores as specified: the dream's SFT gradient on the expert, its norm and its cosine with
    # the gradient of the closed-book probe loss
    params = bank.trainable_parameters()

    def grad(texts, prompts=None):
        nll, cnt = lm.token_nll(bank.model, tok, texts, prompts)
        return torch.cat([g.flatten() for g in torch.autograd.grad(nll.sum() / cnt.sum(), params)])

    probe = grad([t.text for t in targets], [t.prompt for t in targets])
    dream_grads = [grad([d.sft_text]) for d in dreams]
    assert norms == pytest.approx([float(g.norm()) for g in dream_grads], rel=1e-4)
    assert align == pytest.approx([float(torch.cosine_similarity(g, probe, dim=0)) for g in dream_grads],
                                  abs=1e-4)
    assert len(set(align)) == len(align)  # distinct: the order below is the scores', not the dreams'
    # selection: the top k by score, in order, then b of the others at random
    order = sorted(range(len(dreams)), key=lambda i: -align[i])
    kept = rem.select(dreams, align, 2, 1, random.Random(0))
    assert [id(d) for d in kept[:2]] == [id(dreams[i]) for i in order[:2]]
    assert id(kept[2]) in {id(dreams[i]) for i in order[2:]}
    assert {id(rem.select(dreams, align, 2, 1, random.Random(r))[2]) for r in range(20)} == \
        {id(dreams[i]) for i in order[2:]}  # the random one: any of the rest
    assert rem.select_indices(align, 3, 5, random.Random(0))[:3] == order[:3]
    assert sorted(rem.select_indices(align, 3, 5, random.Random(0))) == list(range(4))  # b capped at the rest
    assert rem.select_indices([0.2, float("nan"), 0.5, None], 2, 0, random.Random(0)) == [2, 0]  # no score: last


def test_trials_are_isolated_and_restore_the_expert(bank_tok, episode, rcfg):
    bank, tok = bank_tok
    with torch.no_grad():  # a non-trivial expert, as after NREM
        for p in bank.trainable_parameters():
            p.add_(0.01 * torch.randn_like(p))
    params, grads, _ = _state(bank)
    dreams = _hand_dreams(episode)[:3]
    results = rem.run_trials(bank, tok, dreams, _targets(episode), rcfg)
    assert _changed(bank, params) == set()
    assert {n: p.requires_grad for n, p in bank.model.named_parameters()} == grads
    assert len(results) == 3 and all(r.reward in (0, 1) for r in results)
    assert len({r.before for r in results}) == 1  # every trial starts from the same expert
    assert all(r.after != r.before for r in results)  # each trial did train
    assert all(r.reward == int(r.after < r.before) for r in results)


def test_restem_trains_only_the_writer_and_saves_apart(bank_tok, episode, rcfg, tmp_path, seed_test_model):
    bank, tok = bank_tok
    writer = rem.DreamWriter.from_config(bank, tok, rcfg)
    params, grads, active = _state(bank)
    assert not any(p.requires_grad for p in writer.parameters())
    losses = rem.restem_update(writer, _hand_dreams(episode), rcfg)
    assert len(losses) == 2 and writer.updates == 1
    changed = _changed(bank, params)
    assert changed and all(".dream_writer." in n for n in changed), sorted(changed)[:4]
    assert {n: p.requires_grad for n, p in bank.model.named_parameters()} == grads
    assert list(bank.model.active_adapters) == active
    # saved on its own; the bank's save and export never carry it
    writer.save(tmp_path / "writer")
    assert (tmp_path / "writer" / "adapter_model.safetensors").is_file()
    bank.save(tmp_path / "bank")
    bank.export_combined(tmp_path / "combined")
    assert not [p for p in (tmp_path / "bank").rglob("*") if "dream_writer" in p.name]
    from safetensors import safe_open
    for f in [*(tmp_path / "bank").rglob("*.safetensors"), tmp_path / "combined" / "adapter_model.safetensors"]:
        with safe_open(str(f), "pt") as st:
            assert not [k for k in st.keys() if "dream_writer" in k]
    model2, _ = load_model(str(seed_test_model))
    bank2 = ExpertBank(model2, bank.cfg)
    writer2 = rem.DreamWriter.load(bank2, tok, tmp_path / "writer")
    assert writer2.updates == 1
    sd1, sd2 = writer.state_dict(), writer2.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    # dreams are written with the writer on
    with torch.no_grad():
        for p in writer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    a = rem.write_dreams(bank, tok, episode, rcfg, random.Random(3))
    b = rem.write_dreams(bank, tok, episode, rcfg, random.Random(3), writer=writer)
    assert [d.text for d in a] != [d.text for d in b]


def test_train_dreams_changes_only_the_open_expert_with_replay(bank_tok, episode, rcfg, tmp_path):
    bank, tok = bank_tok
    buf = ReplayBuffer(tmp_path / "buffer.parquet", capacity=50)
    old = World(10_000_322, 1, 0, 0, 1).episode(0)
    buf.append([{"episode_id": ep.episode_id, "format": "rewrite", "prompt": "", "text": ep.documents[0],
                 "score": 0.1, "trial_reward": 1, "kept": True, "sleep_id": "v0001"} for ep in (old, episode)])
    params, _, _ = _state(bank)
    slot = bank.training
    cfg = rcfg.model_copy(update={"replay_fraction": 0.5})
    info = rem.train_dreams(bank, tok, _hand_dreams(episode)[:2], cfg, buf, random.Random(0))
    assert info["trained_dreams"] == 2 and info["replayed"] == 1  # the current episode is excluded
    assert info["sft_steps"] == 3 and info["difficulty_order"] == sorted(info["difficulty_order"])
    changed = _changed(bank, params)
    assert changed and all(f".{slot}." in n for n in changed)


def test_dream_sft_anchor_keeps_the_model_closer_on_unrelated_text(seed_test_model, episode, rcfg):
    """rem.anchor_weight adds KL(frozen || student) on anchor texts to the dream SFT: the same
    dreams and steps leave a smaller KL there than without it."""
    from sleepray.anchor import anchor_kl, anchor_texts
    texts = anchor_texts(load_config(None, []), 16)
    kls = []
    for weight in (0.0, 20.0):
        model, tok = load_model(str(seed_test_model))
        torch.manual_seed(0)
        bank = ExpertBank(model, load_config(None, ["experts.rank=4"]).experts)
        bank.open_new_expert()
        cfg = rcfg.model_copy(update={"anchor_weight": weight, "sft_steps": 8, "sft_lr": 1e-2})
        rem.train_dreams(bank, tok, _hand_dreams(episode), cfg, None, random.Random(0), anchor_texts=texts)
        with torch.no_grad():
            kls.append(anchor_kl(bank, tok, texts).item())
    assert kls[0] > 0 and kls[1] < 0.7 * kls[0]


def test_dream_sft_rehearses_older_episodes_from_the_buffer(seed_test_model, episode, rcfg, tmp_path,
                                                            monkeypatch):
    """rem.anchor_replay: the dream SFT's anchor batch carries the buffer's texts about OTHER
    episodes (never the one being dreamt about), and they stay closer to the model before the
    sleep than when the rehearsal is off."""
    import sleepray.anchor as anchor
    old = World(10_000_777, 1, 0, 0, 1).episode(1)
    old_text = f" {old.probes[0].question}\nA: {old.probes[0].answer}"
    buf = ReplayBuffer(tmp_path / "buffer.parquet")
    buf.append([{"episode_id": old.episode_id, "format": "qa", "text": old_text},
                {"episode_id": episode.episode_id, "format": "rewrite", "text": "about the episode itself"}])
    rehearsed = "Q: " + old_text.strip() + "\n"
    kls, seen = [], []
    real = anchor.anchor_kl
    monkeypatch.setattr(anchor, "anchor_kl", lambda bank, tok, texts, *a: seen.append(list(texts)) or
                        real(bank, tok, texts, *a))
    for n in (0, 4):
        model, tok = load_model(str(seed_test_model))
        torch.manual_seed(0)
        bank = ExpertBank(model, load_config(None, ["experts.rank=4"]).experts)
        bank.open_new_expert()
        cfg = rcfg.model_copy(update={"anchor_weight": 20.0, "anchor_replay": n, "anchor_batch": 1,
                                      "replay_fraction": 0.0, "sft_steps": 8, "sft_lr": 1e-2})
        seen.clear()
        info = rem.train_dreams(bank, tok, _hand_dreams(episode), cfg, buf, random.Random(0),
                                anchor_texts=["unrelated text"])
        assert info["rehearsal_texts"] == (1 if n else 0)
        assert all(t in ("unrelated text", rehearsed) for batch in seen for t in batch)
        assert sum(batch.count(rehearsed) for batch in seen) == 8 * n
        with torch.no_grad():
            kls.append(real(bank, tok, [rehearsed]).item())
    assert kls[0] > 0 and kls[1] < 0.7 * kls[0]


@pytest.mark.parametrize("revert", [True, False])
def test_a_dream_sft_that_hurts_the_probes_is_reverted(seed_test_model, episode, rcfg, tmp_path, monkeypatch,
                                                        revert):
    """rem.revert_if_worse: when the dream SFT leaves the probe loss higher than NREM left it,
    the expert goes back to exactly its pre-SFT tensors and no dream enters the buffer."""
    def harmful_sft(bank, tok, dreams, rcfg, *args, **kwargs):  # stands in for an SFT gone wrong
        with torch.no_grad():
            for p in bank.trainable_parameters():
                p.add_(0.5 * torch.randn_like(p))
        return {"trained_dreams": len(dreams), "replayed": 0, "sft_steps": 1,
                "sft_loss_first": 1.0, "sft_loss_last": 1.0}

    # an older episode: the model's own answers in the buffer
    bank, tok, old, rows, buf = _bank_remembering_an_older_episode(seed_test_model, tmp_path, n=4)
    assert rows

    monkeypatch.setattr(rem, "train_dreams", harmful_sft)
    cfg = rcfg.model_copy(update={"revert_if_worse": revert, "restem": False, "replay_probes": False})
    before = [p.detach().clone() for p in bank.trainable_parameters()]
    out = rem.run_rem(bank, tok, [episode], cfg, tmp_path / "rem", rng=random.Random(0), buffer=buf)
    assert out["probe_loss_after"] > out["probe_loss_before"]
    same = all(torch.equal(a, b) for a, b in zip(before, bank.trainable_parameters()))
    assert out["sft_reverted"] is revert and same is revert
    assert out["retention_probes"] == (len(rows) if revert else 0)  # the older episode is checked too
    assert out["retention_accuracy_before"] == (1.0 if revert else None)
    assert (len(buf) == len(rows)) is (revert or out["rewarded"] == 0)


def _bank_remembering_an_older_episode(model_path, tmp_path, learned=None, n=6):
    """A fresh bank with an open expert, and a buffer holding its own closed-book answers to an
    older episode's questions as probe rows: what it "remembers" of that episode."""
    model, tok = load_model(str(model_path))
    torch.manual_seed(0)
    bank = ExpertBank(model, load_config(None, ["experts.rank=4"]).experts)
    bank.open_new_expert()
    old = World(10_000_777, 1, 0, 0, 1).episode(1)
    pairs = [(q, a) for q, a in zip(*_questions_and_answers(bank, tok, old, n)) if a.strip()]
    buf = ReplayBuffer(tmp_path / "buffer.parquet")
    buf.append([probe_row(old.episode_id, q, a, "s0000", learned) for q, a in pairs])
    return bank, tok, old, pairs, buf


def _questions_and_answers(bank, tok, old, n=6):
    from sleepray.qa import generate_answers
    from sleepray.world import qa_prompt
    questions = [p.question for p in old.probes[:n]]
    return questions, generate_answers(bank.model, tok, [qa_prompt(q) for q in questions], 12)


def test_a_sleep_that_forgets_older_episodes_is_scaled_down_until_it_does_not(seed_test_model, episode, rcfg,
                                                                               tmp_path, monkeypatch):
    """rem.retention_scales: when the older episodes' probe answers (the model's own, from the
    buffer) fall below what the model before the sleep gave, the new expert's delta is scaled
    down step by step; at 0 the model is exactly the one before the sleep."""
    from sleepray.world import qa_prompt
    bank, tok, old, pairs, buf = _bank_remembering_an_older_episode(seed_test_model, tmp_path)
    questions = [q for q, _ in pairs]
    older = [rem.ProbeTarget(old.episode_id, q, a) for q, a in pairs]
    ids = tok(qa_prompt(questions[0]), return_tensors="pt").input_ids
    with torch.no_grad():
        before = bank.model(input_ids=ids).logits

    def harmful_sft(bank, tok, dreams, rcfg, *args, **kwargs):
        with torch.no_grad():
            for p in bank.trainable_parameters():
                p.add_(0.5 * torch.randn_like(p))
        return {"trained_dreams": len(dreams), "replayed": 0, "sft_steps": 1,
                "sft_loss_first": 1.0, "sft_loss_last": 1.0}

    monkeypatch.setattr(rem, "train_dreams", harmful_sft)
    cfg = rcfg.model_copy(update={"revert_if_worse": False, "restem": False, "replay_probes": False,
                                  "retention_scales": [0.0]})
    out = rem.run_rem(bank, tok, [episode], cfg, tmp_path / "rem", rng=random.Random(0), buffer=buf)
    assert out["retention_accuracy_before_sleep"] == 1.0 and out["retention_accuracy_after"] < 1.0
    assert out["expert_scale"] == 0.0 and out["retention_accuracy_final"] == 1.0
    with torch.no_grad():
        assert torch.allclose(bank.model(input_ids=ids).logits, before, atol=1e-5)
    # already at the floor: nothing changes
    with torch.no_grad():
        for p in bank.trainable_parameters():
            p.add_(0.5 * torch.randn_like(p))
    state = [p.detach().clone() for p in bank.trainable_parameters()]
    assert rem.shrink_to_retain(bank, tok, older, {old.episode_id: 0.0}, [0.5, 0.0],
                                {old.episode_id: 0.3}) == (1.0, {old.episode_id: 0.3})
    assert all(torch.equal(a, b) for a, b in zip(state, bank.trainable_parameters()))


def test_repair_rehearses_the_forgotten_episode_beside_the_new_one_until_it_is_back(tmp_path, rcfg, monkeypatch):
    """rem.repair_steps: an older episode below its floor gets its buffer rows trained again,
    together with this sleep's own probe answers; an episode at its floor is not trained on;
    the rounds stop once every episode is back. The SFT and the model's answers are stood in
    for (the real ones are in the test below)."""
    buf = ReplayBuffer(tmp_path / "buffer.parquet")
    buf.append([probe_row("first", f"Where is q{i}?", f"a{i}", "s1", True) for i in range(3)])
    buf.append([{"episode_id": "first", "format": "rewrite", "text": "First lived in A.", "sleep_id": "s1"}])
    buf.append([probe_row("later", f"Who is p{i}?", f"b{i}", "s2", True) for i in range(3)])
    older = [rem.ProbeTarget(e, q, a) for e, q, a in buf.probe_answers()]
    own = [rem.ProbeTarget("new", "Where is n?", "c")]
    trained = []
    monkeypatch.setattr(rem, "train_dreams", lambda bank, tok, items, cfg, *a, **kw: trained.append(
        (sorted({d.episode_id for d in items}), [d.sft_text for d in items], cfg.sft_steps, kw["exclude_episodes"])))
    # the first episode comes back after the second round
    monkeypatch.setattr(rem, "probe_hits", lambda bank, tok, targets, n: [
        t.episode_id == "later" or len(trained) >= 2 for t in targets])
    cfg = rcfg.model_copy(update={"repair_steps": 7, "repair_rounds": 3})
    acc, rounds = rem.repair_forgetting(None, None, older, {"first": 0.95, "later": 0.95}, {"first": 0.0, "later": 1.0},
                                        own, buf, cfg, random.Random(0), exclude_episodes=["new"])
    assert rounds == 2 and acc == {"first": 1.0, "later": 1.0}
    episodes, texts, steps, exclude = trained[0]
    assert episodes == ["first", "new"] and steps == 7 and exclude == ["new"]
    assert "Q: Where is n?\nA: c\n" in texts and "First lived in A.\n" in texts and "Q: Where is q0?\nA: a0\n" in texts
    # nothing below its floor: no round
    assert rem.repair_forgetting(None, None, older, {"first": 0.5}, {"first": 1.0}, own, buf, cfg,
                                 random.Random(0)) == ({"first": 1.0}, 0)


def test_a_sleep_that_forgets_is_repaired_by_rehearsing_the_older_episode(seed_test_model, rcfg, tmp_path,
                                                                         monkeypatch):
    """Through run_rem, with real training: the dream SFT is made to write other answers over
    the older episode's questions (interference, what a new person's facts do to an old
    one's); its probe answers (the model's own, from the buffer) fall, and the repair rounds
    bring them back up."""
    from sleepray.world import qa_prompt
    bank, tok, old, pairs, buf = _bank_remembering_an_older_episode(seed_test_model, tmp_path, learned=True)
    questions, own = [q for q, _ in pairs], [a for _, a in pairs]
    real_sft = rem.train_dreams

    def interfering_sft(bank, tok, dreams, cfg, *args, **kwargs):
        if cfg.sft_steps == cfg.repair_steps:  # the repair trains for real
            return real_sft(bank, tok, dreams, cfg, *args, **kwargs)
        wrong = [Dream(old.episode_id, "qa", qa_prompt(q), f" {q}\nA: {own[(i + 1) % len(own)]}")
                 for i, q in enumerate(questions)]
        return real_sft(bank, tok, wrong, cfg, None, random.Random(0))

    monkeypatch.setattr(rem, "train_dreams", interfering_sft)
    cfg = rcfg.model_copy(update={"revert_if_worse": False, "restem": False, "replay_probes": False,
                                  "anchor_weight": 0.0, "sft_steps": 30, "sft_lr": 1e-2, "batch_size": 8,
                                  "repair_steps": 40, "repair_rounds": 3})
    new = World(10_000_321, 0, 1, 0, 1).episode(0)  # about an organisation: other questions than the old person's
    out = rem.run_rem(bank, tok, [new], cfg, tmp_path / "rem", rng=random.Random(0), buffer=buf)
    assert out["retention_accuracy_before_sleep"] == 1.0 and out["retention_accuracy_after"] <= 0.5
    assert out["repair_rounds"] >= 1 and out["retention_accuracy_final"] >= out["retention_accuracy_after"] + 0.3
    assert out["expert_scale"] == 1.0  # no scaling asked for
    assert out["retention_worst_episode_drop"] == pytest.approx(1.0 - out["retention_accuracy_final"])


def test_sft_verdict_counts_forgetting_of_older_episodes():
    assert not rem.sft_made_worse((1.0, 0.8), (0.5, 0.6), (0.9, 0.9))
    assert rem.sft_made_worse((1.0, 1.1), (0.5, 0.6), (0.9, 0.9))  # probe loss rose
    assert rem.sft_made_worse((1.0, 0.8), (0.5, 0.4), (0.9, 0.9))  # fewer teacher answers
    assert rem.sft_made_worse((1.0, 0.8), (0.5, 0.6), (0.9, 0.8))  # forgot older episodes
    assert not rem.sft_made_worse((1.0, 0.8), (0.5, 0.6), (0.9, 0.8), tolerance=0.15)
    assert not rem.sft_made_worse((1.0, 0.8), (None, None), (None, None))  # not measured
    assert not rem.sft_made_worse((float("nan"), 2.0), (0.5, 0.6), (None, None))


def test_probe_rows_round_trip_and_older_targets(tmp_path, rcfg):
    """Probe answers written as buffer rows come back as (episode, question, answer); kept
    dreams, several-pair qa dreams and the episodes being slept on never count."""
    buf = ReplayBuffer(tmp_path / "buffer.parquet")
    buf.append([probe_row("e0", f"Where is q{i}?", f"a{i}", "s1") for i in range(5)])
    buf.append([{"episode_id": "e0", "format": "qa", "prompt": "ctx\nQ:", "text": " x?\nA: y\nQ: z?\nA: w",
                 "kept": True, "sleep_id": "s1"},
                {"episode_id": "e1", "format": "rewrite", "text": "Where is it?\nA: no", "kept": False}])
    buf.append([probe_row("e2", "Who?", "b", "s2")])
    assert buf.probe_answers(["e2"]) == [("e0", f"Where is q{i}?", f"a{i}") for i in range(5)]
    assert buf.probe_answers()[-1] == ("e2", "Who?", "b")
    new = Episode("e2", [], [], [])
    got = rem.older_probe_targets(buf, [new], rcfg.model_copy(update={"retention_probes": 3}), seed=0)
    assert len(got) == 3 and {t.episode_id for t in got} == {"e0"} and all(t.target.startswith("a") for t in got)
    assert rem.older_probe_targets(buf, [new], rcfg.model_copy(update={"retention_probes": 0})) == []
    assert rem.older_probe_targets(None, [new], rcfg) == []


def test_retention_probes_are_what_was_learned_spread_evenly_over_older_episodes(tmp_path, rcfg):
    """The retention check asks only what the model answered closed-book after that episode's
    own sleep (learned; null, from before the flag, counts), and as many about each older
    episode as it can, so the first episode keeps its weight as episodes pile up."""
    buf = ReplayBuffer(tmp_path / "buffer.parquet")
    buf.append([probe_row("e0", f"Where is q{i}?", f"a{i}", "s1", learned=i < 3) for i in range(6)])
    buf.append([probe_row("e1", f"Who is p{i}?", f"b{i}", "s2", learned=True) for i in range(20)])
    buf.append([probe_row("e2", "When?", "c", "s3")])  # learned not measured
    assert [a for e, _, a in buf.probe_answers(learned_only=True) if e == "e0"] == ["a0", "a1", "a2"]
    assert len(buf.probe_answers()) == 27
    new = Episode("e3", [], [], [])
    got = rem.older_probe_targets(buf, [new], rcfg.model_copy(update={"retention_probes": 9}), seed=1)
    by_ep = {e: sorted(t.target for t in got if t.episode_id == e) for e in ("e0", "e1", "e2")}
    assert by_ep["e0"] == ["a0", "a1", "a2"] and by_ep["e2"] == ["c"] and len(by_ep["e1"]) == 5
    assert len(rem.older_probe_targets(buf, [new], rcfg.model_copy(update={"retention_probes": 4}))) == 4


def test_a_buffer_written_before_the_learned_column_reads_back_with_it_null(tmp_path):
    path = tmp_path / "buffer.parquet"
    old = pa.schema([f for f in BUFFER_SCHEMA if f.name != "learned"])
    pq.write_table(pa.Table.from_pylist([probe_row("e0", "Where?", "here", "s1")], schema=old), str(path))
    buf = ReplayBuffer(path)
    assert buf.rows()[0]["learned"] is None and buf.probe_answers(learned_only=True) == [("e0", "Where?", "here")]
    buf.append([probe_row("e1", "Who?", "me", "s2", learned=False)])
    assert pq.read_table(path).schema.names == BUFFER_COLUMNS and len(buf.probe_answers(learned_only=True)) == 1


def test_the_sleep_is_scaled_down_until_every_older_episode_is_back_to_its_own_floor(monkeypatch):
    """One episode forgotten among several well kept: the mean over all probes stays high, yet
    the new expert is scaled down until that episode is back. The model's answers are stood in
    for by hits that depend on the scale (what a real forgetting expert does is in the test above)."""
    class Bank:
        scale = 1.0

        def scale_training(self, factor):
            self.scale *= factor

    bank = Bank()
    older = [rem.ProbeTarget("first", f"q{i}", "a") for i in range(2)]
    older += [rem.ProbeTarget("later", f"q{i}", "a") for i in range(10)]
    # the first episode comes back only at half the expert; the later one is kept at any scale
    monkeypatch.setattr(retention, "probe_hits", lambda bank_, tok, targets, n: [
        t.episode_id == "later" or bank_.scale <= 0.5 for t in targets])
    unscaled = {"first": 0.0, "later": 1.0}  # 10 of 12 probes right: 0.83 over the mix
    scale, acc = rem.shrink_to_retain(bank, None, older, {"first": 0.95, "later": 0.95}, [0.75, 0.5, 0.0], unscaled)
    assert (scale, acc) == (0.5, {"first": 1.0, "later": 1.0}) and bank.scale == 0.5
    assert rem.accuracy_by_episode(older, [True, False] + [True] * 10) == {"first": 0.5, "later": 1.0}


def test_replay_buffer_round_trip_cap_and_exclusion(tmp_path):
    path = tmp_path / "buf" / "replay.parquet"
    buf = ReplayBuffer(path, capacity=5)
    assert len(buf) == 0 and buf.sample(3, (), random.Random(0)) == []
    rows = [{"episode_id": f"e{i % 3}", "format": "qa", "prompt": f"p{i}", "text": f"t{i}", "score": i / 10,
             "trial_reward": i % 2, "kept": True, "sleep_id": f"s{i}"} for i in range(4)]
    assert buf.append(rows) == 4
    assert ReplayBuffer(path, 5).rows() == [{**r, "learned": None} for r in rows]  # round trip, every column
    assert list(pq.read_table(path).schema.names) == BUFFER_COLUMNS
    buf.append([{**rows[0], "text": "t4", "sleep_id": "s4"}, {**rows[1], "text": "t5", "sleep_id": "s5"}])
    assert len(buf) == 5 and [r["text"] for r in buf.rows()] == ["t1", "t2", "t3", "t4", "t5"]  # oldest dropped
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary file left
    got = buf.sample(10, ["e0"], random.Random(0))
    assert got and all(d.episode_id != "e0" for d in got) and len({d.text for d in got}) == len(got)
    assert len(buf.sample(2, (), random.Random(1))) == 2
    assert ReplayBuffer(tmp_path / "zero.parquet", capacity=0).append(rows) == 0


SENTINEL = "Zqxsentinel"
REM_MODULES = ("rem.py", "dreams.py", "dream_writer.py", "rem_probes.py", "rem_trials.py", "dream_sft.py",
               "retention.py", "replay.py")


@pytest.fixture(scope="module")
def sentinel_run(seed_test_model, episode, rcfg, tmp_path_factory):
    """run_rem on an episode whose Probe.answer values are sentinels, recording every SFT/loss text."""
    probes = [dataclasses.replace(p, answer=f"{SENTINEL}{i}") for i, p in enumerate(episode.probes)]
    ep = Episode(episode.episode_id, episode.documents, episode.facts, probes)
    out = tmp_path_factory.mktemp("rem")
    model, tok = load_model(str(seed_test_model))
    bank = ExpertBank(model, load_config(None, ["experts.rank=4"]).experts)
    bank.open_new_expert()
    writer = rem.DreamWriter.from_config(bank, tok, rcfg)
    buf = ReplayBuffer(out / "buffer.parquet", rcfg.buffer_size)
    buf.append([{"episode_id": "older", "format": "rewrite", "prompt": "", "text": episode.documents[0],
                 "score": 0.0, "trial_reward": 1, "kept": True, "sleep_id": "v0000"}])
    seen: list[str] = []
    real = lm.token_nll

    def spy(model, tok, texts, prompts=None):
        seen.extend(texts + (prompts or []))
        return real(model, tok, texts, prompts)

    targets_seen = []
    real_targets = rem.teacher_probe_targets

    def spy_targets(*a, **k):
        res = real_targets(*a, **k)
        targets_seen.extend(res)
        return res

    params, _, _ = _state(bank)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lm, "token_nll", spy)
        mp.setattr(rem, "teacher_probe_targets", spy_targets)
        metrics = rem.run_rem(bank, tok, [ep], rcfg, out / "v0001", random.Random(0), buf, writer)
    return dict(metrics=metrics, out=out / "v0001", seen=seen, targets=targets_seen, buffer=buf,
                bank=bank, params=params, writer=writer, tok=tok)


def test_run_rem_writes_dreams_parquet(sentinel_run, rcfg):
    m, out = sentinel_run["metrics"], sentinel_run["out"]
    t = pq.read_table(out / "dreams.parquet")
    assert t.schema.names == rem.DREAMS_COLUMNS and set(BUFFER_COLUMNS) - {"learned"} <= set(t.schema.names)
    rows = t.to_pylist()
    assert len(rows) == m["dreams"] == 4
    assert sum(r["kept"] for r in rows) == m["kept"] == 3
    assert all((r["trial_reward"] is not None) == r["kept"] for r in rows)
    assert sorted(r["selected_by"] for r in rows if r["kept"]) == ["random", "top_k", "top_k"]
    assert sum(r["trial_reward"] or 0 for r in rows) == m["rewarded"]
    assert all(r["sleep_id"] == "v0001" for r in rows)
    assert pq.read_table(out / "probes.parquet").num_rows == m["probe_targets"] > 0
    assert (out / "dream_writer" / "adapter_model.safetensors").is_file()
    # what moved: the open expert when its dream SFT was kept, the writer when ReST-EM ran, nothing else
    changed = _changed(sentinel_run["bank"], sentinel_run["params"])
    slot = sentinel_run["bank"].training
    expert = {n for n in changed if f".{slot}." in n}
    writer = {n for n in changed if ".dream_writer." in n}
    assert changed and changed == expert | writer
    assert bool(expert) == (m["sft_steps"] > 0 and not m["sft_reverted"])
    assert bool(writer) == (m["restem_steps"] > 0) == (sentinel_run["writer"].updates == 1)
    probes = pq.read_table(out / "probes.parquet").to_pylist()
    replayed_probes = [r for r in sentinel_run["buffer"].rows() if r["sleep_id"] == "v0001" and not r["kept"]]
    # rem.replay_probes: the teacher's probe answers are kept as qa dreams for later sleeps
    assert [r["text"] for r in replayed_probes] == [f" {p['question']}\nA: {p['teacher_answer']}" for p in probes]
    assert all(r["format"] == "qa" and r["episode_id"] == p["episode_id"] for r, p in zip(replayed_probes, probes))
    # learned: whether the model, as the sleep left it, gives the teacher's answer closed-book
    targets = [rem.ProbeTarget(p["episode_id"], p["question"], p["teacher_answer"]) for p in probes]
    hits = rem.probe_hits(sentinel_run["bank"], sentinel_run["tok"], targets, rcfg.probe_max_new_tokens)
    assert [p["learned"] for p in probes] == hits == [r["learned"] for r in replayed_probes]
    assert m["probe_accuracy_final"] == sum(hits) / len(hits)
    if m["rewarded"] and not m["sft_reverted"]:
        assert m["sft_steps"] == 3 and m["replayed"] == 1
        assert m["buffer_size"] == 1 + m["rewarded"] + m["probe_targets"]
        assert sentinel_run["writer"].updates == 1


def test_ground_truth_answers_never_leak(sentinel_run):
    rows = pq.read_table(sentinel_run["out"] / "dreams.parquet").to_pylist()
    probes = pq.read_table(sentinel_run["out"] / "probes.parquet").to_pylist()
    texts = [str(v) for r in rows + probes + sentinel_run["buffer"].rows() for v in r.values()]
    texts += [f"{t.question} {t.target}" for t in sentinel_run["targets"]]
    texts += sentinel_run["seen"]
    assert sentinel_run["targets"] and sentinel_run["seen"]
    assert not [t for t in texts if SENTINEL.lower() in t.lower()]
    # and the REM code never reads a Probe's answer at all
    for mod in REM_MODULES:
        tree = ast.parse((Path(rem.__file__).parent / mod).read_text())
        assert not [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "answer"], mod
        assert not [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value == "answer"], mod
