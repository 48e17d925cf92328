"""NREM on the `test` seed model: only the new expert trains, and facts move into it."""
import random

import pytest
import torch

from sleepray.config import load_config
from sleepray.experts import ExpertBank
from sleepray.general_text import HELDOUT_SEED, corpus
from sleepray.models import load_model
from sleepray.nrem import divergence, nrem_loss, run_nrem
from sleepray.nrem_samplers import LocalSampler
from sleepray.rewards import ExactJudge
from sleepray.prompts import consolidation_prompts, model_question_writer
from sleepray.qa import evaluate_probes, generate_answers
from sleepray.world import Episode, World, qa_prompt

QUICK = ["world.people_per_episode=1", "world.orgs_per_episode=0", "world.places_per_episode=0",
         "world.phrasings_per_fact=1", "nrem.judge=exact", "nrem.batch_size=8"]


def _teacher_answers(bank, tok, prompts):
    """(prompt, greedy teacher continuation) pairs: fixed data to measure the student on."""
    with torch.no_grad(), bank.teacher_mode():
        answers = generate_answers(bank.model, tok, [p.teacher_prompt for p in prompts], 8)
    return [(p, tok.encode(" " + a + "\n", add_special_tokens=False)) for p, a in zip(prompts, answers)]


def _divergence_on(bank, tok, pairs, beta=0.5):
    prompts, ys = [p for p, _ in pairs], [y for _, y in pairs]
    with torch.no_grad():
        return divergence(bank, tok, prompts, ys, load_config(None, [f"nrem.beta={beta}"]).nrem).item()


def _logprob_per_token(model, tok, pairs: list[tuple[str, str]]) -> float:
    """Mean over ``pairs`` of the mean log-prob per token of ``continuation`` after ``prompt``
    (a plain forward pass, independent of NREM's own loss code)."""
    out = []
    with torch.no_grad():
        for prompt, cont in pairs:
            p, c = tok.encode(prompt), tok.encode(cont, add_special_tokens=False)
            lp = torch.log_softmax(model(input_ids=torch.tensor([p + c])).logits[0].float(), -1)
            out.append(lp[len(p) - 1: -1].gather(1, torch.tensor(c)[:, None]).mean().item())
    return sum(out) / len(out)


def _lora_tensors(bank, slot) -> list:
    """The A and B tensors of expert ``slot`` on every LoRA layer of the bank's model."""
    return [t for layer in bank._lora_layers() if slot in layer.lora_A
            for t in (layer.lora_A[slot].weight, layer.lora_B[slot].weight)]


def _closed_book_answers(episode) -> list[tuple[str, str]]:
    return [(qa_prompt(p.question), " " + p.answer + "\n") for p in episode.probes]


@pytest.fixture(scope="module")
def episode():
    return World(10_000_777, 1, 0, 0, 1).episode(0)


