"""experts.fused_lora on a GPU ("auto" fuses inputs on a GPU only): one bf16 layer's output and
gradients against PEFT's, and the NREM passes (student, teacher, loss, backward) with the fused
layers, eager and inside the compiled blocks replayed from CUDA graphs, against PEFT's layers,
step after step with the expert moved in place between steps.

Needs a GPU: CI has none, so this module is skipped there; the CPU tests run the same layers with
``only_cuda`` off (tests/test_fused_lora.py). It was run on the lent H200 (the closing note of the
learner issue gives the revision and the output).
"""
import pytest
import torch

from bank_helpers import assert_same_losses, moving_expert_steps, two_episode_rows
from sleepray import fused_lora
from sleepray.models import load_model
from sleepray.tiny_models import build_tiny_model

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
    prompts, ys = two_episode_rows(tok)
    graphs = ["nrem.compile_blocks=true", "nrem.block_graphs=true", "nrem.fast_guards=true"]
    runs = {}
    for name, over in {"peft": ["experts.fused_lora=false"],
                       mode: ["experts.fused_lora=auto"] + (graphs if mode == "fused_graphs" else [])}.items():
        sc, runs[name] = moving_expert_steps(path, tok, prompts, ys, over)
        assert fused_lora.installed(sc.bank.model) is (name != "peft")
    for a, b in zip(runs["peft"], runs[mode]):
        assert_same_losses(a, b, tight=False)
