"""nrem.decode=fused (``sleepray.fused_decode``): on tiny random Llama, Mistral, Qwen2 and Qwen3
models with two active experts, in float32 on a CPU, the fused blocks give the model's own logits
(within 1e-5) at the prefill and at every decode step, for left-padded rows, as the student and
as the teacher; the sampler draws the same tokens as the eager loop; traced whole by
torch.compile (no graph break: on a GPU the step is one CUDA graph); families it cannot run are
refused up front; weights that train without moving their version are followed; the fused
weights die with their model. The CUDA-graph path itself is tested on a GPU
(tests/test_gpu_fused_decode.py)."""
import gc
import random
import weakref

import pytest
import torch

from bank_helpers import bank_with_moved_experts, moved_bank
from sleepray.config import load_config
from sleepray.fused_decode import FusedWeights, auto_loop, decode_fused, fused_weights, sliding_window, unsupported
from sleepray.models import load_model
from sleepray.nrem_samplers import LocalSampler
from sleepray.prompts import consolidation_prompts
from sleepray.tiny_models import build_tiny_model
from sleepray.world import World

RUNS = ("llama", "mistral", "qwen2", "qwen3")


def _bank(folder) -> tuple:
    """A float32 bank on the tiny model with a frozen expert and an open one, both moved off zero,
    and every norm weight and bias random (a tiny model's are 1 and 0, which would hide a norm or
    a bias used in the wrong place)."""
    model, tok = load_model(str(folder), "float32", "cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    return bank_with_moved_experts(model), tok


@pytest.fixture(scope="module", params=RUNS)
def bank_tok(request, tmp_path_factory):
    return _bank(build_tiny_model(request.param, tmp_path_factory.mktemp(f"fused-{request.param}")))


def _rows(tok):
    rows = [tok.encode("the old farmer walked to the market"), tok.encode("a sailor")]
    n = max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id] * (n - len(r)) + r for r in rows])
    attn = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows])
    return ids, attn


def _model_logits(model, ids, attn) -> torch.Tensor:
    """The model's own logits after the last token of each left-padded row."""
    pos = (attn.cumsum(-1) - 1).clamp_min(0)
    return model(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, -1]


def _empty_caches(fw: FusedWeights, B: int, L: int = 64) -> tuple[list, list]:
    kc = [torch.zeros(B, fw.kv_heads, L, fw.head_dim) for _ in fw.layers]
    return kc, [torch.zeros_like(k) for k in kc]


def _fused_logits(fw: FusedWeights, ids, attn, new: torch.Tensor, forward=None) -> list[torch.Tensor]:
    """The fused blocks' logits after the prompt and after each of ``new`` [B, k] fed one at a time."""
    forward = forward or fw.forward
    B, n = ids.shape
    L = 64
    kc, vc = _empty_caches(fw, B, L)
    keep = torch.zeros(B, L, dtype=torch.bool)
    keep[:, :n] = attn.bool()
    pos = (attn.cumsum(-1) - 1).clamp_min(0)
    out = [forward(ids, pos, torch.arange(n), keep, kc, vc)]
    last = pos[:, -1:]
    for t in range(new.shape[1]):
        keep[:, n + t] = True
        out.append(forward(new[:, t:t + 1], last + 1 + t, torch.tensor([n + t]), keep, kc, vc))
    return out


