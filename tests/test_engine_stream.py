"""Engine-level token streaming: ``generate(requests, on_delta=fn)`` in both engines.

The shipped `test` seed model plus one LoRA adapter exported by ExpertBank; one vLLM engine
and one transformers engine per module (built as tests/test_engines.py builds them). Every
test runs against both engines: the deltas of each request concatenate to its final result,
the results equal those without a callback, tokens arrive before ``generate`` returns, a stop
string never reaches a delta, and a callback that raises leaves the engine usable.
"""
import os

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")

import time  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from sleepray.config import EngineConfig, ExpertConfig  # noqa: E402
from sleepray.engines import GenDelta, GenRequest, make_engine, vllm_available  # noqa: E402

PROMPTS = ["the old farmer walked to",
           "a child",
           "every quiet sailor found the map near the river because the captain"]
CFG = EngineConfig(max_model_len=256, max_loras=2, kv_cache_gib=1)
ENGINES = ["hf", "vl"]


@pytest.fixture(scope="module")
def adapter(seed_test_model, tmp_path_factory):
    from transformers import LlamaForCausalLM

    from sleepray.experts import ExpertBank
    base = LlamaForCausalLM.from_pretrained(seed_test_model)
    bank = ExpertBank(base, ExpertConfig(rank=8, max_slots=2))
    slot = bank.open_new_expert()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in bank._lora_layers():
            b = layer.lora_B[slot].weight
            b.copy_(torch.randn(b.shape, generator=g) * 0.05)
    bank.freeze_current()
    return str(bank.export_combined(tmp_path_factory.mktemp("stream_adapter") / "ad1"))


@pytest.fixture(scope="module")
def hf(seed_test_model, adapter):
    eng = make_engine("transformers", str(seed_test_model), CFG, max_lora_rank=8)
    eng.load_adapter("ad1", adapter)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def vl(seed_test_model, adapter):
    import platform
    import sys
    # as tests/test_engines.py: a vLLM that does not import where vllm-cpu ships is a failure
    if os.environ.get("SLEEPRAY_NO_VLLM", "").strip() not in ("", "0"):
        pytest.skip("SLEEPRAY_NO_VLLM: this machine is declared to have no vLLM")
    if sys.platform != "linux" or platform.machine() != "x86_64":
        pytest.skip(f"no vLLM build for {sys.platform}/{platform.machine()}")
    if not vllm_available():
        pytest.fail("vLLM is expected here but does not import (see test_engines.py)")
    eng = make_engine("auto", str(seed_test_model), CFG, max_lora_rank=8)
    assert eng.kind == "vllm"
    eng.load_adapter("ad1", adapter)
    yield eng
    eng.close()


@pytest.fixture(params=ENGINES)
def eng(request):
    return request.getfixturevalue(request.param)


def _collect(eng, reqs, **kw):
    """generate with a recording callback: (results, deltas per request, wall clock of return)."""
    deltas: dict[int, list[GenDelta]] = {i: [] for i in range(len(reqs))}

    def on_delta(i, d):
        assert isinstance(d, GenDelta)
        deltas[i].append(d)

    res = eng.generate(reqs, on_delta=on_delta, **kw)
    return res, deltas, time.time()


def _assert_same(a, b):
    for x, y in zip(a, b, strict=True):
        assert x.token_ids == y.token_ids
        assert x.text == y.text
        assert x.finish_reason == y.finish_reason
        assert x.adapter == y.adapter
        np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-6)
        assert (x.topk is None) == (y.topk is None)
        if x.topk is not None:
            assert [[t for t, _ in row] for row in x.topk] == [[t for t, _ in row] for row in y.topk]


def _assert_deltas_make_result(res, deltas, reqs):
    for i, (r, ds) in enumerate(zip(res, (deltas[i] for i in range(len(res))))):
        assert ds, f"request {i} got no delta"
        assert "".join(d.text for d in ds) == r.text
        assert [t for d in ds for t in d.token_ids] == r.token_ids
        assert [v for d in ds for v in d.logprobs] == pytest.approx(r.logprobs, abs=1e-6)
        if reqs[i].logprobs_topk:
            assert [row for d in ds for row in d.topk] == r.topk
        else:
            assert all(d.topk is None for d in ds)
        assert [d.finished for d in ds] == [False] * (len(ds) - 1) + [True]
        assert ds[-1].finish_reason == r.finish_reason
        assert all(d.finish_reason is None for d in ds[:-1])
        assert all(d.token_ids or d.finished for d in ds)
        ts = [d.t for d in ds]
        assert ts == sorted(ts)
        sofar = ""
        for d in ds:  # every prefix sent is a prefix of the final text
            sofar += d.text
            assert r.text.startswith(sofar)


def _mixed_requests(stop: str):
    return [GenRequest(PROMPTS[0], max_tokens=20),
            GenRequest(PROMPTS[1], max_tokens=20, adapter="ad1", logprobs_topk=3),
            GenRequest(PROMPTS[2], max_tokens=24, temperature=1.0, seed=7, logprobs_topk=2),
            GenRequest(PROMPTS[1], max_tokens=32, stop=[stop]),
            GenRequest(PROMPTS[0], max_tokens=16, temperature=0.8, top_p=0.9, seed=3, adapter="ad1",
                       stop=["zqzqzq", stop])]


