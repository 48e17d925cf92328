"""nrem.compile_blocks: NREM's passes with each decoder block compiled by torch.compile (inductor,
here on CPU) give the plain path's divergence, log-probs, anchor KL and LoRA gradients; the
teacher's pass after its cached context stays eager; every block shares the compiled graphs."""
import random

import pytest
import torch

from bank_helpers import losses_and_grads, moved_bank
from sleepray.compiled_blocks import CompiledBlocks, decoder_layers, graph_length
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
    modes = {"plain": ["nrem.compile_blocks=false"], "compiled": ["nrem.compile_blocks=true"],
             # blocks after the second skip the guards that do not tell graphs apart (nrem.fast_guards)
             "fast_guards": ["nrem.compile_blocks=true", "nrem.fast_guards=true"],
             # "reduce-overhead" (CUDA graphs on a GPU; here the compiled blocks without them) and the
             # rows right-padded to few lengths (compiled_blocks.graph_length)
             "graphs": ["nrem.compile_blocks=true", "nrem.block_graphs=true", "nrem.block_graph_pad=16"]}
    for mode, over in modes.items():
        cfg = load_config(None, [*over, "nrem.compile_backend=inductor", "experts.max_slots=3"])
        bank = moved_bank(qwen3, cfg)
        sc = Scorer(bank, tok, cfg.nrem, contexts=_by_episode(prompts))
        assert (sc.blocks is not None) is (mode != "plain") and sc.fused
        assert (sc.blocks is not None and sc.blocks.graphs) is (mode == "graphs")
        for _ in range(1 if mode in ("plain", "compiled") else 2):   # the second time from the graphs the first made
            sc.begin_step()
            out[mode] = losses_and_grads(sc, tok, prompts, ys)
            bank.model.zero_grad(set_to_none=True)
        if mode == "compiled":
            assert all(m._compiled_call_impl is None for m in sc.blocks.targets)   # off outside the passes
            graphs = counters["stats"]["unique_graphs"]
    d0, lp0, kl0, g0 = out["plain"]
    for mode in ("compiled", "fast_guards", "graphs"):
        d1, lp1, kl1, g1 = out[mode]
        assert d1 == pytest.approx(d0, rel=1e-4, abs=1e-6) and d0 > 0
        assert kl1 == pytest.approx(kl0, rel=1e-4, abs=1e-6) and kl0 > 0
        assert torch.allclose(lp0, lp1, atol=1e-4)
        for a, b in zip(g0, g1):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-3)
    # the compiled code ran, and the blocks share graphs: the student's (gradient) and the anchor's
    # teacher (none), a static and a dynamic shape each; a graph per block would double them
    assert 2 <= graphs <= 8, dict(counters["stats"])


def test_graph_lengths_are_few_an_octave_and_pad_under_a_quarter():
    """nrem.block_graph_pad: one CUDA graph per padded length, so few lengths; every padded
    position costs as much as a real one, so little padding."""
    assert [graph_length(n, 16) for n in (1, 16, 17, 70, 73, 80, 81, 130, 300, 600)] == \
        [16, 16, 32, 80, 80, 80, 96, 160, 320, 640]
    assert graph_length(70, 64) == 128 and graph_length(70, 1) == 80 and graph_length(7, 1) == 7
    for pad in (1, 8, 16, 64):
        lengths = [graph_length(n, pad) for n in range(1, 4097)]
        assert all(m >= n and m % pad == 0 for n, m in enumerate(lengths, 1))
        assert all(m - n < max(pad, n / 4) for n, m in enumerate(lengths, 1))
        for lo in (4 * pad * 2 ** k for k in range(8)):        # above 4 * pad: at most four an octave
            assert len({m for n, m in enumerate(lengths, 1) if lo < n <= 2 * lo}) <= 4, (pad, lo)
    for bad in ((0, 16), (5, 0)):
        with pytest.raises(ValueError):
            graph_length(*bad)


