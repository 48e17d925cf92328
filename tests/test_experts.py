"""L1 experts (sleepray.experts): tiny random Llama, CPU, seeded."""
from __future__ import annotations

import json
import random

import pytest
import torch

pytest.importorskip("peft")
from peft import PeftModel  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from sleepray.config import ExpertConfig  # noqa: E402
from sleepray.experts import ExpertBank, check_adapter_compatible  # noqa: E402

ATOL = 1e-5


def tiny_llama(seed=0, hidden=32, inter=64):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


def ecfg(**kw):
    base = dict(rank=4, lora_alpha=8.0, dropout=0.0, max_slots=3)
    base.update(kw)
    return ExpertConfig(**base)


IDS = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(123))


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits.detach().clone()


def train_steps(bank, n=3, lr=1e-2, seed=1):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(bank.trainable_parameters(), lr=lr)
    bank.model.train()
    for _ in range(n):
        x = torch.randint(0, 64, (2, 8), generator=g)
        loss = bank.model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    bank.model.eval()


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_open_unchanged_and_only_new_expert_trains():
    bank = ExpertBank(tiny_llama(), ecfg())
    before = logits(bank.model)
    s0 = bank.open_new_expert()
    assert s0 == "expert_0" and bank.training == s0
    torch.testing.assert_close(logits(bank.model), before, atol=ATOL, rtol=0)
    trainable = {n for n, p in bank.model.named_parameters() if p.requires_grad}
    assert trainable and all(f".{s0}." in n for n in trainable)
    assert {id(p) for p in bank.trainable_parameters()} == {
        id(p) for p in bank.model.parameters() if p.requires_grad}

    train_steps(bank)
    bank.freeze_current()
    after_first = logits(bank.model)
    assert not torch.allclose(after_first, before, atol=1e-4)

    s1 = bank.open_new_expert()
    assert s1 == "expert_1"
    torch.testing.assert_close(logits(bank.model), after_first, atol=ATOL, rtol=0)
    trainable = [n for n, p in bank.model.named_parameters() if p.requires_grad]
    assert trainable and all(f".{s1}." in n for n in trainable)
    snap = snapshot(bank.model)
    train_steps(bank, seed=2)
    now = snapshot(bank.model)
    changed = {k for k in snap if not torch.equal(snap[k], now[k])}
    assert changed and all(f".{s1}." in k for k in changed), sorted(changed)[:5]
    # both experts are active in the forward pass
    assert set(bank.model.base_model.active_adapters) == {s0, s1}
    bank.freeze_current()
    both = logits(bank.model)
    assert not torch.allclose(both, after_first, atol=1e-4)
    bank.model.base_model.set_adapter([s0], inference_mode=True)
    torch.testing.assert_close(logits(bank.model), after_first, atol=ATOL, rtol=0)
    bank._apply()
    torch.testing.assert_close(logits(bank.model), both, atol=ATOL, rtol=0)
    assert not any(p.requires_grad for p in bank.model.parameters())


def _bank_with_two(alpha2=None):
    """Two trained experts; the second with a different scaling when alpha2 given."""
    bank = ExpertBank(tiny_llama(), ecfg())
    bank.open_new_expert()
    train_steps(bank, lr=5e-2)
    bank.freeze_current()
    if alpha2 is not None:  # different lora_alpha / r for the second expert
        for layer in bank._lora_layers():
            layer.scaling["expert_1"] = alpha2 / layer.r["expert_1"]
        bank.model.peft_config["expert_1"].lora_alpha = alpha2
    bank.open_new_expert()
    train_steps(bank, lr=5e-2, seed=3)
    bank.freeze_current()
    return bank


