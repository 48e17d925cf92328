"""The fast learner's paths equal the plain ones: fused head+loss (values and gradients within
1e-5 of ``losses.generalized_jsd`` and a full log-softmax), the teacher's shared context keys
and values, the own decode loop against transformers' ``generate``, the teacher pool, and the
expert bank's cached mode switch."""
import random

import pytest
import torch

from bank_helpers import assert_same_losses, losses_and_grads, moved_bank
from sleepray.config import load_config
from sleepray.experts import ExpertBank
from sleepray.fused_losses import fused_jsd, fused_token_logprobs
from sleepray.lm_forward import Head, UnsupportedModel, common_prefix, lm_parts
from sleepray.losses import generalized_jsd
from sleepray.models import load_model
from sleepray.nrem import _by_episode
from sleepray.nrem_forward import Scorer
from sleepray.nrem_samplers import TeacherPool
from sleepray.prompts import consolidation_prompts
from sleepray.sampling import sample_ids
from sleepray.world import World


def _head(V=50, H=16, softcap=None, scale=1.0, grad_w=False):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(V, H, generator=g, dtype=torch.float64).requires_grad_(grad_w)
    return Head(w, None, scale, softcap)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("softcap,scale,grad_w", [(None, 1.0, False), (5.0, 0.5, True)])
def test_fused_jsd_equals_the_plain_jsd_in_value_and_gradient(beta, softcap, scale, grad_w):
    head = _head(softcap=softcap, scale=scale, grad_w=grad_w)
    g = torch.Generator().manual_seed(1)
    hs = torch.randn(37, 16, generator=g, dtype=torch.float64, requires_grad=True)
    ht = torch.randn(37, 16, generator=g, dtype=torch.float64)
    plain = generalized_jsd(head(hs), head(ht), beta)
    want = torch.autograd.grad(plain, [hs] + ([head.weight] if grad_w else []))
    for chunk in (1, 8, 1000):      # chunks that do and do not divide N
        fused = fused_jsd(hs, ht, head, beta, chunk=chunk)
        got = torch.autograd.grad(fused, [hs] + ([head.weight] if grad_w else []))
        assert fused.item() == pytest.approx(plain.item(), abs=1e-5, rel=1e-5)
        for a, b in zip(got, want):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_the_compiled_jsd_equals_the_plain_one_over_changing_row_counts(beta):
    """nrem.compile_loss: the chunk's loss and gradient from torch.compile (inductor, here on CPU),
    float32 as on the learner, within 1e-5 of the plain fused path; row counts that change from
    call to call (a step's continuations) reuse one dynamic graph."""
    from torch._dynamo.utils import counters
    head = _head(V=300, H=16)
    head = Head(head.weight.detach().float())
    torch._dynamo.reset()
    counters.clear()
    for n, chunk in ((37, 16), (61, 16), (29, 64)):
        g = torch.Generator().manual_seed(n)
        hs = torch.randn(n, 16, generator=g, requires_grad=True)
        ht = torch.randn(n, 16, generator=g)
        plain = fused_jsd(hs, ht, head, beta, chunk=chunk)
        (want,) = torch.autograd.grad(plain, [hs])
        fast = fused_jsd(hs, ht, head, beta, chunk=chunk, compiled=True)
        (got,) = torch.autograd.grad(fast, [hs])
        assert fast.item() == pytest.approx(plain.item(), abs=1e-5, rel=1e-5) and plain.item() > 0
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert 1 <= counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])


def test_fused_token_logprobs_equal_a_full_log_softmax():
    head = _head(softcap=7.0, grad_w=True)
    g = torch.Generator().manual_seed(2)
    h = torch.randn(23, 16, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 50, (23,), generator=g)
    weights = torch.randn(23, generator=g, dtype=torch.float64)   # a non-uniform upstream gradient
    plain = torch.log_softmax(head(h).float(), -1).gather(-1, y[:, None])[:, 0]
    want = torch.autograd.grad((plain * weights).sum(), [h, head.weight])
    fused = fused_token_logprobs(h, y, head, chunk=5)
    got = torch.autograd.grad((fused * weights).sum(), [h, head.weight])
    assert torch.allclose(fused, plain, atol=1e-5)
    for a, b in zip(got, want):
        assert torch.allclose(a.float(), b.float(), atol=1e-5, rtol=1e-5)


def test_fused_jsd_rejects_mismatched_states():
    head = _head()
    with pytest.raises(ValueError, match="differ in shape"):
        fused_jsd(torch.zeros(3, 16, dtype=torch.float64), torch.zeros(4, 16, dtype=torch.float64), head, 0.5)


def test_common_prefix_leaves_every_row_a_token():
    assert common_prefix([[1, 2, 3, 4], [1, 2, 3, 5]]) == 3
    assert common_prefix([[1, 2, 3], [1, 2, 3, 9]]) == 2
    assert common_prefix([[7, 1], [8, 1]]) == 0
    assert common_prefix([[1, 2, 3]]) == 2


