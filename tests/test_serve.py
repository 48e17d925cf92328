"""The awake endpoint end to end: real Ray Serve on the session's Ray head, the real engine
(vLLM on CPU where it imports, else transformers), the real MemoryStore actor, a real
NREM sleep, the unmodified ``openai`` client.

A document goes in through ``/v1/memories``; the model answers from it in context; a
sleep consolidates it while requests keep coming (0 failures, the version label moves
from ``base`` to ``v0001``); afterwards, closed-book, the memorised answers have a
higher log-probability than before.
"""
import json
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sleepray.config import load_config
from sleepray.memory import MemoryStore
from sleepray.storage import Storage
from sleepray.world import World

pytestmark = pytest.mark.slow

KEY = "test-key"
MODEL = "sleepray"
NS = "sleepray-test"
EPISODE = World(10_000_777, 1, 0, 0, 1).episode(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(ray_client, seed_test_model, tmp_path_factory):
    import ray
    from ray import serve

    from actors.serve import awake_app
    storage = tmp_path_factory.mktemp("serve-storage")
    port = _free_port()
    cfg = load_config(None, [
        f"cycle.storage={storage}", f"model.path={seed_test_model}", f"ray.namespace={NS}",
        f"serve.api_key={KEY}", "serve.num_cpus=0.5", "serve.poll_seconds=0.5",
        "serve.max_tokens_limit=64", "engine.max_model_len=512",
        "nrem.steps=40", "nrem.batch_size=8", "nrem.judge=exact", "nrem.use_lti=false",
        "rem.enabled=false"])
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(awake_app(cfg), name="sleepray-test", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    try:
        yield {"base": base, "storage": Path(storage), "cfg": cfg}
    finally:
        serve.shutdown()
        resolved = Path(storage).resolve()
        for name in (f"memory-store:{resolved}", f"serve-sleeper:{resolved}"):
            try:
                ray.kill(ray.get_actor(name, namespace=NS))
            except ValueError:
                pass


@pytest.fixture(scope="module")
def oc(served):
    from openai import OpenAI
    return OpenAI(base_url=served["base"] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _http(served) -> httpx.Client:
    return httpx.Client(base_url=served["base"], headers={"Authorization": f"Bearer {KEY}"}, timeout=120)


def closed_book(oc, question: str, answer: str, context: bool = False) -> float:
    """log p(answer | "Q: question\\nA:"), scored with echo + logprobs; memory context off
    unless ``context``; never recorded."""
    prompt = f"Q: {question}\nA:"
    r = oc.completions.create(model=MODEL, prompt=f"{prompt} {answer}", max_tokens=0, echo=True,
                              logprobs=0, extra_body={"memory": False, "memory_context": context})
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == f"{prompt} {answer}"
    return sum(v for v, off in zip(lp.token_logprobs, lp.text_offset) if off >= len(prompt))


def test_models_auth_and_bad_input(served, oc):
    import openai
    assert [m.id for m in oc.models.list().data] == [MODEL]
    bad = openai.OpenAI(base_url=served["base"] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.BadRequestError, match="serve.max_tokens_limit"):
        oc.completions.create(model=MODEL, prompt="Q: x\nA:", max_tokens=65)
    with pytest.raises(openai.BadRequestError, match="context"):
        oc.completions.create(model=MODEL, prompt="word " * 600, max_tokens=4)
    with pytest.raises(openai.NotFoundError):
        oc.completions.create(model="gpt-x", prompt="hi", max_tokens=1)
    with _http(served) as h:
        r = h.post("/v1/completions", content=b'{"model": "sleepray", "prompt": ')
        assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_memory_then_sleep_swaps_without_failures_and_raises_closed_book_logprob(served, oc):
    storage = served["storage"]
    with _http(served) as h:
        doc = h.post("/v1/memories", json={"text": EPISODE.context, "id": "bio-1"})
        assert doc.status_code == 201, doc.text
        decoy = h.post("/v1/memories", json={"text": "Zorblat Quenthive lives on the moon.",
                                             "id": "decoy"})
        assert decoy.status_code == 201
        assert h.delete("/v1/memories/decoy").json()["deleted"] is True
        listed = {m["id"]: m["status"] for m in h.get("/v1/memories").json()["data"]}
        assert listed == {"bio-1": "short_term"}

    # the first question is asked while awake below and recorded as memory: the gain is graded on
    # the others only, questions the sleep never saw
    asked, probes = EPISODE.probes[0], EPISODE.probes[1:]
    before = [closed_book(oc, p.question, p.answer) for p in probes]
    in_ctx = [closed_book(oc, p.question, p.answer, context=True) for p in probes]
    assert sum(in_ctx) > sum(before), "the memory in context should make the answers likelier"

    # a served interaction is in the MemoryStore (on disk) by the time its response returns
    c = oc.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": asked.question}],
                                   max_tokens=8, temperature=0)
    rec = c.model_extra["memory"]["recorded"]
    assert len(rec) == 1 and MemoryStore(Storage(storage).memory).status_of(rec[0]) == "short_term"
    assert c.model_extra["memory"]["context"] == ["bio-1"] and c.system_fingerprint == "base"
    ask = dict(model=MODEL, messages=[{"role": "user", "content": asked.question}], max_tokens=8,
               temperature=0, extra_body={"memory": False})
    whole = oc.chat.completions.create(**ask).choices[0].message.content
    streamed = "".join(ch.choices[0].delta.content or ""
                       for ch in oc.chat.completions.create(**ask, stream=True) if ch.choices)
    assert streamed == whole and whole and "\n" not in whole

    # concurrent traffic across the swap
    stop, errors, versions = threading.Event(), [], []

    def load(i):
        from openai import OpenAI
        client = OpenAI(base_url=served["base"] + "/v1", api_key=KEY, max_retries=0, timeout=120)
        while not stop.is_set():
            try:
                r = client.completions.create(model=MODEL, prompt=f"Q: {probes[i].question}\nA:",
                                              max_tokens=6, temperature=0,
                                              extra_body={"memory": False, "memory_context": False})
                assert r.choices[0].finish_reason in ("stop", "length")
                versions.append(r.system_fingerprint)
            except Exception as e:  # noqa: BLE001 - every failure counts
                errors.append(repr(e))
            time.sleep(0.05)   # leave the 2-core test machine some room for the sleep
    threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(2)]
    for t in threads:
        t.start()
    with _http(served) as h:
        r = h.post("/v1/sleep", json={"reason": "test"}).json()
        assert r["accepted"] is True and r["phase"] == "nrem"
        assert h.get("/v1/sleep/status").json()["phase"] == "nrem"
        deadline = time.time() + 240
        while time.time() < deadline:
            st = h.get("/v1/sleep/status").json()
            if st["phase"] == "wake" and st["serving_adapter"] == "v0001":
                break
            time.sleep(1)
        assert st["phase"] == "wake" and st["adapter_version"] == "v0001", st
        assert st["last_sleep"]["version"] == "v0001" and "error" not in st["last_sleep"], st
        assert st["last_sleep"]["metrics"], st     # lineage.json's metrics of the sleep
        n_after = len(versions)
        while len(versions) < n_after + 6 and time.time() < deadline:
            time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join(120)
    assert errors == []
    assert versions[0] == "base" and versions[-1] == "v0001", sorted(set(versions))

    # closed-book after the sleep: the memorised answers are likelier
    after = [closed_book(oc, p.question, p.answer) for p in probes]
    gained = sum(a > b for a, b in zip(after, before))
    print(f"closed-book log p(answer): before {sum(before) / len(probes):.3f}, "
          f"after {sum(after) / len(probes):.3f}, in context {sum(in_ctx) / len(probes):.3f}; "
          f"{gained}/{len(probes)} answers gained")
    assert sum(after) > sum(before) and gained > len(probes) // 2

    # the consolidated document left short-term memory; the deleted one was never trained
    lineage = json.loads((storage / "adapters" / "v0001" / "lineage.json").read_text())
    assert "bio-1" in lineage["episodes"] and "decoy" not in lineage["episodes"]
    with _http(served) as h:
        assert "bio-1" not in {m["id"] for m in h.get("/v1/memories?status=short_term").json()["data"]}
        assert [m["id"] for m in h.get("/v1/memories?status=deleted").json()["data"]] == ["decoy"]
        r = h.post("/v1/completions", json={"model": MODEL, "prompt": "Q: x\nA:", "max_tokens": 2})
        assert r.headers["x-sleepray-adapter"] == "v0001"
        assert "bio-1" not in r.json()["memory"]["context"]


_text = st.text(max_size=200) | st.text(st.characters(categories=["Cs"]), min_size=1, max_size=2)
_value = st.none() | st.booleans() | st.integers(-10, 10**6) | st.floats(-5, 5) | _text \
    | st.lists(st.integers(-5, 5000) | _text, max_size=3) | st.dictionaries(_text, _text, max_size=2)
_fields = {"model": _value, "prompt": _text | _value, "max_tokens": st.integers(-2, 80) | _value,
           "temperature": st.floats(0, 2) | _value, "top_p": st.floats(0, 1) | _value,
           "n": st.integers(0, 3) | _value, "stream": st.booleans() | _value, "echo": st.booleans(),
           "logprobs": st.integers(-1, 22) | _value, "stop": _value, "seed": st.integers(-1, 2**64),
           "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "x"]),
                                                       "content": _text | _value}), max_size=2) | _value,
           "text": _text | _value, "documents": _value, "questions": _value, "id": _text | _value}
_valid = {"/v1/completions": {"model": MODEL, "prompt": "Q: Who?\nA:", "max_tokens": 4},
          "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "Who?"}],
                                   "max_tokens": 4},
          "/v1/memories": {"text": "Fuzz Person lives in Fuzztown."}}


def test_fuzzed_requests_against_the_served_app_get_no_5xx(served):
    """A valid body per route with 0-3 fields replaced by arbitrary JSON values."""
    seen = []
    with _http(served) as h:
        h.headers["x-sleepray-memory"] = "off"

        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
        @given(st.sampled_from(sorted(_valid)), st.data())
        def check(path, data):
            keys = data.draw(st.lists(st.sampled_from(sorted(_fields)), max_size=3, unique=True))
            body = {**_valid[path], **{k: data.draw(_fields[k]) for k in keys}}
            r = h.post(path, content=json.dumps(body).encode(),   # ASCII-escaped: surrogates too
                       headers={"content-type": "application/json"})
            seen.append(r.status_code)
            assert r.status_code < 500, (path, body, r.text)
        check()
    assert max(seen) < 500 and 200 in seen and 400 in seen
