"""The models users will bring: sleepray on tiny random Llama, Qwen2, Qwen3, Gemma 3, Mistral
and Phi-3 models (``sleepray.tiny_models``: hidden 64, 2 layers, the seed tokenizer with each
family's chat template), each a local Hugging Face folder built once per session.

Per family: the experts sit exactly on the family's MLP projections (``target_modules: auto``),
the same names reach vLLM's LoRA config; a sleep (NREM + REM + publish) runs end to end; the
published adapter and a two-expert combined adapter give the same log-probs in vLLM as in
transformers + PEFT; a deep-sleep merge saved with ``save_pretrained`` reloads with the
bank's logits. A random model learns nothing: only the mechanics are asserted.
"""
import json
import os
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from sleepray.config import EngineConfig, ExpertConfig, load_config  # noqa: E402
from sleepray.tiny_models import FAMILIES, MLP_MODULES, build_tiny_model  # noqa: E402

ATOL = 1e-3        # vLLM vs transformers log-probs (as tests/test_engines.py)
CFG = EngineConfig(max_model_len=256, max_loras=2, kv_cache_gib=1)
PROMPTS = ["the old farmer walked to", "every quiet sailor found the map near the river because"]
CONTS = [" the market and sold", " the captain was late"]
FAST = ["nrem.judge=exact", "nrem.steps=2", "nrem.batch_size=4", "nrem.prompts_per_episode=4",
        "nrem.max_new_tokens=12", "rem.dreams_per_episode=2", "rem.formats=[qa,rewrite]",
        "rem.keep_top_k=1", "rem.keep_random=1", "rem.trial_steps=1", "rem.restem_steps=1",
        "rem.sft_steps=1", "rem.probes_per_episode=2", "rem.max_new_tokens=12",
        "experts.rank=4", "experts.max_slots=2"]
LOGPROB_DIFFS: dict = {}   # family -> max |vLLM - transformers| log-prob, printed at the end


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    return request.param


@pytest.fixture(scope="module")
def folder(family, tmp_path_factory):
    return build_tiny_model(family, tmp_path_factory.mktemp(f"tiny-{family}"))


def _load(path):
    from sleepray.models import load_model
    return load_model(str(path), "auto", "cpu")


def _bank_with_two_experts(path, seed=0):
    """A bank with two on-experts whose B are random (so the adapter visibly matters)."""
    from sleepray.experts import ExpertBank
    model, tok = _load(path)
    bank = ExpertBank(model, ExpertConfig(rank=4, max_slots=3))
    g = torch.Generator().manual_seed(seed)
    for _ in range(2):
        slot = bank.open_new_expert()
        with torch.no_grad():
            for layer in bank._lora_layers():
                b = layer.lora_B[slot].weight
                b.copy_(torch.randn(b.shape, generator=g) * 0.05)
        bank.freeze_current()
    return bank, tok


def test_experts_sit_on_the_family_mlp_projections(family, folder):
    from peft.tuners.lora import LoraLayer

    from sleepray.experts import target_modules_for_path
    bank, _ = _bank_with_two_experts(folder)
    want = MLP_MODULES[family]
    assert bank.cfg.target_modules == want
    wrapped = sorted(n for n, m in bank.model.named_modules() if isinstance(m, LoraLayer))
    n_layers = bank.model.config.num_hidden_layers
    assert len(wrapped) == n_layers * len(want)
    assert {n.split(".")[-1] for n in wrapped} == set(want)
    assert all(n.split(".")[-2] == "mlp" for n in wrapped)
    # the names vLLM's LoRA config gets (engine: lora_target_modules=['auto'], from the config only)
    assert target_modules_for_path(["auto"], str(folder)) == want


@pytest.fixture(scope="module")
def slept(family, folder, tmp_path_factory):
    """One sleep (NREM + REM + publish) on the family's model; the storage root."""
    from sleepray.memory import MemoryStore
    from sleepray.sleep import run_sleep
    from sleepray.storage import Storage
    from sleepray.world import World
    root = tmp_path_factory.mktemp(f"sleep-{family}")
    cfg = load_config(None, [f"cycle.storage={root}", f"model.path={folder}", *FAST])
    w = World(5001, 1, 0, 0, 1)
    MemoryStore(Storage(root).memory).append([w.episode(0)])
    t0 = time.time()
    rec = run_sleep(cfg, root, progress=False)
    print(f"\n[{family}] sleep {time.time() - t0:.1f}s")
    return root, rec