@torch.no_grad()
def test_the_fused_blocks_give_the_model_logits_as_student_and_teacher(bank_tok):
    bank, tok = bank_tok
    ids, attn = _rows(tok)
    new = torch.randint(3, len(tok), (2, 3), generator=torch.Generator().manual_seed(1))
    fw = fused_weights(bank.model)
    got = {}
    for teacher in (False, True):
        with bank.teacher_mode() if teacher else torch.no_grad():
            fw.refresh()
            fused = _fused_logits(fw, ids, attn, new)
            for k, f in enumerate(fused):
                full = torch.cat([ids, new[:, :k]], 1)
                want = _model_logits(bank.model, full, torch.cat([attn, torch.ones_like(new[:, :k])], 1))
                assert torch.allclose(f, want, atol=1e-5, rtol=1e-5), (teacher, k, (f - want).abs().max())
            got[teacher] = fused[-1]
    assert not torch.allclose(got[False], got[True], atol=1e-3)   # the experts matter: refresh followed them
    q = bank.model.get_base_model().model.layers[0].self_attn.q_proj   # no expert there: copied when it changes
    w = getattr(q, "base_layer", q).weight
    w.add_(0.2 * torch.sin(torch.arange(w.numel(), dtype=w.dtype)).view_as(w))   # not a scale: Qwen3's q norm hides one
    fw.refresh()
    assert torch.allclose(fw.forward(ids, (attn.cumsum(-1) - 1).clamp_min(0), torch.arange(ids.shape[1]),
                                     torch.cat([attn.bool(), torch.zeros(2, 64 - ids.shape[1], dtype=torch.bool)], 1),
                                     *_empty_caches(fw, 2)),
                          _model_logits(bank.model, ids, attn), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_peft_merge_and_the_one_product_merge_write_the_same_weights(bank_tok, monkeypatch):
    bank, _ = bank_tok
    fw = fused_weights(bank.model)
    fw.refresh()
    fast = [{k: v.clone() for k, v in layer.items() if k.endswith("_w")} for layer in fw.layers]
    monkeypatch.setattr("sleepray.fused_decode._plain_lora", lambda *a: False)   # every expert through PEFT
    fw.refresh()
    for a, layer in zip(fast, fw.layers):
        for k, v in a.items():
            assert torch.allclose(v, layer[k], atol=1e-6), k


@torch.no_grad()
def test_torch_compile_traces_the_step_whole(bank_tok):
    bank, tok = bank_tok
    ids, attn = _rows(tok)
    new = torch.randint(3, len(tok), (2, 2), generator=torch.Generator().manual_seed(2))
    fw = fused_weights(bank.model)
    fw.refresh()
    torch._dynamo.reset()
    traced = torch.compile(fw.forward, backend="eager", fullgraph=True, dynamic=False)   # a break raises
    eager = _fused_logits(fw, ids, attn, new)
    compiled = _fused_logits(fw, ids, attn, new, forward=traced)
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled))


@torch.no_grad()
def test_the_fused_loop_draws_the_eager_loops_tokens(bank_tok):
    bank, tok = bank_tok
    ids, attn = _rows(tok)
    out = []
    for loop in ("own", "fused"):
        torch.manual_seed(5)
        sampler = LocalSampler(bank, tok, 10, 1.0, loop, merged=True)
        if loop == "fused":
            assert sampler.merged is None          # it merges the experts itself
        out.append((sampler.student(["the old farmer walked to", "a sailor"]),
                    sampler.teacher(["every quiet sailor found the map", "the"])))
    assert out[0] == out[1] and any(len(y) > 2 for y in out[0][0])


def test_the_sampler_on_the_seed_model_draws_the_same_with_stop_strings(seed_test_model):
    bank, tok = moved_bank(str(seed_test_model), load_config(None, [])), load_model(str(seed_test_model))[1]
    prompts = [p for e in World(3, 1, 0, 0, 1).episodes(1) for p in consolidation_prompts(e, 4, random.Random(0))]
    out = []
    for loop in ("own", "fused"):
        sampler = LocalSampler(bank, tok, 12, 1.0, loop)
        torch.manual_seed(3)
        out.append((sampler.student([p.prompt for p in prompts]), sampler.teacher([p.teacher_prompt for p in prompts])))
    assert out[0] == out[1] and any(len(y) > 1 for y in out[0][0])


