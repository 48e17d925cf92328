"""nrem.compile_blocks: the student and teacher passes with each decoder block's norms and MLP
(with its LoRA layers) compiled by torch.compile (inductor, here on CPU) give the plain path's
divergence, log-probs, anchor KL and LoRA gradients; the pieces that touch the KV cache stay
eager; every block shares the compiled graphs."""
import random

import pytest
import torch

from sleepray.compiled_blocks import compile_targets, decoder_layers
from sleepray.config import load_config
from sleepray.experts import ExpertBank
from sleepray.models import load_model
from sleepray.nrem import _by_episode
from sleepray.nrem_forward import Scorer
from sleepray.prompts import consolidation_prompts
from sleepray.tiny_models import build_tiny_model
from sleepray.world import World


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """A tiny Qwen3 (its attention has q/k norms of its own), 2 blocks."""
    return str(build_tiny_model("qwen3", tmp_path_factory.mktemp("qwen3") / "m"))


def _bank(path, cfg):
    torch.manual_seed(0)
    bank = ExpertBank(load_model(path)[0], cfg.experts)
    frozen = bank.open_new_expert()
    with torch.no_grad():
        for p in bank.slot_parameters(frozen):
            p.add_(0.05 * torch.randn_like(p))
    bank.freeze_current()
    bank.open_new_expert()
    with torch.no_grad():
        for p in bank.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    return bank


def test_the_compiled_pieces_are_the_norms_and_mlps_not_attention(qwen3):
    cfg = load_config(None, [])
    bank = _bank(qwen3, cfg)
    layers = decoder_layers(bank.model)
    names = {type(m).__name__ for m in compile_targets(bank.model)}
    assert names == {"Qwen3MLP", "Qwen3RMSNorm"}
    per_block = len(compile_targets(bank.model)) / len(layers)
    assert per_block == 5          # input and post-attention norms, the MLP, q_norm and k_norm
    assert not any(hasattr(m, "layer_idx") for t in compile_targets(bank.model) for m in t.modules())


def test_compiled_blocks_give_the_plain_losses_and_gradients(qwen3):
    from torch._dynamo.utils import counters
    tok = load_model(qwen3)[1]
    prompts = [p for e in World(3, 1, 0, 0, 1).episodes(2) for p in consolidation_prompts(e, 6, random.Random(0))]
    ys = [tok.encode(f" answer {i}\n", add_special_tokens=False) for i in range(len(prompts))]
    out = {}
    torch._dynamo.reset()
    counters.clear()
    for mode in ("false", "true"):
        cfg = load_config(None, [f"nrem.compile_blocks={mode}", "nrem.compile_backend=inductor"])
        bank = _bank(qwen3, cfg)
        sc = Scorer(bank, tok, cfg.nrem, contexts=_by_episode(prompts))
        assert (sc.blocks is not None) is (mode == "true") and sc.fused
        rows = [tok.encode(p.prompt) for p in prompts]
        s = sc.student(rows, ys)
        t = sc.teacher([p.episode_id for p in prompts], [tok.encode(p.teacher_prompt) for p in prompts], ys)
        div = sc.jsd(s, t, 0.5)
        lp = sc.token_logprobs(s, ys)
        kl = sc.anchor_kl(["Some text that has nothing to do with it.", "Another line."])
        (div + lp.mean() + kl).backward()
        out[mode] = (div.item(), lp.detach(), kl.item(), [p.grad.clone() for p in bank.trainable_parameters()])
        if mode == "true":
            assert all(m._compiled_call_impl is None for m in sc.blocks.targets)   # off outside the passes
            graphs = counters["stats"]["unique_graphs"]
    (d0, lp0, kl0, g0), (d1, lp1, kl1, g1) = out["false"], out["true"]
    assert d1 == pytest.approx(d0, rel=1e-4, abs=1e-6) and d0 > 0
    assert kl1 == pytest.approx(kl0, rel=1e-4, abs=1e-6) and kl0 > 0
    assert torch.allclose(lp0, lp1, atol=1e-4)
    for a, b in zip(g0, g1):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-3)
    # the compiled code ran, and the blocks' pieces share graphs: a norm's (on [B, L, H] and on
    # [B, L, heads, d]) and an MLP's, with and without gradient, a static and a dynamic shape each;
    # a graph per block would have twice these (the same run on 6 blocks compiles as many as on 2)
    assert 2 <= graphs <= 24, dict(counters["stats"])
