"""experts.fused_lora (``sleepray.fused_lora``): on tiny random Llama and Qwen3 models in float32
on a CPU, the fused LoRA layers give PEFT's outputs and every gradient (input, open expert,
a base weight that trains, a bias) within 1e-5, with several adapters active and through a
whole model's loss; calls PEFT's fused path cannot match go to PEFT's own forward (dropout
while training, DoRA, disabled or merged adapters, hooks, another dtype, ``only_cuda`` on a
CPU); torch.compile traces it whole; the bank installs it from its config, and it survives a
deep copy. Its speed is measured on a GPU by the learner benchmark (bare variant
``tuned_lora``)."""
import copy

import pytest
import torch
from torch import nn

from bank_helpers import assert_same_losses, bank_with_moved_experts, moving_expert_steps, two_episode_rows
from sleepray import fused_lora
from sleepray.config import ExpertConfig
from sleepray.experts import ExpertBank
from sleepray.models import load_model
from sleepray.tiny_models import build_tiny_model


def _peft_layer(dtype=torch.float32, bias=True, adapters=2, dropout=0.0, **lora):
    """One PEFT LoRA Linear (12 -> 10) with ``adapters`` adapters, B moved off zero."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 10, bias=bias)).to(dtype)
    cfg = dict(r=4, lora_alpha=8, target_modules=["0"], lora_dropout=dropout, **lora)
    pm = get_peft_model(net, LoraConfig(**cfg), adapter_name="a0", autocast_adapter_dtype=False)
    for i in range(1, adapters):
        pm.add_adapter(f"a{i}", LoraConfig(**{**cfg, "lora_alpha": 2 + 4 * i}), autocast_adapter_dtype=False)
    layer = pm.base_model.model[0]
    with torch.no_grad():
        for name in layer.lora_B:
            layer.lora_B[name].weight.normal_(0, 0.3)
    layer._active_adapter = [f"a{i}" for i in range(adapters)]
    return pm, layer


def _out_and_grads(layer, x, trainable):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    (y * torch.linspace(-1, 1, y.shape[-1])).square().sum().backward()
    grads = [x.grad] + [p.grad.clone() for p in trainable]
    for p in trainable:
        p.grad = None
    return y.detach(), grads


@pytest.mark.parametrize("bias", [True, False])
def test_layer_matches_peft(bias):
    """Output and gradients of the input, both adapters' A and B, the base weight and bias."""
    pm, layer = _peft_layer(bias=bias)
    trainable = [p for p in pm.parameters()]
    for p in trainable:
        p.requires_grad_(True)
    x = torch.randn(3, 5, 12)
    ref = _out_and_grads(layer, x, trainable)
    assert fused_lora.install(pm) == 1
    calls = []
    orig = fused_lora.FusedLoRALinear.apply
    fused_lora.FusedLoRALinear.apply = lambda *a: calls.append(1) or orig(*a)
    try:
        got = _out_and_grads(layer, x, trainable)
    finally:
        fused_lora.FusedLoRALinear.apply = orig
    assert calls, "the fused path did not run"
    assert torch.allclose(ref[0], got[0], atol=1e-5)
    assert len(ref[1]) == len(got[1]) == 1 + 1 + int(bias) + 4   # x, W, b, two A and two B
    for a, b in zip(ref[1], got[1]):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    with torch.no_grad():   # without gradients: the same products, no autograd function
        assert torch.allclose(layer(x), ref[0], atol=1e-5)


def test_only_some_inputs_need_gradients():
    """A frozen expert and an open one, the base frozen, an input without gradient: only the open
    expert's A and B get gradients, equal to PEFT's."""
    pm, layer = _peft_layer()
    for p in pm.parameters():
        p.requires_grad_(False)
    opened = [layer.lora_A["a1"].weight, layer.lora_B["a1"].weight]
    for p in opened:
        p.requires_grad_(True)
    x = torch.randn(4, 12)

    def run():
        (layer(x) ** 2).sum().backward()
        out = [p.grad.clone() for p in opened]
        for p in opened:
            p.grad = None
        return out
    ref = run()
    fused_lora.install(pm)
    got = run()
    for a, b in zip(ref, got):
        assert torch.allclose(a, b, atol=1e-5)
    assert layer.lora_A["a0"].weight.grad is None and layer.base_layer.weight.grad is None