def test_block_graph_passes_pad_their_rows_to_a_graph_length(qwen3, monkeypatch):
    """The student's pass under nrem.block_graphs pads its rows to graph_length (73 tokens: 80
    with the default pad of 16, not 128); without the graphs it pads nothing."""
    import sleepray.nrem_forward as nf
    seen = []
    real = nf.span_hidden
    monkeypatch.setattr(nf, "span_hidden", lambda model, rows, starts, lens, pad, prefix=None, multiple=1, *a:
                        seen.append(-(-max(map(len, rows)) // multiple) * multiple)
                        or real(model, rows, starts, lens, pad, prefix, multiple, *a))
    tok = load_model(qwen3)[1]
    for graphs in ("true", "false"):
        cfg = load_config(None, ["nrem.compile_blocks=true", f"nrem.block_graphs={graphs}"])
        assert cfg.nrem.block_graph_pad == 16
        sc = Scorer(bank := moved_bank(qwen3, cfg), tok, cfg.nrem)
        with torch.no_grad():
            sc.student([[5] * 9, [6] * 3], [[7] * 64, [8] * 60])
        bank.model.zero_grad(set_to_none=True)
    assert seen == [80, 73]


def test_block_graphs_need_the_inductor_compiled_blocks():
    from sleepray.config import ConfigError
    for over in (["nrem.block_graphs=true"], ["nrem.block_graphs=true", "nrem.compile_blocks=true",
                                              "nrem.compile_backend=aot_eager"]):
        with pytest.raises(ConfigError, match="block_graphs needs"):
            load_config(None, over)
    assert load_config(None, ["nrem.block_graphs=auto"]).nrem.block_graphs == "auto"


def test_rows_padded_to_a_multiple_give_the_same_states(qwen3):
    """Right padding after a row changes none of its states (what block_graph_pad relies on)."""
    from sleepray.lm_forward import span_hidden
    bank = moved_bank(qwen3, load_config(None, []))
    rows, starts, lens = [[5, 6, 7, 8, 9], [5, 11, 12]], [2, 1], [3, 2]
    with torch.no_grad():
        a = span_hidden(bank.model, rows, starts, lens, 0)
        b = span_hidden(bank.model, rows, starts, lens, 0, multiple=64)
    assert a.shape == b.shape == (5, bank.model.config.hidden_size)
    assert torch.allclose(a, b, atol=1e-5)


def test_repeat_call_checks_only_the_guards_that_tell_graphs_apart():
    """What nrem.fast_guards relies on and why it is only for repeated calls: with one graph
    compiled, a call through repeat_call checks no guard at all (a changed global is not seen)."""
    from sleepray.compiled_blocks import repeat_call
    torch._dynamo.reset()
    scale = {"v": 2.0}
    f = torch.compile(lambda x: x * scale["v"], backend="eager")
    x = torch.ones(3)
    assert f(x).tolist() == [2.0] * 3
    scale["v"] = 3.0
    assert repeat_call(f)(x).tolist() == [2.0] * 3     # the guard on scale["v"] skipped
    assert f(x).tolist() == [3.0] * 3                  # checked: recompiled


def test_the_graphed_decode_with_fast_guards_draws_what_the_eager_loop_draws(qwen3):
    """nrem.decode=graph with nrem.fast_guards: decode steps after a call's first skip the guards
    that do not tell graphs apart; the draws are the eager loop's (CUDA graphs need a GPU: here the
    compiled step runs without them)."""
    from sleepray.sampling import sample_ids
    bank = moved_bank(qwen3, load_config(None, ["experts.max_slots=3"]))
    tok = load_model(qwen3)[1]
    texts = ["Q: Where does Ada live?\nA:", "Q: What does Bo do?\nA:"]
    runs = {}
    for loop, fast in (("own", False), ("graph", True)):
        runs[loop] = [sample_ids(bank.model, tok, texts, 12, 1.0, stop=(), seed=s, loop=loop, fast_guards=fast)
                      for s in (1, 2)]
    assert runs["graph"] == runs["own"] and runs["own"][0] != runs["own"][1]


def test_the_attention_kernel_switch_is_on_in_the_passes_and_changes_no_loss(qwen3):
    """nrem.attention: the learner's passes run under the asked kernel (here 'math', which a CPU
    has) and give auto's losses and gradients."""
    tok = load_model(qwen3)[1]
    prompts = [p for e in World(3, 1, 0, 0, 1).episodes(1) for p in consolidation_prompts(e, 4, random.Random(0))]
    ys = [tok.encode(f" answer {i}\n", add_special_tokens=False) for i in range(len(prompts))]
    out, seen = {}, []
    for kernel in ("auto", "math"):
        cfg = load_config(None, [f"nrem.attention={kernel}"])
        bank = moved_bank(qwen3, cfg)
        sc = Scorer(bank, tok, cfg.nrem)     # its one check of the model's head runs as it is
        hook = decoder_layers(bank.model)[0].register_forward_pre_hook(
            lambda *_: seen.append((kernel, torch.backends.cuda.flash_sdp_enabled())))
        out[kernel] = losses_and_grads(sc, tok, prompts, ys)
        hook.remove()
    assert {f for k, f in seen if k == "math"} == {False} and {f for k, f in seen if k == "auto"} == {True}
    assert out["math"][0] == pytest.approx(out["auto"][0], rel=1e-5)
    for a, b in zip(out["math"][3], out["auto"][3]):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


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


def test_the_teacher_graph_is_as_long_as_the_runs_rows_can_be(qwen3):
    """nrem.teacher_graph: the graph's rows are the longest prompt after its episode's shared
    context plus max_new_tokens, rounded up to 16, and at most nrem.teacher_graph_tokens (every
    padded position costs a real one's time); a row that long runs in the graph."""
    from sleepray.lm_forward import common_prefix
    tok = load_model(qwen3)[1]
    prompts = [p for e in World(3, 1, 0, 0, 1).episodes(2) for p in consolidation_prompts(e, 5, random.Random(1))]
    tails = {}          # each teacher prompt's tokens after its episode's shared context
    for texts in _by_episode(prompts).values():
        ids = [tok.encode(t) for t in texts]
        tails.update({t: len(i) - common_prefix(ids) for t, i in zip(texts, ids)})
    own = max(tails.values())
    for cap, new in ((128, 20), (128, 21), (24, 20)):
        cfg = load_config(None, ["nrem.teacher_graph=true", f"nrem.teacher_graph_tokens={cap}",
                                 f"nrem.max_new_tokens={new}"])
        sc = Scorer(moved_bank(qwen3, cfg), tok, cfg.nrem, contexts=_by_episode(prompts), rows=4)
        assert sc.graph.length == min(cap, -(-(own + new) // 16) * 16), (cap, new, own)
    assert sc.graph.length == 24 < own + 20
    p = max(prompts, key=lambda p: tails[p.teacher_prompt])
    cfg = load_config(None, ["nrem.teacher_graph=true", "nrem.max_new_tokens=20"])
    sc = Scorer(moved_bank(qwen3, cfg), tok, cfg.nrem, contexts=_by_episode(prompts), rows=4)
    ran = []
    sc._graphed = lambda *a, real=sc._graphed: ran.append(real(*a)) or ran[-1]
    sc.teacher([p.episode_id], [tok.encode(p.teacher_prompt)], [[7] * 20])     # the longest row there is
    assert ran and ran[0] is not None