@pytest.mark.parametrize("alpha2", [None, 3.0])
def test_export_combined_exact(tmp_path, alpha2):
    bank = _bank_with_two(alpha2)
    ref = logits(bank.model)
    assert (ref - logits(tiny_llama())).abs().max() > 1e-2  # the experts matter
    out = bank.export_combined(tmp_path / "combined")
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "combined").exists()
    assert "combined" not in bank.model.peft_config
    torch.testing.assert_close(logits(bank.model), ref, atol=0, rtol=0)
    acfg = json.loads((out / "adapter_config.json").read_text())
    assert acfg["r"] == 8 and acfg["lora_alpha"] == 8  # sum of ranks, scaling 1
    assert check_adapter_compatible(tiny_llama(), out)["r"] == 8
    loaded = PeftModel.from_pretrained(tiny_llama(), str(out)).eval()
    torch.testing.assert_close(logits(loaded), ref, atol=ATOL, rtol=0)


def test_export_single_expert(tmp_path):
    bank = ExpertBank(tiny_llama(), ecfg())
    bank.open_new_expert()
    train_steps(bank, lr=5e-2)
    ref = logits(bank.model)
    out = bank.export_combined(tmp_path / "one")
    loaded = PeftModel.from_pretrained(tiny_llama(), str(out)).eval()
    torch.testing.assert_close(logits(loaded), ref, atol=ATOL, rtol=0)
    # still training the same expert after export
    assert [n for n, p in bank.model.named_parameters() if p.requires_grad]
    with pytest.raises(FileExistsError):
        bank.export_combined(tmp_path / "one")


def test_deep_sleep_merge(tmp_path):
    bank = _bank_with_two()
    ref = logits(bank.model)
    base = bank.deep_sleep()
    assert not isinstance(base, PeftModel)
    assert not any("lora" in k for k in base.state_dict())
    torch.testing.assert_close(logits(base.eval()), ref, atol=ATOL, rtol=0)
    base.save_pretrained(tmp_path / "base", safe_serialization=True)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()
    torch.testing.assert_close(logits(reloaded), ref, atol=ATOL, rtol=0)
    with pytest.raises(RuntimeError, match="deep-slept"):
        bank.open_new_expert()
    fresh = ExpertBank(base, ecfg())
    assert fresh.free_slots == ["expert_0", "expert_1", "expert_2"]


def test_save_load_roundtrip(tmp_path):
    bank = _bank_with_two()
    bank.open_new_expert()
    train_steps(bank, lr=5e-2, seed=4)
    ref = logits(bank.model)
    bank.save(tmp_path / "bank", lineage={"sleep": 3, "parent": "base-v0"})
    meta = json.loads((tmp_path / "bank" / "bank.json").read_text())
    assert meta["slots_on"] == ["expert_0", "expert_1"] and meta["training"] == "expert_2"
    assert meta["lineage"] == {"sleep": 3, "parent": "base-v0"}
    for s in ("expert_0", "expert_1", "expert_2"):
        assert (tmp_path / "bank" / "experts" / s / "adapter_config.json").is_file()
    # save again over it (swap path), then load
    bank.save(tmp_path / "bank")
    assert not [p for p in (tmp_path / "bank").iterdir() if p.name.startswith(".")]
    loaded = ExpertBank.load(tiny_llama(), tmp_path / "bank")
    assert loaded.on == ["expert_0", "expert_1"] and loaded.training == "expert_2"
    assert loaded.versions == bank.versions and loaded.lineage["parent"] == "base-v0"
    torch.testing.assert_close(logits(loaded.model), ref, atol=0, rtol=0)
    trainable = [n for n, p in loaded.model.named_parameters() if p.requires_grad]
    assert trainable and all(".expert_2." in n for n in trainable)
    # a corrupted adapter file is detected
    f = tmp_path / "bank" / "experts" / "expert_0" / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ValueError, match="do not match"):
        ExpertBank.load(tiny_llama(), tmp_path / "bank")


def test_no_free_slot_and_reset():
    bank = ExpertBank(tiny_llama(), ecfg(max_slots=2))
    for _ in range(2):
        bank.open_new_expert()
        train_steps(bank, n=1, lr=5e-2)
        bank.freeze_current()
    with pytest.raises(RuntimeError, match="no free expert slot"):
        bank.open_new_expert()
    only_first = None
    bank.reset(["expert_1"])
    assert bank.on == ["expert_0"] and bank.free_slots == ["expert_1"]
    only_first = logits(bank.model)
    assert bank.open_new_expert() == "expert_1"
    torch.testing.assert_close(logits(bank.model), only_first, atol=ATOL, rtol=0)
    bank.reset([0, 1])
    assert bank.active_slots == [] and bank.training is None
    torch.testing.assert_close(logits(bank.model), logits(tiny_llama()), atol=ATOL, rtol=0)


