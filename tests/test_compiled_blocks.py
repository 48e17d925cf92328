"""nrem.compile_blocks: NREM's passes with each decoder block compiled by torch.compile (inductor,
here on CPU) give the plain path's divergence, log-probs, anchor KL and LoRA gradients; the
teacher's pass after its cached context stays eager; every block shares the compiled graphs."""
import random

import pytest
import torch

from bank_helpers import losses_and_grads, moved_bank
from sleepray.compiled_blocks import CompiledBlocks, decoder_layers
from sleepray.config import load_config
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


def test_the_compiled_pieces_are_the_decoder_blocks(qwen3):
    bank = moved_bank(qwen3, load_config(None, []))
    targets = CompiledBlocks(bank.model).targets
    assert [type(m).__name__ for m in targets] == ["Qwen3DecoderLayer"] * 2
    assert decoder_layers(bank.model) is bank.model.base_model.model.model.layers


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
        bank = moved_bank(qwen3, cfg)
        sc = Scorer(bank, tok, cfg.nrem, contexts=_by_episode(prompts))
        assert (sc.blocks is not None) is (mode == "true") and sc.fused
        out[mode] = losses_and_grads(sc, tok, prompts, ys)
        if mode == "true":
            assert all(m._compiled_call_impl is None for m in sc.blocks.targets)   # off outside the passes
            graphs = counters["stats"]["unique_graphs"]
    (d0, lp0, kl0, g0), (d1, lp1, kl1, g1) = out["false"], out["true"]
    assert d1 == pytest.approx(d0, rel=1e-4, abs=1e-6) and d0 > 0
    assert kl1 == pytest.approx(kl0, rel=1e-4, abs=1e-6) and kl0 > 0
    assert torch.allclose(lp0, lp1, atol=1e-4)
    for a, b in zip(g0, g1):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-3)
    # the compiled code ran, and the blocks share graphs: the student's (gradient) and the anchor's
    # teacher (none), a static and a dynamic shape each; a graph per block would double them
    assert 2 <= graphs <= 8, dict(counters["stats"])


def test_the_graphed_teacher_pass_equals_the_eager_one(qwen3):
    """nrem.teacher_graph: the teacher's states after each episode's context from the static KV cache
    that holds the context for every row, rows and lengths padded to the graph's, equal the eager
    pass over the shared PrefixKV. Compiled with "reduce-overhead" as on a GPU; CUDA graphs need a
    GPU, so on this CPU the compiled pass runs without them (the GPU run is the learner benchmark's)."""
    tok = load_model(qwen3)[1]
    prompts = [p for e in World(3, 1, 0, 0, 1).episodes(2) for p in consolidation_prompts(e, 5, random.Random(1))]
    ys = [tok.encode(f" answer {i} and more\n", add_special_tokens=False) for i in range(len(prompts))]
    eps = [p.episode_id for p in prompts]
    out = {}
    for on in ("false", "true"):
        cfg = load_config(None, [f"nrem.teacher_graph={on}", "nrem.teacher_graph_tokens=32"])
        bank = moved_bank(qwen3, cfg)
        sc = Scorer(bank, tok, cfg.nrem, contexts=_by_episode(prompts), rows=len(prompts))
        out[on] = sc.teacher(eps, [tok.encode(p.teacher_prompt) for p in prompts], ys)
        again = sc.teacher(eps[:3], [tok.encode(p.teacher_prompt) for p in prompts[:3]], ys[:3])
        assert torch.allclose(again, out[on][: sum(len(y) for y in ys[:3])], atol=1e-5)  # fewer rows, padded
        if on == "true":
            assert sc.graph._prefix is not None                            # it ran
            long = [y * 4 for y in ys[:2]]                                  # longer than the graph: eager
            sc.teacher(eps[:2], [tok.encode(p.teacher_prompt) for p in prompts[:2]], long)
        else:
            assert sc.graph is None
    assert out["true"].shape == out["false"].shape
    assert torch.allclose(out["true"], out["false"], atol=1e-4, rtol=1e-4)