@pytest.fixture(scope="module")
def setup(seed_test_model):
    model, tok = load_model(str(seed_test_model))
    prompts = [p for e in World(3, 1, 0, 0, 1).episodes(2)
               for p in consolidation_prompts(e, 6, random.Random(0))]
    return str(seed_test_model), tok, prompts


def test_scorer_fused_with_shared_context_equals_the_plain_path(setup):
    """Divergence, LTI log-probs, the anchor KL and every LoRA gradient: fused head+loss with the
    teacher's context keys/values computed once == full logits and whole teacher prompts."""
    path, tok, prompts = setup
    ys = [tok.encode(f" answer {i}\n", add_special_tokens=False) for i in range(len(prompts))]
    out = {}
    for fused in (False, True):
        cfg = load_config(None, [f"nrem.fused_loss={fused}", f"nrem.reuse_context_kv={fused}", "nrem.loss_chunk=7"])
        bank = moved_bank(path, cfg)
        sc = Scorer(bank, tok, cfg.nrem, contexts=_by_episode(prompts))
        assert sc.fused is fused and (min(sc._prefix_len.values()) > 10 if fused else not sc._prefix_len)
        out[fused] = losses_and_grads(sc, tok, prompts, ys)
    assert_same_losses(out[False], out[True])
    assert out[False][2] > 0                      # the anchor KL is not trivially equal


def test_a_model_whose_head_does_more_is_refused_and_scored_plainly(setup):
    path, tok, prompts = setup
    model = load_model(path)[0]
    model.config.final_logit_softcapping = None
    model.config.logit_scale = 2.0      # claims a scale the model does not apply
    with pytest.raises(UnsupportedModel):
        lm_parts(model)
    cfg = load_config(None, [])
    bank = ExpertBank(model, cfg.experts)
    assert Scorer(bank, tok, cfg.nrem).fused is False


@pytest.mark.parametrize("stop", [("\n",), ("\nQ:",), ()])
def test_the_own_decode_loop_draws_what_generate_draws(setup, stop):
    path, tok, prompts = setup
    model = load_model(path)[0]
    texts = [p.teacher_prompt for p in prompts[:6]] * 2          # repeated rows are read once
    pre = [tok.encode(" The", add_special_tokens=False)] * len(texts)
    a = sample_ids(model, tok, texts, 16, 1.0, prefix_ids=pre, stop=stop, seed=5, loop="generate")
    b = sample_ids(model, tok, texts, 16, 1.0, prefix_ids=pre, stop=stop, seed=5, loop="own")
    # the static-KV-cache loop (what a GPU replays from CUDA graphs), twice: its cache is reused
    c = [sample_ids(model, tok, texts, 16, 1.0, prefix_ids=pre, stop=stop, seed=5, loop="static") for _ in range(2)]
    assert a == b == c[0] == c[1] and any(len(x) > 1 for x in a)


def test_the_teacher_pool_samples_once_and_draws_from_it(setup):
    _, _, prompts = setup
    calls = []

    class Counting:
        def teacher(self, ps):
            calls.append(len(ps))
            return [[len(calls), i] for i, _ in enumerate(ps)]

    tp = [p.teacher_prompt for p in prompts]
    pool = TeacherPool(Counting(), tp + tp, 3, random.Random(0), batch=10)
    assert sum(calls) == 3 * len(set(tp)) and max(calls) <= 10
    before = len(calls)
    for _ in range(5):
        for p, got in zip(tp, pool.teacher(tp)):
            assert got in pool.pool[p]
    assert len(calls) == before                          # every later draw came from the pool
    assert all(len(v) == 3 for v in pool.pool.values())


def test_the_cached_mode_switch_matches_peft_and_keeps_grad_flags(setup):
    path, tok, _ = setup
    cfg = load_config(None, [])
    bank = moved_bank(path, cfg)
    x = torch.tensor([tok.encode("Q: Where does the person live?\nA:")])
    trainable = {id(p) for p in bank.trainable_parameters()}
    with torch.no_grad():
        with bank.teacher_mode():
            teacher = bank.model(input_ids=x).logits
        student = bank.model(input_ids=x).logits
        bank.model.base_model.set_adapter(list(bank.on), inference_mode=True)   # PEFT's own switch
        want_teacher = bank.model(input_ids=x).logits
        bank.reactivate()
        with bank.model.disable_adapter():
            base = bank.model(input_ids=x).logits
        bank.reactivate()
    assert torch.allclose(teacher, want_teacher, atol=1e-6)
    assert not torch.allclose(teacher, student) and not torch.allclose(teacher, base)
    assert {id(p) for p in bank.model.parameters() if p.requires_grad} == trainable
    bank.freeze_current()
    bank.reset(bank.on)
    with torch.no_grad(), bank.teacher_mode():                # nothing on: the base model
        assert torch.allclose(bank.model(input_ids=x).logits, base, atol=1e-6)
    assert not any(p.requires_grad for p in bank.model.parameters())