@pytest.mark.parametrize("family", ["gemma3", "phi3"])
def test_families_it_cannot_run_are_refused_up_front(family, tmp_path):
    bank, tok = _bank(build_tiny_model(family, tmp_path))
    with pytest.raises(ValueError, match="nrem.decode=fused cannot run model type"):
        LocalSampler(bank, tok, 4, 1.0, "fused")
    assert LocalSampler(bank, tok, 4, 1.0, "own").loop == "own"     # the others still run
    assert LocalSampler(bank, tok, 4, 1.0, "auto").loop == "own"    # auto falls back on a CPU
    assert auto_loop(bank.model, on_gpu=True) == "graph"             # and to transformers' graphs on a GPU


def test_auto_takes_the_fused_loop_on_a_gpu_where_it_can(bank_tok):
    bank, tok = bank_tok
    assert auto_loop(bank.model, on_gpu=True) == "fused"
    assert LocalSampler(bank, tok, 4, 1.0, "auto").loop == "own"    # on a CPU, transformers' eager loop


def test_sliding_windows_are_read_from_the_config_and_a_longer_row_is_refused(tmp_path):
    from transformers import MistralConfig, Qwen2Config, Qwen3Config
    assert sliding_window(MistralConfig()) == 4096 and sliding_window(Qwen3Config()) is None
    assert sliding_window(Qwen2Config(use_sliding_window=True, sliding_window=128)) == 128
    assert sliding_window(Qwen2Config()) is None
    bank, tok = _bank(build_tiny_model("mistral", tmp_path))
    bank.model.get_base_model().config.sliding_window = 32
    assert auto_loop(bank.model, on_gpu=True) == "graph"         # auto does not risk it
    ids, attn = _rows(tok)
    with pytest.raises(ValueError, match="sliding window"):
        decode_fused(bank.model, ids, attn, 40, 1.0, [], tok.pad_token_id)
    assert decode_fused(bank.model, ids, attn, 4, 1.0, [], tok.pad_token_id).shape == (2, 4)   # within it


def test_a_model_that_trains_every_weight_is_followed_through_a_fused_adamw_step(tmp_path):
    model, tok = load_model(str(build_tiny_model("qwen3", tmp_path)), "float32", "cpu")
    ids, attn = _rows(tok)
    fw = fused_weights(model)
    fw.refresh()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)   # writes without moving a version
    versions = [p._version for p in model.parameters()]
    model(input_ids=ids, attention_mask=attn).logits.square().mean().backward()
    opt.step()
    assert [p._version for p in model.parameters()] == versions
    with torch.no_grad():
        fw.refresh()
        got = _fused_logits(fw, ids, attn, torch.zeros(2, 0, dtype=torch.long))[0]
        assert torch.allclose(got, _model_logits(model, ids, attn), atol=1e-5, rtol=1e-5)


def test_the_fused_weights_die_with_their_model(tmp_path):
    model, tok = load_model(str(build_tiny_model("llama", tmp_path)), "float32", "cpu")
    ids, attn = _rows(tok)
    decode_fused(model, ids, attn, 3, 1.0, [], tok.pad_token_id)
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None


def test_lora_variants_and_dynamic_rope_are_refused():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=100)
    assert "RoPE 'dynamic'" in unsupported(LlamaForCausalLM(LlamaConfig(
        **small, rope_scaling={"rope_type": "dynamic", "factor": 2.0})))
    dora = get_peft_model(LlamaForCausalLM(LlamaConfig(**small)),
                          LoraConfig(r=2, target_modules=["gate_proj"], use_dora=True))
    assert "LoRA variant" in unsupported(dora)
    with pytest.raises(ValueError, match="LoRA variant"):
        FusedWeights(dora)


def test_config_takes_fused_and_refuses_a_loop_it_does_not_know():
    assert load_config(None, ["nrem.decode=fused"]).nrem.decode == "fused"
    with pytest.raises(Exception, match="decode"):
        load_config(None, ["nrem.decode=turbo"])