def test_nrem_trains_only_the_new_expert_and_moves_facts_into_it(seed_test_model, episode):
    torch.manual_seed(0)  # the fresh expert's initialisation
    cfg = load_config(None, QUICK + ["nrem.steps=40"])
    model, tok = load_model(str(seed_test_model))
    bank = ExpertBank(model, cfg.experts)
    other = World(10_000_778, 1, 0, 0, 1).episode(0)   # another person: never consolidated here
    general = [("", t) for t in corpus(HELDOUT_SEED + 1, 8)]
    answers, other_answers = _closed_book_answers(episode), _closed_book_answers(other)
    before_cb = evaluate_probes(bank.model, tok, episode.probes, None).accuracy
    lp_before = {"episode": _logprob_per_token(bank.model, tok, answers),
                 "other": _logprob_per_token(bank.model, tok, other_answers),
                 "general": _logprob_per_token(bank.model, tok, general)}
    bank.open_new_expert()
    slot = bank.training
    snapshot = {n: p.detach().clone() for n, p in bank.model.named_parameters()}
    memory = Episode(episode.episode_id, episode.documents, [], [])  # what a sleep gets: documents only
    writer = model_question_writer(bank, tok, seed=0)  # the teacher writes its own questions
    prompts = consolidation_prompts(memory, cfg.nrem.prompts_per_episode, random.Random(0), writer)
    assert any(p.kind == "query" for p in prompts)
    fixed = _teacher_answers(bank, tok, prompts[:16])
    d_before = _divergence_on(bank, tok, fixed)
    res = run_nrem(bank, tok, prompts, cfg.nrem, seed=0, progress=False)
    assert len(res.history) == 40
    changed = {n for n, p in bank.model.named_parameters() if not torch.equal(p, snapshot[n])}
    assert changed, "the new expert did not train"
    assert all(f".{slot}." in n for n in changed), sorted(changed)[:5]
    # the divergence to the teacher (with the episode in context) went down: in the training
    # log and, measured afresh, on fixed teacher continuations of 16 of the prompts
    first = sum(h["divergence"] for h in res.history[:5]) / 5
    last = sum(h["divergence"] for h in res.history[-5:]) / 5
    # (5-step means are noisy: over seeds 0-2 the ratio was 0.81, 0.81, 0.77 with the teacher pool
    # and 0.64, 1.04, 0.89 without it; the fixed continuations below are the firm check)
    assert last < 0.9 * first, (first, last)
    d_after = _divergence_on(bank, tok, fixed)
    assert d_after < 0.8 * d_before, (d_before, d_after)
    bank.freeze_current()
    # the facts moved into the expert: closed book, the episode's true answers (never trained on:
    # NREM saw the documents only) gained a clear margin of log-prob per token, while the answers
    # about another person did not gain and general text moved by a few percent only
    # (measured: episode +0.55 nats/token, other person -0.42, general text -0.46 of -12.3)
    lp_after = {"episode": _logprob_per_token(bank.model, tok, answers),
                "other": _logprob_per_token(bank.model, tok, other_answers),
                "general": _logprob_per_token(bank.model, tok, general)}
    gain = {k: lp_after[k] - lp_before[k] for k in lp_before}
    assert gain["episode"] > 0.3, (lp_before, lp_after)
    assert gain["other"] < 0.1 and gain["episode"] - gain["other"] > 0.5, (lp_before, lp_after)
    assert abs(gain["general"]) < 0.1 * abs(lp_before["general"]), (lp_before, lp_after)
    # and closed-book exact match on the episode's 24 questions rose by at least 5 answers
    # (measured: 1 -> 9 of 24), not by one lucky answer
    after_cb = evaluate_probes(bank.model, tok, episode.probes, None).accuracy
    assert len(episode.probes) == 24
    assert after_cb - before_cb >= 5 / 24 - 1e-9, (before_cb, after_cb)


def test_gkd_gradients_reach_exactly_the_open_expert(seed_test_model, episode):
    """One GKD step (half on-policy samples: lam=0.5) with a FROZEN expert on and an open one:
    every LoRA tensor of the open expert gets a finite, non-zero gradient; the frozen expert
    (part of the teacher) and the base weights get none."""
    torch.manual_seed(0)
    cfg = load_config(None, QUICK + ["nrem.lam=0.5"])
    model, tok = load_model(str(seed_test_model))
    bank = ExpertBank(model, cfg.experts)
    frozen = bank.open_new_expert()
    with torch.no_grad():  # a frozen expert that does something (B != 0)
        for p in _lora_tensors(bank, frozen):
            p.add_(0.05 * torch.randn_like(p))
    bank.freeze_current()
    slot = bank.open_new_expert()
    with torch.no_grad():  # as after a first step: B != 0, so A's gradient is not zero by construction
        for layer in bank._lora_layers():
            layer.lora_B[slot].weight.add_(0.01 * torch.randn_like(layer.lora_B[slot].weight))
    open_params = {id(p) for p in _lora_tensors(bank, slot)}
    frozen_params = {id(p) for p in _lora_tensors(bank, frozen)}
    assert open_params and frozen_params and not open_params & frozen_params
    assert {id(p) for p in bank.trainable_parameters()} == open_params
    prompts = consolidation_prompts(episode, 8, random.Random(1))
    sampler = LocalSampler(bank, tok, cfg.nrem.max_new_tokens, cfg.nrem.temperature)
    loss, rec = nrem_loss(bank, tok, prompts, cfg.nrem, random.Random(2), sampler, judge=ExactJudge())
    assert "reward" in rec    # LTI's policy gradient is in the loss too
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    with_grad = {n: p for n, p in bank.model.named_parameters() if p.grad is not None}
    assert {id(p) for p in with_grad.values()} == open_params, sorted(with_grad)[:5]
    for n, p in with_grad.items():
        assert f".{slot}." in n and torch.isfinite(p.grad).all(), n
        assert p.grad.abs().max() > 0, f"{n}: zero gradient"
    assert all(p.grad is None for n, p in bank.model.named_parameters() if id(p) not in open_params)
    assert len(with_grad) == 2 * len(list(bank._lora_layers()))  # A and B of every LoRA layer