@pytest.mark.parametrize("case", ["dropout", "dora", "disabled", "merged", "hook", "dtype", "only_cuda"])
def test_falls_back_to_peft(case):
    """Every call the fused path could not match runs PEFT's forward, with PEFT's result."""
    pm, layer = _peft_layer(dropout=0.5 if case == "dropout" else 0.0,
                            **({"use_dora": True} if case == "dora" else {}))
    pm.train()
    x = torch.randn(2, 12)
    if case == "hook":
        layer.base_layer.register_forward_hook(lambda m, i, o: o * 2)
    if case == "dtype":   # adapters in float64 on a float32 layer: PEFT casts the input, the fused path cannot
        layer.lora_A.double()
        layer.lora_B.double()
    fused_lora.install(pm, only_cuda=case == "only_cuda")
    if case == "disabled":
        pm.base_model.disable_adapter_layers()
    if case == "merged":
        layer.merge(adapter_names=["a0"])
    assert fused_lora._fusable(layer, x, (), {}) is None
    torch.manual_seed(1)
    want = layer.__dict__[fused_lora._ORIGINAL](x)
    torch.manual_seed(1)
    assert torch.equal(layer(x), want)


def test_dropout_in_eval_is_fused():
    pm, layer = _peft_layer(dropout=0.5)
    pm.eval()
    fused_lora.install(pm)
    assert fused_lora._fusable(layer, torch.randn(2, 12), (), {}) == ["a0", "a1"]


def _whole_model(family, tmp_path, cfg):
    model = load_model(str(build_tiny_model(family, tmp_path)), "float32", "cpu")[0]
    return bank_with_moved_experts(model) if cfg is None else ExpertBank(model, cfg)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_whole_model_loss_and_gradients(family, tmp_path):
    """A model's loss and the open expert's gradients with the fused layers equal PEFT's."""
    bank = _whole_model(family, tmp_path, None)
    ids = torch.randint(3, 60, (3, 9))

    def run():
        loss = bank.model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = [p.grad.clone() for p in bank.trainable_parameters()]
        bank.model.zero_grad(set_to_none=True)
        return loss.item(), grads
    ref = run()
    assert fused_lora.install(bank.model) == len(bank._lora_layers())
    got = run()
    assert got[0] == pytest.approx(ref[0], rel=1e-6)
    assert any(g.abs().sum() > 0 for g in ref[1])
    for a, b in zip(ref[1], got[1]):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_compile_traces_whole(tmp_path):
    """torch.compile (fullgraph, aot_eager) traces a block with the fused layers: forward and
    backward equal the eager ones."""
    bank = _whole_model("qwen3", tmp_path, None)
    fused_lora.install(bank.model)
    mlp = bank.model.base_model.model.model.layers[0].mlp
    x = torch.randn(2, 5, mlp.gate_proj.base_layer.in_features)

    def run(fn):
        y = fn(x)
        y.square().sum().backward()
        g = [p.grad.clone() for p in bank.trainable_parameters() if p.grad is not None]
        bank.model.zero_grad(set_to_none=True)
        return y.detach(), g
    ref = run(mlp)
    got = run(torch.compile(mlp, backend="aot_eager", fullgraph=True))
    assert torch.allclose(ref[0], got[0], atol=1e-6)
    assert len(ref[1]) == len(got[1]) > 0
    for a, b in zip(ref[1], got[1]):
        assert torch.allclose(a, b, atol=1e-6)


def test_bank_installs_from_config(tmp_path):
    path = str(build_tiny_model("llama", tmp_path))
    plain = ExpertBank(load_model(path, "float32", "cpu")[0], ExpertConfig(rank=4, max_slots=2))
    assert not fused_lora.installed(plain.model)
    bank = ExpertBank(load_model(path, "float32", "cpu")[0], ExpertConfig(rank=4, max_slots=2, fused_lora="auto"))
    assert fused_lora.installed(bank.model)
    layer = bank._lora_layers()[0]
    x = torch.randn(2, layer.base_layer.in_features)
    assert fused_lora._fusable(layer, x, (), {}) is None   # auto: inputs on a GPU only
    twin = copy.deepcopy(bank.model)
    assert fused_lora.installed(twin)
    tl = [m for m in twin.modules() if type(m) is type(layer)][0]
    assert tl.forward.__self__ is tl
    fused_lora.uninstall(bank.model)
    assert not fused_lora.installed(bank.model)


def test_nrem_passes_match_peft_as_the_expert_moves(tmp_path):
    """The NREM passes (student, teacher after its cached context, JSD, LTI log-probs, anchor KL,
    backward) with the fused layers equal PEFT's within 1e-5, four steps with the expert moved in
    place between them (on a GPU, also inside the graphed blocks: tests/test_gpu_fused_lora.py)."""
    path = str(build_tiny_model("qwen3", tmp_path / "m"))
    tok = load_model(path)[1]
    prompts, ys = two_episode_rows(tok)
    runs = {}
    for on in (False, True):
        sc, runs[on] = moving_expert_steps(path, tok, prompts, ys, [f"experts.fused_lora={on}"], device="cpu")
        assert fused_lora.installed(sc.bank.model) is on
    for a, b in zip(runs[False], runs[True]):
        assert_same_losses(a, b)
    assert runs[False][3][0] != pytest.approx(runs[False][0][0], rel=1e-6)   # the expert did move
