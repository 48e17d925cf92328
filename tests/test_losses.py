import os

import pytest
import torch
import torch.nn.functional as F

from sleepray.losses import (generalized_jsd, sampled_token_kl, sampled_token_kl_loss,
                             topk_generalized_jsd)

BETAS = [0.0, 0.1, 0.5, 0.9, 1.0]


@pytest.fixture(scope="module")
def trl_jsd():
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        from trl.experimental.gkd import GKDTrainer
    except ImportError:  # older TRL
        from trl import GKDTrainer
    return GKDTrainer.generalized_jsd_loss


def _logits(seed, shape=(3, 5, 11), scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def _reference(s_logits, t_logits, beta, temperature=1.0):
    """float64, explicit sums over the vocabulary, straight from the definition."""
    s = torch.softmax(s_logits.double() / temperature, -1)
    t = torch.softmax(t_logits.double() / temperature, -1)
    B, T, V = s.shape
    out = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for i in range(T):
            p, q = t[b, i], s[b, i]
            if beta == 0:
                out[b, i] = sum(p[v] * torch.log(p[v] / q[v]) for v in range(V))
            elif beta == 1:
                out[b, i] = sum(q[v] * torch.log(q[v] / p[v]) for v in range(V))
            else:
                m = [beta * p[v] + (1 - beta) * q[v] for v in range(V)]
                kl_t = sum(p[v] * torch.log(p[v] / m[v]) for v in range(V))
                kl_s = sum(q[v] * torch.log(q[v] / m[v]) for v in range(V))
                out[b, i] = beta * kl_t + (1 - beta) * kl_s
    return out


@pytest.mark.parametrize("beta", BETAS)
def test_matches_trl(trl_jsd, beta):
    s, t = _logits(0), _logits(1)
    labels = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(2))
    labels[0, :2] = -100
    labels[2, 4] = -100
    mask = labels != -100
    ours = generalized_jsd(s, t, beta, mask=mask)
    theirs = trl_jsd(s, t, labels=labels, beta=beta, temperature=1.0, reduction="batchmean")
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    # unmasked, summed
    torch.testing.assert_close(generalized_jsd(s, t, beta, reduction="sum"),
                               trl_jsd(s, t, beta=beta, reduction="sum"), rtol=1e-5, atol=1e-5)
    # per token
    per_tok = trl_jsd(s, t, beta=beta, reduction="none").sum(-1)
    torch.testing.assert_close(generalized_jsd(s, t, beta, reduction="none"), per_tok,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_matches_float64_definition(beta, temperature):
    s, t = _logits(3, (2, 3, 7)), _logits(4, (2, 3, 7))
    ref = _reference(s, t, beta, temperature)
    ours = generalized_jsd(s.double(), t.double(), beta, temperature=temperature,
                           reduction="none")
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    ours32 = generalized_jsd(s, t, beta, temperature=temperature, reduction="none")
    torch.testing.assert_close(ours32.double(), ref, rtol=1e-4, atol=1e-6)


def test_ends_are_forward_and_reverse_kl():
    s, t = _logits(5), _logits(6)
    ls, lt = F.log_softmax(s, -1), F.log_softmax(t, -1)
    n = s.shape[0] * s.shape[1]
    fwd = F.kl_div(ls, lt, reduction="sum", log_target=True) / n      # KL(T || S)
    rev = F.kl_div(lt, ls, reduction="sum", log_target=True) / n      # KL(S || T)
    torch.testing.assert_close(generalized_jsd(s, t, 0.0), fwd)
    torch.testing.assert_close(generalized_jsd(s, t, 1.0), rev)
    assert not torch.allclose(fwd, rev)
    # interior values are finite, non-negative, and zero when S == T
    for beta in (0.1, 0.5, 0.9):
        assert generalized_jsd(s, t, beta) > 0
        assert generalized_jsd(t, t, beta).abs() < 1e-6
    with pytest.raises(ValueError):
        generalized_jsd(s, t, 1.5)


def test_masking():
    s, t = _logits(7), _logits(8)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[0, 1] = mask[2, 3] = mask[2, 4] = True
    per = generalized_jsd(s, t, 0.5, reduction="none")
    full = _reference(s, t, 0.5).float()
    expected = (full[0, 1] + full[2, 3] + full[2, 4]) / 3
    torch.testing.assert_close(generalized_jsd(s, t, 0.5, mask=mask), expected,
                               rtol=1e-5, atol=1e-6)
    masked_none = generalized_jsd(s, t, 0.5, mask=mask, reduction="none")
    assert (masked_none[~mask] == 0).all()
    torch.testing.assert_close(masked_none[mask], per[mask])
    torch.testing.assert_close(generalized_jsd(s, t, 0.5, mask=mask, reduction="sum"),
                               per[mask].sum())
    # garbage in masked positions does not leak
    s2 = s.clone()
    s2[~mask] = 1e4
    torch.testing.assert_close(generalized_jsd(s2, t, 0.5, mask=mask), expected,
                               rtol=1e-5, atol=1e-6)
    # empty mask -> 0, not nan
    assert generalized_jsd(s, t, 0.5, mask=torch.zeros(3, 5)).item() == 0.0


@pytest.mark.parametrize("beta", BETAS)
def test_topk_equals_full_when_k_is_v(beta):
    s, t = _logits(9), _logits(10)
    V = s.shape[-1]
    t_logp = F.log_softmax(t, -1)
    vals, ids = t_logp.topk(V, dim=-1)
    mask = torch.ones(3, 5)
    mask[1, 0] = 0
    torch.testing.assert_close(topk_generalized_jsd(s, vals, ids, beta, mask=mask),
                               generalized_jsd(s, t, beta, mask=mask), rtol=1e-5, atol=1e-6)
    # a random permutation of the support gives the same answer
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        topk_generalized_jsd(s, vals[..., perm], ids[..., perm], beta, reduction="none"),
        generalized_jsd(s, t, beta, reduction="none"), rtol=1e-5, atol=1e-6)