def test_random_free_slot_context_restores():
    bank = ExpertBank(tiny_llama(), ecfg())
    bank.open_new_expert()
    train_steps(bank, n=1, lr=5e-2)
    ref = logits(bank.model)
    snap = snapshot(bank.model)
    grads = {n: p.requires_grad for n, p in bank.model.named_parameters()}
    active = list(bank.model.base_model.active_adapters)
    with bank.random_free_slot_context(random.Random(0)) as slot:
        assert slot in ("expert_1", "expert_2") and slot not in bank.free_slots
        inside = logits(bank.model)
        assert not torch.allclose(inside, ref, atol=1e-4)
        assert not any(p.requires_grad for n, p in bank.model.named_parameters() if f".{slot}." in n)
    torch.testing.assert_close(logits(bank.model), ref, atol=0, rtol=0)
    now = snapshot(bank.model)
    assert all(torch.equal(snap[k], now[k]) for k in snap)
    assert grads == {n: p.requires_grad for n, p in bank.model.named_parameters()}
    assert list(bank.model.base_model.active_adapters) == active
    # restores after an exception too
    with pytest.raises(KeyError):
        with bank.random_free_slot_context(7):
            raise KeyError("boom")
    torch.testing.assert_close(logits(bank.model), ref, atol=0, rtol=0)


def test_check_adapter_compatible_rejects_other_size(tmp_path):
    bank = ExpertBank(tiny_llama(hidden=48, inter=96), ecfg())
    bank.open_new_expert()
    bank.freeze_current()
    bank.save(tmp_path / "big")
    folder = tmp_path / "big" / "experts" / "expert_0"
    check_adapter_compatible(tiny_llama(hidden=48, inter=96), folder)
    with pytest.raises(ValueError) as e:
        check_adapter_compatible(tiny_llama(), folder)
    msg = str(e.value)
    assert "_proj" in msg and "in_features=" in msg and "lora_A [" in msg
    # a target module the base does not have
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["target_modules"] = ["gate_proj", "w_in"]
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="w_in"):
        check_adapter_compatible(tiny_llama(hidden=48, inter=96), folder)
    # only safetensors
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    with pytest.raises(ValueError, match="safetensors"):
        check_adapter_compatible(tiny_llama(hidden=48, inter=96), folder)


def test_scale_training_scales_the_weight_delta_exactly():
    """scale_training(s) multiplies the training expert's B: its weight delta B A becomes s B A,
    so 0 gives back the model before the expert, and the frozen experts stay as they were."""
    bank = ExpertBank(tiny_llama(), ecfg())
    bank.open_new_expert()
    train_steps(bank)
    bank.freeze_current()
    bank.open_new_expert()
    train_steps(bank)
    with bank.teacher_mode():
        before = logits(bank.model)
    deltas = {}
    for layer in bank._lora_layers():
        if bank.training in layer.lora_B:
            deltas[id(layer)] = (layer.lora_B[bank.training].weight @ layer.lora_A[bank.training].weight).clone()
    frozen = [p.detach().clone() for p in bank.slot_parameters(bank.on[0])]
    bank.scale_training(0.25)
    for layer in bank._lora_layers():
        if bank.training in layer.lora_B:
            now = layer.lora_B[bank.training].weight @ layer.lora_A[bank.training].weight
            assert torch.allclose(now, 0.25 * deltas[id(layer)], atol=1e-7)
    assert not torch.allclose(logits(bank.model), before, atol=ATOL)
    bank.scale_training(0.0)
    assert torch.allclose(logits(bank.model), before, atol=ATOL)
    assert all(torch.equal(a, b) for a, b in zip(frozen, bank.slot_parameters(bank.on[0])))
    bank.freeze_current()
    with pytest.raises(RuntimeError, match="no expert is training"):
        bank.scale_training(0.5)