def test_a_sleep_runs_end_to_end(family, slept):
    root, rec = slept
    assert rec.phases == ["nrem", "rem", "publish"] and rec.complete
    v = root / "adapters" / "v0001"
    acfg = json.loads((v / "adapter_config.json").read_text())
    assert (v / "adapter_model.safetensors").is_file()
    assert sorted(acfg["target_modules"]) == MLP_MODULES[family]
    lin = json.loads((v / "lineage.json").read_text())
    assert lin["phase"] == "nrem+rem" and len(lin["experts_on"]) == 1


@pytest.fixture(scope="module")
def combined(family, folder, tmp_path_factory):
    bank, _ = _bank_with_two_experts(folder, seed=1)
    return str(bank.export_combined(tmp_path_factory.mktemp(f"combined-{family}") / "ad"))


def test_vllm_log_probs_equal_transformers_peft(family, folder, slept, combined):
    from sleepray.engines import ScoreRequest, make_engine
    adapters = {"slept": str(slept[0] / "adapters" / "v0001"), "combined": combined}
    reqs = [ScoreRequest(p, continuation=c, adapter=a)
            for a in (None, *adapters) for p, c in zip(PROMPTS, CONTS)]
    out = {}
    for kind in ("transformers", "vllm"):
        eng = make_engine(kind, str(folder), CFG, max_lora_rank=8)
        try:
            assert eng.kind == kind
            if kind == "vllm":
                assert sorted(eng.lora_target_modules) == MLP_MODULES[family]
            for name, path in adapters.items():
                eng.load_adapter(name, path)
            out[kind] = [np.asarray(r.logprobs) for r in eng.score(reqs)]
        finally:
            eng.close()
    diff = max(float(np.abs(a - b).max()) for a, b in zip(out["transformers"], out["vllm"]))
    LOGPROB_DIFFS[family] = diff
    print(f"\n[{family}] max |vLLM - transformers+PEFT| log-prob: {diff:.2e}")
    assert diff < ATOL
    # the combined adapter matters: its log-probs differ from the base model's
    n = len(PROMPTS)
    base, comb = out["transformers"][:n], out["transformers"][2 * n:]
    assert max(float(np.abs(a - b).max()) for a, b in zip(base, comb)) > 10 * ATOL


def test_deep_sleep_merge_reloads(family, folder, tmp_path):
    bank, tok = _bank_with_two_experts(folder, seed=2)
    ids = tok(PROMPTS[1] + CONTS[1], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        with_experts = bank.model(input_ids=ids).logits
        merged = bank.deep_sleep()
        merged.save_pretrained(str(tmp_path / "base"), safe_serialization=True)
        tok.save_pretrained(str(tmp_path / "base"))
        reloaded, _ = _load(tmp_path / "base")
        again = reloaded(input_ids=ids).logits
        plain = _load(folder)[0](input_ids=ids).logits
    assert torch.allclose(again, with_experts, atol=1e-4), float((again - with_experts).abs().max())
    assert float((plain - with_experts).abs().max()) > 1e-2   # the merge changed the weights


# ------------------------------------------------------------------------------ precision
def test_dtype_auto_resolves_once_for_learner_and_engines(monkeypatch):
    """model.dtype auto: float32 on CPU, bfloat16 on a GPU with bf16 support, float32 on one
    without. The GPU is MOCKED here (torch.cuda.is_available / is_bf16_supported patched):
    this machine has none."""
    from sleepray import models
    assert load_config().model.dtype == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert models.resolve_dtype("auto") == "float32" and models.resolve_dtype(None) == "float32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)          # mocked GPU
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert models.resolve_dtype("auto") == "bfloat16"
    assert models.torch_dtype("auto") is torch.bfloat16
    assert models.resolve_dtype("auto", device="cpu") == "float32"       # explicit CPU device
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)   # e.g. a V100
    assert models.resolve_dtype("auto") == "float32"
    for d in ("float32", "bfloat16", "float16"):
        assert models.resolve_dtype(d) == d
    with pytest.raises(ValueError, match="dtype"):
        models.resolve_dtype("fp8")


def test_dtype_reaches_the_model_through_the_resolver(monkeypatch, tmp_path):
    """load_model (the learner's path: banks.bank_from -> load_model) and the transformers
    engine take 'auto' and explicit names through resolve_dtype."""
    from sleepray import models
    from sleepray.engines import make_engine
    path = models.resolve_model_path("seed:test", progress=False)
    m, _ = models.load_model(path, "auto", "cpu")
    assert next(m.parameters()).dtype is torch.float32
    m, _ = models.load_model(path, "bfloat16", "cpu")
    assert next(m.parameters()).dtype is torch.bfloat16
    seen = []
    real = models.resolve_dtype
    monkeypatch.setattr(models, "resolve_dtype", lambda d="auto", dev="auto": seen.append(d) or real(d, dev))
    eng = make_engine("transformers", path, CFG, device="cpu")
    eng.close()
    assert seen == ["auto"]