def test_deltas_make_the_result_and_equal_the_unstreamed_result(eng):
    reqs = _mixed_requests("\nA:")
    ref = eng.generate(reqs)
    assert ref[3].finish_reason == "stop" and len(ref[3].token_ids) < 32, ref[3].text
    res, deltas, _ = _collect(eng, reqs)
    _assert_same(res, ref)
    _assert_deltas_make_result(res, deltas, reqs)
    assert _assert_same(eng.generate(reqs), ref) is None  # seeded sampling: reproducible


def test_tokens_arrive_incrementally(eng):
    reqs = [GenRequest(PROMPTS[2], max_tokens=32), GenRequest(PROMPTS[0], max_tokens=32, adapter="ad1")]
    seen = []
    t0 = time.time()
    res = eng.generate(reqs, on_delta=lambda i, d: seen.append((i, d, time.time())))
    t_ret = time.time()
    for i, r in enumerate(res):
        assert len(r.token_ids) >= 16
        ds = [(d, at) for j, d, at in seen if j == i]
        first, last = ds[0], ds[-1]
        assert len([d for d, _ in ds if d.token_ids]) >= 2
        assert t0 <= first[0].t < last[0].t < t_ret   # engine timestamps
        assert first[1] < t_ret                        # the callback ran before generate returned
        assert sum(bool(d.text) for d, _ in ds) >= 2   # text, too, comes in several pieces
    _assert_deltas_make_result(res, {i: [d for j, d, _ in seen if j == i] for i in range(2)}, reqs)


def test_stop_string_never_leaks(eng):
    full = eng.generate([GenRequest(PROMPTS[1], max_tokens=32)])[0]
    # stop strings starting at several places of the unstopped text, of several lengths
    cuts = [(a, n) for a in (len(full.text) // 3, len(full.text) // 2) for n in (2, 5)]
    stops = [full.text[a: a + n] for a, n in cuts]
    stops = [s for s in stops if s.strip()]
    assert stops, full.text
    reqs = [GenRequest(PROMPTS[1], max_tokens=32, stop=[s]) for s in stops] + \
           [GenRequest(PROMPTS[1], max_tokens=32, stop=["\nA: ", "zqzq"])]
    ref = eng.generate(reqs)
    res, deltas, _ = _collect(eng, reqs)
    _assert_same(res, ref)
    _assert_deltas_make_result(res, deltas, reqs)
    for i, r in enumerate(reqs):
        assert res[i].finish_reason == "stop"
        sofar = ""
        for d in deltas[i]:
            sofar += d.text
            assert not any(s in sofar for s in r.stop), (sofar, r.stop)
        assert full.text.startswith(res[i].text) and len(res[i].text) < len(full.text)


class Boom(RuntimeError):
    pass


def test_exception_in_callback_propagates_and_engine_stays_usable(eng):
    reqs = [GenRequest(PROMPTS[0], max_tokens=24), GenRequest(PROMPTS[2], max_tokens=24),
            GenRequest(PROMPTS[1], max_tokens=24, adapter="ad1")]
    ref = eng.generate(reqs)
    calls = []

    def bad(i, d):
        calls.append(i)
        if len(calls) == 5:
            raise Boom("callback failed")

    with pytest.raises(Boom):
        eng.generate(reqs, on_delta=bad)
    assert len(calls) == 5                      # nothing ran on after the raise
    if eng.kind == "vllm":                      # the aborted requests left vLLM
        assert not eng.llm.llm_engine.has_unfinished_requests()
    _assert_same(eng.generate(reqs), ref)
    res, deltas, _ = _collect(eng, reqs)
    _assert_same(res, ref)
    _assert_deltas_make_result(res, deltas, reqs)


def test_empty_and_single_token(eng):
    assert eng.generate([], on_delta=lambda i, d: None) == []
    res, deltas, _ = _collect(eng, [GenRequest(PROMPTS[0], max_tokens=1)])
    assert len(deltas[0]) == 1 and deltas[0][0].finished and deltas[0][0].finish_reason == "length"
    _assert_deltas_make_result(res, deltas, [GenRequest(PROMPTS[0], max_tokens=1)])


def test_callback_must_not_call_the_engine(eng):
    req = GenRequest(PROMPTS[0], max_tokens=6)
    ref = eng.generate([req])[0]

    def reenter(i, d):
        eng.generate([req])

    with pytest.raises(RuntimeError, match="must not call the engine"):
        eng.generate([req], on_delta=reenter)
    with pytest.raises(RuntimeError, match="must not call the engine"):
        eng.generate([req], on_delta=lambda i, d: eng.unload_adapter("ad1"))
    assert eng.adapters() == ["ad1"]
    _assert_same(eng.generate([req]), [ref])
