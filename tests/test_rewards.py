import pytest
import torch

from sleepray.rewards import (EmbeddingJudge, ExactJudge, Judge, ModelJudge, abs_reward,
                              clipped_pg_loss, group_advantages, lti_reward)


# --------------------------------------------------------------------------- r_abs

def test_abs_reward_hand_cases():
    assert abs_reward("Paris", "Paris") == 1.0
    assert abs_reward("", "") == 1.0
    # one substitution in 6 characters
    assert abs_reward("London", "Landon") == pytest.approx(1 - 1 / 6)
    # one insertion: lengths 5 and 6 -> L = 6
    assert abs_reward("Londn", "London") == pytest.approx(1 - 1 / 6)
    # lev("abcd", "wxyz") = 4 > default z0 = 2 -> gated to 0
    assert abs_reward("abcd", "wxyz") == 0.0
    assert abs_reward("", "abc") == 0.0               # lev 3 > 1.5
    # exactly at the default gate (lev 2 == 4 / 2) is kept
    assert abs_reward("abcd", "abxy") == pytest.approx(0.5)
    # characters, not bytes
    assert abs_reward("café", "cafe") == pytest.approx(0.75)


def test_abs_reward_z0_gate():
    pred, ref = "kitten", "sitting"                  # lev 3, L 7
    assert abs_reward(pred, ref) == pytest.approx(1 - 3 / 7)          # 3 <= 3.5
    assert abs_reward(pred, ref, z0=3) == pytest.approx(1 - 3 / 7)    # 3 <= 3
    assert abs_reward(pred, ref, z0=2.9) == 0.0
    assert abs_reward("abcd", "wxyz", z0=10) == pytest.approx(0.0)    # 1 - 4/4
    assert abs_reward("abcde", "wxyze", z0=10) == pytest.approx(0.2)


# --------------------------------------------------------------------------- judges

def test_exact_judge():
    j = ExactJudge()
    assert isinstance(j, Judge)
    assert j.same_meaning(["The Paris!", "Rome"], ["paris", "Milan"]) == [1.0, 0.0]
    with pytest.raises(ValueError):
        j.same_meaning(["a"], [])


def test_lti_reward_mixing():
    preds = ["Paris", "paris.", "Lyon", "Berlin"]
    refs = ["Paris", "Paris", "Paris", "Bern"]
    r_abs = [abs_reward(p, r) for p, r in zip(preds, refs)]
    r_sem = [1.0, 1.0, 0.0, 0.0]
    for gamma in (0.0, 0.3, 0.5, 1.0):
        got = lti_reward(preds, refs, ExactJudge(), gamma)
        want = [gamma * s + (1 - gamma) * a for s, a in zip(r_sem, r_abs)]
        assert got == pytest.approx(want)
    assert lti_reward(["abcd"], ["abxy"], ExactJudge(), 0.5, z0=1) == [0.0]
    # gamma == 0 never asks the judge
    assert lti_reward(preds, refs, None, 0.0) == pytest.approx(r_abs)
    with pytest.raises(ValueError):
        lti_reward(preds, refs, None, 0.5)


@pytest.fixture(scope="module")
def embedding_judge():
    return EmbeddingJudge(threshold=0.8)


def test_embedding_judge_real_weights(embedding_judge):
    j = embedding_judge
    assert isinstance(j, Judge)
    a = ["The cat is sitting on the mat.", "Alice was born in Paris in 1990.",
         "She works as a nurse in Boston."]
    b = ["A cat sits on the mat.", "Alice was born in 1990 in Paris.",
         "The stock market fell sharply today."]
    sims = j.similarity(a, b)
    assert sims[0] > 0.8 and sims[1] > 0.8 and sims[2] < 0.3
    assert j.same_meaning(a, b) == [1.0, 1.0, 0.0]
    assert j.same_meaning([], []) == []
    e = j.embed(["hello world"])
    assert e.shape == (1, 384)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(1))
    # loaded once, shared by later judges
    assert EmbeddingJudge(0.5)._load() is j._load()


def test_embedding_judge_embeds_each_text_once_and_bf16_agrees_with_float32(embedding_judge):
    j = EmbeddingJudge(0.8)
    seen = []
    inner = j.embed
    j.embed = lambda texts: (seen.append(list(texts)), inner(texts))[1]
    a = ["Alice lives in Paris.", "Alice lives in Paris.", "Bob is a nurse."]
    b = ["Alice resides in Paris.", "Alice lives in Paris.", "Alice resides in Paris."]
    first = j.similarity(a, b)
    assert first[1] == 1.0                                  # equal texts: no embedding needed
    assert sorted(seen[0]) == sorted({"Alice lives in Paris.", "Alice resides in Paris.", "Bob is a nurse."})
    assert j.similarity(a, b) == first and seen[1] == []    # every text known: nothing embedded again
    plain = [float((x * y).sum()) for x, y in zip(inner([a[0], a[2]]), inner([b[0], b[2]]))]
    assert first[0] == pytest.approx(plain[0], abs=1e-5) and first[2] == pytest.approx(plain[1], abs=1e-5)
    half = EmbeddingJudge(0.8, dtype="bfloat16").similarity(a, b)
    assert half == pytest.approx(first, abs=2e-2)
    assert EmbeddingJudge(0.8, dtype="auto").dtype in (torch.float32, torch.bfloat16)


