"""experts.fused_lora on a GPU ("auto" fuses inputs on a GPU only): one bf16 layer's output and
gradients against PEFT's, and the NREM passes (student, teacher, loss, backward) with the fused
layers, eager and inside the compiled blocks replayed from CUDA graphs, against PEFT's layers,
step after step with the expert moved in place between steps.

Needs a GPU: CI has none, so this module is skipped there; the CPU tests run the same layers with
``only_cuda`` off (tests/test_fused_lora.py). It was run on the lent H200 (the closing note of the
learner issue gives the revision and the output).
"""
import random

import pytest
import torch

from bank_helpers import losses_and_grads, moved_bank
from sleepray import fused_lora
from sleepray.config import load_config
from sleepray.models import load_model
from sleepray.nrem import _by_episode
from sleepray.nrem_forward import Scorer
from sleepray.prompts import consolidation_prompts
from sleepray.tiny_models import build_tiny_model
from sleepray.world import World

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused path runs on a GPU")


def test_bf16_layer_matches_peft():
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(512, 1024)).to("cuda", torch.bfloat16)
    pm = get_peft_model(net, LoraConfig(r=8, lora_alpha=16, target_modules=["0"]), adapter_name="a",
                        autocast_adapter_dtype=False)
    layer = pm.base_model.model[0]
    with torch.no_grad():
        layer.lora_B["a"].weight.normal_(0, 0.05)
    x = torch.randn(4, 96, 512, device="cuda", dtype=torch.bfloat16)
    params = [layer.lora_A["a"].weight, layer.lora_B["a"].weight]

    def run():
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        (y.float() ** 2).mean().backward()
        out = [y.detach().float(), xi.grad.float()] + [p.grad.float().clone() for p in params]
        for p in params:
            p.grad = None
        return out
    ref = run()
    fused_lora.install(pm, only_cuda=True)
    assert fused_lora._fusable(layer, x, (), {}) == ["a"]
    got = run()
    for a, b in zip(ref, got):   # bf16: PEFT rounds three times where addmm rounds once
        assert torch.allclose(a, b, atol=2e-2 * a.abs().max().item(), rtol=2e-2)


@pytest.mark.parametrize("mode", ["fused", "fused_graphs"])
def test_nrem_passes_match_peft_step_after_step(mode, tmp_path):
    path = str(build_tiny_model("qwen3", tmp_path / "m"))
    tok = load_model(path)[1]
    prompts = [p for e in World(3, 1, 0, 0, 1).episodes(2) for p in consolidation_prompts(e, 6, random.Random(0))]
    ys = [tok.encode(f" answer {i}\n", add_special_tokens=False) for i in range(len(prompts))]
    graphs = ["nrem.compile_blocks=true", "nrem.block_graphs=true", "nrem.fast_guards=true"]
    runs = {}
    for name, over in {"peft": ["experts.fused_lora=false"],
                       mode: ["experts.fused_lora=auto"] + (graphs if mode == "fused_graphs" else [])}.items():
        cfg = load_config(None, [*over, "experts.max_slots=3"])
        bank = moved_bank(path, cfg, dtype="float32")   # float32: differences are the fusion's, not bf16's
        bank.model.to("cuda")
        assert fused_lora.installed(bank.model) is (name != "peft")
        sc = Scorer(bank, tok, cfg.nrem, contexts=_by_episode(prompts))
        out = []
        for i in range(4):
            sc.begin_step()
            bank.model.zero_grad(set_to_none=True)
            out.append(losses_and_grads(sc, tok, prompts, ys))
            with torch.no_grad():
                for j, p in enumerate(bank.trainable_parameters()):
                    p.add_(0.02 * torch.sin(torch.arange(p.numel(), device=p.device).view_as(p) + i + j))
        runs[name] = out
    for i, ((d0, lp0, kl0, g0), (d1, lp1, kl1, g1)) in enumerate(zip(runs["peft"], runs[mode])):
        assert d1 == pytest.approx(d0, rel=1e-3, abs=1e-5) and d0 > 0, i
        assert kl1 == pytest.approx(kl0, rel=1e-3, abs=1e-5), i
        assert torch.allclose(lp0, lp1, atol=1e-3), i
        for a, b in zip(g0, g1):
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-2), i