def test_lora_weights_in_the_models_dtype_match_the_float32_upcast(setup):
    """``experts.adapter_dtype``: on a bf16 model the experts stay bf16 ("model", no casts in every
    layer) or are upcast to float32 (PEFT's default); the two give the same outputs to bf16 precision."""
    path, tok, _ = setup
    x = torch.tensor([tok.encode("Q: Where does the person live?\nA:")])
    out = {}
    for dtype in ("model", "float32"):
        torch.manual_seed(0)
        model = load_model(path)[0].to(torch.bfloat16)
        bank = ExpertBank(model, load_config(None, [f"experts.adapter_dtype={dtype}"]).experts)
        bank.open_new_expert()
        with torch.no_grad():
            for p in bank.trainable_parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())).to(p.dtype))
            out[dtype] = bank.model(input_ids=x).logits.float()
        assert {p.dtype for p in bank.trainable_parameters()} == {torch.bfloat16 if dtype == "model" else torch.float32}
    diff = (out["model"] - out["float32"]).abs()
    # bf16 rounding of the LoRA weights and their products, no more (measured: max 0.30, mean 0.056)
    assert diff.max() < 0.6 and diff.mean() < 0.1
    assert (out["model"].argmax(-1) == out["float32"].argmax(-1)).float().mean() > 0.9


def test_reading_the_stop_flag_every_few_draws_changes_no_row():
    """The GPU loop reads "has every row stopped?" back every CHECK_EVERY draws (a sync each): the
    rows are the same as reading it every draw, padded with at most CHECK_EVERY - 1 columns more."""
    from sleepray.draws import CHECK_EVERY, sample_loop
    V, B, stop, pad = 12, 5, 3, 0
    table = torch.randn(64, V, generator=torch.Generator().manual_seed(0))
    table[:, stop] += torch.linspace(-2, 3, 64)                  # rows stop sooner as the steps go on

    def run(every):
        torch.manual_seed(0)
        return sample_loop(table[0].expand(B, V).clone(), lambda nxt, t: table[t + 1].expand(B, V).clone(),
                            40, 1.0, [stop], pad, check_every=every)
    a, b = run(1), run(CHECK_EVERY)
    assert a.shape[1] < 40 and (a == stop).any(1).all()          # every row stopped before the budget
    assert torch.equal(b[:, : a.shape[1]], a) and a.shape[1] <= b.shape[1] < a.shape[1] + CHECK_EVERY
    assert (b[:, a.shape[1]:] == pad).all()


@pytest.mark.parametrize("fused", [False, True])
def test_rows_without_their_padding_mask_give_the_same_losses_and_gradients(setup, fused):
    """``nrem.async_rows``: right-padded rows passed without a mask (causal attention alone hides
    the padding after a row) give the masked path's divergence, LTI log-probs, anchor KL and
    gradients; rows of different lengths, so padding is there to hide."""
    path, tok, prompts = setup
    ys = [tok.encode(" x" * (1 + i % 5), add_special_tokens=False) for i in range(len(prompts))]
    assert len({len(tok.encode(p.prompt)) + len(y) for p, y in zip(prompts, ys)}) > 1
    out = {}
    for async_rows in (False, True):
        cfg = load_config(None, [f"nrem.fused_loss={fused}", f"nrem.reuse_context_kv={fused}",
                                 f"nrem.async_rows={async_rows}"])
        bank = moved_bank(path, cfg)
        sc = Scorer(bank, tok, cfg.nrem, contexts=_by_episode(prompts))
        assert sc.async_rows is async_rows
        out[async_rows] = losses_and_grads(sc, tok, prompts, ys)
    assert_same_losses(out[False], out[True])
    assert out[False][2] > 0                      # the anchor KL is not trivially equal


def test_a_padded_row_without_its_mask_keeps_its_states_and_with_a_mask_before_it_would_not(setup):
    """The mask may go only because the padding is after each row: the same rows left-padded
    (padding before the tokens) change without a mask, so the check can fail."""
    from sleepray.lm_forward import right_padded_input, span_hidden
    path, tok, _ = setup
    model = load_model(path)[0].eval()
    rows = [tok.encode("Ada lives in Paris and works as a baker."), tok.encode("Bo is here.")]
    starts, lens = [2, 2], [len(rows[0]) - 2, len(rows[1]) - 2]
    with torch.no_grad():
        masked = span_hidden(model, rows, starts, lens, 0)
        unmasked = span_hidden(model, rows, starts, lens, 0, async_rows=True)
        ids, attn = right_padded_input(rows, 0, "cpu", async_rows=True)
        assert attn is None and ids.shape == (2, len(rows[0]))
        n = len(rows[0]) - len(rows[1])
        left = torch.tensor([[0] * n + rows[1]])
        h = lm_parts(model)[0](input_ids=left).last_hidden_state[0, n + 1: n + 1 + lens[1]]
    assert torch.allclose(masked, unmasked, atol=1e-5)
    assert not torch.allclose(h, unmasked[lens[0]:], atol=1e-3)