def test_topk_is_renormalised_on_support():
    s, t = _logits(11), _logits(12)
    k = 4
    vals, ids = F.log_softmax(t, -1).topk(k, dim=-1)
    s_k = F.log_softmax(s, -1).gather(-1, ids)
    # full JSD between the two renormalised k-way distributions, via logits on k slots
    expected = generalized_jsd(s_k, vals, 0.5, reduction="none")
    got = topk_generalized_jsd(s, vals, ids, 0.5, reduction="none")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # -inf entries (fewer than k available) count as zero teacher mass
    vals_inf = vals.clone()
    vals_inf[..., -1] = float("-inf")
    q = torch.softmax(s_k.double(), -1)                       # student on the k ids
    p = torch.softmax(vals_inf.double(), -1)                  # teacher, last slot 0
    for beta in (0.0, 0.5):
        got_inf = topk_generalized_jsd(s, vals_inf, ids, beta, reduction="none")
        assert torch.isfinite(got_inf).all()
        m = beta * p + (1 - beta) * q
        if beta == 0:
            ref = torch.xlogy(p, p).sum(-1) - (p * q.log()).sum(-1)
        else:
            ref = (beta * (torch.xlogy(p, p) - p * m.log()).sum(-1)
                   + (1 - beta) * (q * (q / m).log()).sum(-1))
        torch.testing.assert_close(got_inf.double(), ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("beta", BETAS)
def test_gradients_flow_to_student_only(beta):
    s = _logits(13).requires_grad_()
    t = _logits(14).requires_grad_()
    generalized_jsd(s, t, beta).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and torch.isfinite(s.grad).all()
    assert t.grad is None
    s.grad = None
    vals, ids = F.log_softmax(t, -1).topk(5, dim=-1)
    topk_generalized_jsd(s, vals, ids, beta).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None


def test_bf16_inputs_are_upcast():
    s, t = _logits(15), _logits(16)
    out = generalized_jsd(s.bfloat16(), t.bfloat16(), 0.5)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, generalized_jsd(s, t, 0.5), rtol=5e-2, atol=1e-2)


def test_sampled_token_kl_is_unbiased_reverse_kl():
    torch.manual_seed(0)
    s_logits, t_logits = torch.randn(6) * 2, torch.randn(6) * 2
    ls, lt = F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1)
    y = torch.multinomial(ls.exp(), 200_000, replacement=True).view(1000, 200)
    est = sampled_token_kl(ls[y], lt[y])
    exact = F.kl_div(lt, ls, reduction="sum", log_target=True)
    assert abs(est.item() - exact.item()) < 0.02
    mask = torch.zeros(1000, 200)
    mask[:, 0] = 1
    torch.testing.assert_close(sampled_token_kl(ls[y], lt[y], mask=mask),
                               (ls[y] - lt[y])[:, 0].mean())
    assert sampled_token_kl(ls[y], lt[y], reduction="none").shape == (1000, 200)


def test_sampled_token_kl_loss_gradient():
    """E[grad surrogate] == grad KL(S || T) (score-function estimator)."""
    torch.manual_seed(1)
    s_logits = (torch.randn(5) * 1.5).requires_grad_()
    t_logp = F.log_softmax(torch.randn(5) * 1.5, -1)
    ls = F.log_softmax(s_logits, -1)
    exact = torch.autograd.grad(F.kl_div(t_logp, ls, reduction="sum", log_target=True),
                                s_logits)[0]
    y = torch.multinomial(ls.detach().exp(), 400_000, replacement=True).view(1, -1)
    ls = F.log_softmax(s_logits, -1)
    est = torch.autograd.grad(sampled_token_kl_loss(ls[y], t_logp[y]), s_logits)[0]
    torch.testing.assert_close(est, exact, atol=0.02, rtol=0.05)