@pytest.fixture(scope="module")
def tiny_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    from sleepray.tokenizer import train_tokenizer
    texts = ["Do these two answers mean the same? yes no Answer", "Paris Rome London 1990"] * 20
    tok = train_tokenizer(texts, vocab_size=300)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return LlamaForCausalLM(cfg).train(), tok


def test_model_judge_contract(tiny_lm):
    model, tok = tiny_lm
    j = ModelJudge(model, tok, batch_size=2)
    assert isinstance(j, Judge)
    a, b = ["Paris", "Rome is big", "1990"], ["Paris", "London", "in 1990 it was"]
    scores = j.yes_minus_no(a, b)
    assert len(scores) == 3 and all(isinstance(s, float) for s in scores)
    same = j.same_meaning(a, b)
    assert same == [float(s > 0) for s in scores]
    assert set(same) <= {0.0, 1.0}
    assert model.training                                   # mode restored
    # batching does not change the answer (right padding is harmless for scoring)
    one_by_one = [ModelJudge(model, tok, batch_size=1).yes_minus_no([x], [y])[0]
                  for x, y in zip(a, b)]
    assert scores == pytest.approx(one_by_one, abs=1e-4)


# --------------------------------------------------------------------------- PG

def test_group_advantages():
    r = torch.tensor([[1.0, 0.0, 0.5, 0.5], [0.2, 0.2, 0.2, 0.2], [0.0, 1.0, 1.0, 0.0]])
    adv = group_advantages(r)
    torch.testing.assert_close(adv.sum(1), torch.zeros(3))
    torch.testing.assert_close(adv[0], torch.tensor([0.5, -0.5, 0.0, 0.0]))
    assert (adv[1] == 0).all()
    adv_n = group_advantages(r, normalize_std=True)
    torch.testing.assert_close(adv_n.sum(1), torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(adv_n[2], torch.tensor([-1.0, 1.0, 1.0, -1.0]), atol=1e-5, rtol=0)
    assert torch.isfinite(adv_n).all()                      # constant group -> 0, not nan
    assert (adv_n[1] == 0).all()


def _pg_setup():
    g = torch.Generator().manual_seed(0)
    logp = (-torch.rand(4, 6, generator=g) * 3)
    adv = torch.tensor([1.0, -0.5, 2.0, -1.0])
    mask = torch.ones(4, 6)
    mask[0, 4:] = 0
    mask[3, 1:] = 0
    return logp, adv, mask


def test_clipped_loss_equals_plain_pg_when_on_policy():
    logp, adv, mask = _pg_setup()
    new = logp.clone().requires_grad_()
    loss = clipped_pg_loss(new, logp.clone(), adv, mask, clip_eps=0.2)
    torch.testing.assert_close(loss, -(adv[:, None] * mask).sum() / mask.sum())
    loss.backward()
    plain_new = logp.clone().requires_grad_()
    plain = -(adv[:, None] * plain_new * mask).sum() / mask.sum()
    plain.backward()
    torch.testing.assert_close(new.grad, plain_new.grad)
    assert (new.grad[mask == 0] == 0).all()
    # [B, T] advantages are accepted too
    torch.testing.assert_close(
        clipped_pg_loss(logp, logp, adv[:, None].expand(4, 6), mask, 0.2), loss.detach())


def test_clipped_loss_clips_outside_range():
    eps = 0.2
    old = torch.log(torch.full((4, 1), 0.5))
    ratios = torch.tensor([[1.5], [0.5], [1.5], [0.5]])
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0])
    new = (old + ratios.log()).requires_grad_()
    per_row = []
    for i in range(4):
        row = new[i:i + 1]
        loss = clipped_pg_loss(row, old[i:i + 1], adv[i:i + 1], None, eps)
        (g,) = torch.autograd.grad(loss, row)
        per_row.append((loss.item(), g.item()))
    # rows 0, 1: ratio left the range in the direction the advantage favours -> clipped,
    # value uses the clipped ratio and gradient is zero
    assert per_row[0] == pytest.approx((-(1 + eps) * 1.0, 0.0))
    assert per_row[1] == pytest.approx((-(1 - eps) * -1.0, 0.0))
    # rows 2, 3: the unclipped term is the pessimistic one -> gradient flows
    assert per_row[2][0] == pytest.approx(1.5) and per_row[2][1] == pytest.approx(1.5)
    assert per_row[3][0] == pytest.approx(-0.5) and per_row[3][1] == pytest.approx(-0.5)
    # inside the range: unclipped
    inside = (old + torch.log(torch.tensor(1.1))).requires_grad_()
    loss = clipped_pg_loss(inside, old, torch.ones(4), torch.ones(4, 1), eps)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(-1.1))
    torch.testing.assert_close(inside.grad, torch.full((4, 1), -1.1 / 4))