def test_nrem_refuses_empty_memory_and_closed_bank(seed_test_model):
    cfg = load_config(None, QUICK)
    model, tok = load_model(str(seed_test_model))
    bank = ExpertBank(model, cfg.experts)
    with pytest.raises(ValueError, match="at least one"):
        bank.open_new_expert()
        run_nrem(bank, tok, [], cfg.nrem)
    bank.freeze_current()
    with pytest.raises(RuntimeError, match="open a new expert"):
        run_nrem(bank, tok, consolidation_prompts(World(1, 1, 0, 0, 1).episode(0), 4, random.Random(0)),
                 cfg.nrem)


def test_the_drift_anchor_is_zero_for_an_unchanged_model_and_pulls_the_expert_back(seed_test_model):
    """KL(frozen || student) on anchor text: 0 with a fresh expert (B = 0); positive once the
    expert moved; and its gradient step lowers it."""
    from sleepray.anchor import anchor_kl, anchor_texts
    from sleepray.config import load_config
    cfg = load_config(None, ["nrem.anchor_weight=1.0"])
    texts = anchor_texts(cfg, 8)
    assert len(texts) == 8 and all(isinstance(t, str) and t for t in texts)
    model, tok = load_model(str(seed_test_model))
    bank = ExpertBank(model, cfg.experts)
    bank.open_new_expert()
    assert anchor_kl(bank, tok, texts).item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        for p in bank.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    kl = anchor_kl(bank, tok, texts)
    assert kl.item() > 1e-4
    opt = torch.optim.SGD(bank.trainable_parameters(), lr=0.01)
    kl.backward()
    opt.step()
    assert anchor_kl(bank, tok, texts).item() < kl.item()


def test_nrem_rehearses_older_episodes_from_the_replay_buffer(tmp_path):
    """With the anchor and replay on, NREM's anchor batch carries dreams about OTHER episodes
    from REM's buffer (rehearsal); never the episodes being consolidated; none when off."""
    import random as _random

    from sleepray.anchor import anchor_batch
    from sleepray.replay import ReplayBuffer
    from sleepray.nrem_step import nrem_replay
    from sleepray.storage import Storage
    store = Storage(tmp_path)
    old, new = World(10_000_777, 1, 0, 0, 1).episodes(2)
    ReplayBuffer(store.replay).append([
        {"episode_id": old.episode_id, "format": "qa", "text": " Where was A born?\nA: Kledil"},
        {"episode_id": new.episode_id, "format": "rewrite", "text": " about the new episode"},
        {"episode_id": old.episode_id, "format": "rewrite", "text": "   "}])
    cfg = load_config(None, ["nrem.anchor_weight=1.0", "nrem.anchor_replay=3", "nrem.anchor_batch=2"])
    replay = nrem_replay(cfg, store, [new])
    assert replay == ["Q: Where was A born?\nA: Kledil\n"]
    batch = anchor_batch(cfg.nrem, ["unrelated text"], replay, _random.Random(0))
    assert batch.texts == ["unrelated text"] * 2 and batch.rehearse == replay * 3
    alone = load_config(None, ["nrem.anchor_weight=0", "nrem.rehearsal_weight=2.0", "nrem.anchor_replay=3"])
    assert nrem_replay(alone, store, [new]) == replay  # rehearsal without the drift anchor
    batch = anchor_batch(alone.nrem, ["unrelated text"], replay, _random.Random(0))
    assert batch.texts == [] and batch.rehearse == replay * 3
    for off in (["nrem.anchor_weight=0"], ["nrem.anchor_weight=1.0", "nrem.rehearsal_weight=0"],
                ["nrem.anchor_weight=1.0", "nrem.anchor_replay=0"],
                ["nrem.anchor_weight=1.0", "rem.replay=false"]):
        assert nrem_replay(load_config(None, off), store, [new]) == []
    assert anchor_batch(load_config(None, []).nrem, ["x"], replay, _random.Random(0)) is None


def test_the_fused_optimizer_makes_the_plain_adamw_updates():
    """nrem.fused_optimizer: PyTorch's fused AdamW moves the expert's tensors as the plain one does."""
    from sleepray.nrem import make_optimizer
    torch.manual_seed(0)
    start = [torch.randn(8, 3), torch.randn(5)]
    grads = [[torch.randn_like(t) for t in start] for _ in range(3)]
    out = {}
    for fused in (False, True):
        params = [t.clone().requires_grad_(True) for t in start]
        opt = make_optimizer(params, load_config(None, [f"nrem.fused_optimizer={str(fused).lower()}"]).nrem)
        assert opt.defaults.get("fused") is (True if fused else None)
        for g in grads:
            for p, gi in zip(params, g):
                p.grad = gi.clone()
            opt.step()
        out[fused] = [p.detach() for p in params]
    for a, b, s in zip(out[False], out[True], start):
        assert torch.allclose(a, b, atol=1e-6) and not torch.allclose(a, s)
