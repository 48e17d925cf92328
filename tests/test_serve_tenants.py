"""Tenants, limits and what gets recorded, on the awake endpoint's HTTP layer (FakeEngine of
tests/serve_fakes.py; real MemoryStores, real keys file, real FastAPI app). With the real
engine and Ray Serve: tests/test_serve.py."""
import json

import pytest
import yaml
from serve_fakes import _publish, _sleeper, made  # noqa: F401  (made: a fixture)

from sleepray.memory import MemoryStore
from sleepray.tenants import (DEFAULT, KeyRing, RateLimiter, add_key, check_bind, is_loopback, key_hash,
                              load_keys, tenant_storage)

COMPLETION = {"model": "sleepray", "prompt": "Q: Where was Ann Lee born?\nA:", "max_tokens": 2}


@pytest.fixture
def keyed(made, tmp_path):
    """An endpoint with tenants alice and bob and an admin key (hashes in a real keys file)."""
    f = tmp_path / "keys.yaml"
    keys = {"alice": add_key(f, "alice"), "bob": add_key(f, "bob"), "admin": add_key(f, None, admin=True)}

    def make(*extra):
        svc, client, _, engine = made(f"serve.tenants_file={f}", *extra)
        return svc, client, engine, {n: {"Authorization": f"Bearer {k}"} for n, k in keys.items()}
    return make


def test_keys_file_holds_hashes_only_and_bad_files_are_clear(tmp_path):
    f = tmp_path / "keys.yaml"
    k = add_key(f, "alice")
    text = f.read_text()
    assert k not in text and key_hash(k) in text and (f.stat().st_mode & 0o777) == 0o600
    assert load_keys(f)[key_hash(k)].tenant == "alice"
    ring = KeyRing(load_keys(f), ["alice"])
    assert ring.authenticate(k).tenant == "alice" and ring.authenticate("nope") is None
    assert ring.authenticate(None) is None
    for bad, needle in [({"tenants": {"alice": {"keys": ["plain-key"]}}}, "SHA-256"),
                        ({"tenants": {"Bad Name": {"keys": []}}}, "tenant name"),
                        ({"people": {}}, "expected the keys"),
                        ({"tenants": {"a": {"keys": [key_hash("x")]}, "b": {"keys": [key_hash("x")]}}}, "twice")]:
        f.write_text(yaml.safe_dump(bad))
        with pytest.raises(ValueError, match=needle):
            load_keys(f)
    with pytest.raises(ValueError, match="twice"):     # a malformed file is not extended
        add_key(f, "carol")


def test_tenant_storage_and_open_keyring(tmp_path, made):
    assert tenant_storage(tmp_path, DEFAULT).root == tmp_path
    assert tenant_storage(tmp_path, "alice").root == tmp_path / "tenants" / "alice"
    with pytest.raises(ValueError):
        tenant_storage(tmp_path, "../etc")
    svc, client, _, _ = made()     # no key at all: one open tenant, "default"
    assert list(svc.tenants) == [DEFAULT] and client.get("/v1/models").status_code == 200


def test_a_tenant_never_sees_another_tenants_memories(keyed):
    svc, client, engine, h = keyed()
    assert sorted(svc.tenants) == ["alice", "bob"]
    r = client.post("/v1/memories", json={"text": "Ann Lee was born in Paris.", "id": "ann"}, headers=h["alice"])
    assert r.status_code == 201
    # bob: not listed, not deletable, not in his context; the same id is free for him
    assert client.get("/v1/memories", headers=h["bob"]).json()["data"] == []
    assert client.delete("/v1/memories/ann", headers=h["bob"]).status_code == 404
    r = client.post("/v1/completions", json=COMPLETION, headers=h["bob"]).json()
    assert r["memory"]["context"] == [] and "Ann Lee was born" not in engine.prompts[-1]
    assert client.post("/v1/memories", json={"text": "Bob's own note.", "id": "ann"},
                       headers=h["bob"]).status_code == 201
    # alice: hers is in her context, bob's is not
    r = client.post("/v1/completions", json=COMPLETION, headers=h["alice"]).json()
    assert r["memory"]["context"] == ["ann"] and engine.prompts[-1].startswith("Ann Lee was born in Paris.")
    assert "Bob's own note" not in engine.prompts[-1]
    # on disk: two storage folders, each with its own episodes
    alice = MemoryStore(svc.tenants["alice"].storage.memory).episodes("all")
    bob = MemoryStore(svc.tenants["bob"].storage.memory).episodes("all")
    assert {r["text"] for r in alice} == {"Ann Lee was born in Paris.", COMPLETION["prompt"]}
    assert {r["text"] for r in bob} == {"Bob's own note.", COMPLETION["prompt"]}
    assert client.get("/v1/memories").status_code == 401      # no key: nothing


def test_each_tenant_is_served_its_own_adapter(keyed):
    svc, client, engine, h = keyed()
    _publish(svc.tenants["alice"].storage.root, "v0001")
    assert svc.tenants["alice"].pointer.poll_once() and not svc.tenants["bob"].pointer.poll_once()
    assert "alice:v0001" in engine.adapters()
    r = client.post("/v1/completions", json=COMPLETION, headers=h["alice"])
    assert r.headers["x-sleepray-adapter"] == "v0001" and engine.used[-1] == "alice:v0001"
    r = client.post("/v1/completions", json=COMPLETION, headers=h["bob"])
    assert r.headers["x-sleepray-adapter"] == "base" and engine.used[-1] is None
    assert client.get("/v1/models", headers=h["bob"]).json()["data"][0]["adapter_version"] == "base"


def test_admin_lists_tenants_and_asks_for_their_sleeps_but_has_no_memory(keyed):
    svc, client, engine, h = keyed()
    asked = []
    _sleeper(svc, "bob").request_sleep = lambda reason: asked.append(reason) or {"accepted": True}
    r = client.get("/v1/tenants", headers=h["admin"]).json()
    assert [t["id"] for t in r["data"]] == ["alice", "bob"]
    r = client.post("/v1/tenants/bob/sleep", json={"reason": "nightly"}, headers=h["admin"]).json()
    assert r["accepted"] and r["tenant"] == "bob" and asked == ["nightly"]
    assert client.get("/v1/tenants/bob/sleep/status", headers=h["admin"]).json()["tenant"] == "bob"
    assert client.post("/v1/tenants/carol/sleep", headers=h["admin"]).status_code == 404
    for path in ("/v1/tenants", "/v1/tenants/bob/sleep/status"):
        r = client.get(path, headers=h["alice"])
        assert r.status_code == 403 and r.json()["error"]["code"] == "not_admin"
    r = client.post("/v1/completions", json=COMPLETION, headers=h["admin"])
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_key"


def test_rate_limit_is_per_tenant_with_retry_after(keyed):
    svc, client, engine, h = keyed("serve.rate_limit_rps=0.01", "serve.rate_limit_burst=2")
    codes = [client.get("/v1/models", headers=h["alice"]).status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    r = client.get("/v1/models", headers=h["alice"])
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    assert client.get("/v1/models", headers=h["bob"]).status_code == 200      # bob's bucket is his own


def test_rate_limiter_refills():
    rl = RateLimiter(1000.0, 1)
    assert rl.take("a") is None and rl.take("a") is not None
    import time
    time.sleep(0.01)
    assert rl.take("a") is None
    assert RateLimiter(0, 1).take("a") is None          # 0 = no limit
    assert RateLimiter(5, 1).take("a", rps=0) is None   # a tenant's own 0


class _CountingTokenizer:
    def __init__(self, tok):
        self.tok, self.calls = tok, 0

    def __call__(self, *a, **k):
        self.calls += 1
        return self.tok(*a, **k)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_oversized_bodies_and_fields_are_refused_before_the_tokenizer(made):
    svc, client, store, engine = made("serve.max_body_bytes=4096", "serve.max_prompt_chars=200",
                                      "serve.max_memory_chars=300")
    svc.tok = counting = _CountingTokenizer(svc.tok)
    big = json.dumps({**COMPLETION, "prompt": "x" * 5000}).encode()
    r = client.post("/v1/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():                        # no content-length: counted while it streams in
        for _ in range(10):
            yield b" " * 1000
    r = client.post("/v1/completions", content=chunks())
    assert r.status_code == 413
    for path, body, param in [
            ("/v1/completions", {**COMPLETION, "prompt": "x" * 201}, "prompt"),
            ("/v1/completions", {**COMPLETION, "prompt": ["ok", "y" * 201]}, "prompt.1"),
            ("/v1/chat/completions", {"model": "sleepray", "messages": [
                {"role": "user", "content": "z" * 150}, {"role": "user", "content": "z" * 60}]}, "messages"),
            ("/v1/memories", {"text": "m" * 301}, "text"),
            ("/v1/memories", {"documents": ["m" * 200, "n" * 200]}, "documents")]:
        r = client.post(path, json=body)
        assert r.status_code == 422, (path, r.text)
        assert r.json()["error"]["code"] == "string_above_max_length" and r.json()["error"]["param"] == param
    assert counting.calls == 0 and engine.prompts == [] and store.episodes("all") == []
    assert client.post("/v1/completions", json=COMPLETION).status_code == 200 and counting.calls > 0


def test_only_what_the_user_sent_is_recorded_unless_answers_are_asked_for(made):
    svc, client, store, engine = made()
    chat = {"model": "sleepray", "messages": [
        {"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Where was Ann born?"}]}
    client.post("/v1/chat/completions", json=chat)
    client.post("/v1/completions", json=COMPLETION)
    client.post("/v1/completions", json={**COMPLETION, "record_answers": True})
    client.post("/v1/chat/completions", json=chat, headers={"x-sleepray-record-answers": "on"})
    rows = store.episodes("short_term")
    assert [r["text"] for r in rows] == ["Where was Ann born?", COMPLETION["prompt"], COMPLETION["prompt"],
                                         "Where was Ann born?"]     # the new user turn, not the history
    assert [r["model_output"] for r in rows] == [None, None, " Par", "Paris is nice"]   # FakeEngine's
    # what a sleep reads is the documents: never the model's answer
    assert all("Paris" not in d for e in store.export_episodes() for d in e.documents)
    assert client.get("/v1/memories").json()["data"][2]["model_output"] == " Par"
    svc.scfg.record_answers = True
    client.post("/v1/completions", json=COMPLETION)
    assert store.episodes("short_term")[-1]["model_output"] == " Par"
    r = client.post("/v1/completions", json=COMPLETION, headers={"x-sleepray-record-answers": "maybe"})
    assert r.status_code == 400


def test_a_public_address_needs_a_key_unless_forced(tmp_path):
    from sleepray.config import load_config
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.5") and not is_loopback("example.com")
    check_bind(load_config(None, []).serve)                            # loopback: fine
    with pytest.raises(ValueError, match="serve.allow_open"):
        check_bind(load_config(None, ["serve.host=0.0.0.0"]).serve)
    check_bind(load_config(None, ["serve.host=0.0.0.0", "serve.api_key=k"]).serve)
    check_bind(load_config(None, ["serve.host=0.0.0.0", "serve.allow_open=true"]).serve)


def test_a_stream_sends_its_first_tokens_before_the_generation_ends(made):
    """The FakeEngine blocks after its first delta until the test has received a chunk: a stream
    that waited for the whole generation would never get there."""
    import asyncio
    import threading

    from sleepray.serve_api import ChatRequest, CompletionRequest
    svc, client, store, engine = made()
    t = svc.tenants[DEFAULT]

    async def first_then_rest(req):
        engine.after_first = threading.Event()
        version, chunks = await svc.stream(t, req, True, True, "/v1/completions")
        got = [await chunks.__anext__()]
        first_text = [c for c in got if c["choices"] and (c["choices"][0].get("text") or
                                                         c["choices"][0].get("delta", {}).get("content"))]
        while not first_text:                 # chat starts with the role chunk
            got.append(await asyncio.wait_for(chunks.__anext__(), 5))
            first_text = [c for c in got[-1:] if c["choices"] and c["choices"][0].get("delta", {}).get("content")]
        engine.after_first.set()              # only now may the engine go on
        got += [c async for c in chunks]
        return version, got

    req = CompletionRequest.model_validate({**COMPLETION, "max_tokens": 8, "stream": True, "n": 2,
                                            "stream_options": {"include_usage": True}})
    version, chunks = asyncio.run(first_then_rest(req))
    text = {i: "".join(c["choices"][0]["text"] for c in chunks if c["choices"] and c["choices"][0]["index"] == i)
            for i in (0, 1)}
    assert version == "base" and text == {0: " Paris is nice", 1: " Paris is nice"}
    assert all(c["engine_time"] > 0 for c in chunks if c["choices"])
    n_tok = len(engine.tokenizer(" Paris is nice", add_special_tokens=False)["input_ids"])
    assert chunks[-1]["usage"]["completion_tokens"] == 2 * n_tok and len(chunks[-1]["memory"]["recorded"]) == 1
    assert store.episodes()[-1]["text"] == COMPLETION["prompt"]      # recorded after the stream

    chat = ChatRequest.model_validate({"model": "sleepray", "stream": True,
                                       "messages": [{"role": "user", "content": "Where?"}]})
    _, chunks = asyncio.run(first_then_rest(chat))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "Paris is nice"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_chat_text_strips_like_the_whole_reply():
    from sleepray.gen_batcher import ChatText
    for pieces in (["  Par", "is ", " is", " nice ", "\n"], [" ", " ", "a"], ["a b", "  "], [" "]):
        ct = ChatText()
        assert "".join(ct.feed(p) for p in pieces) == "".join(pieces).strip()


def test_every_route_fuzzed_with_any_key_gets_no_5xx(keyed):
    """Every route the app defines (read from the app), any path parameter, body and switch header,
    sent with a tenant's key, an admin's, a wrong one or none."""
    import re
    from urllib.parse import quote

    from fastapi.routing import APIRoute
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    svc, client, engine, h = keyed()
    for t in svc.tenants.values():
        t.control.sleeper.request_sleep = lambda reason: {"accepted": False, "phase": "wake"}
    routes = sorted({(m, r.path) for r in client.app.routes if isinstance(r, APIRoute)
                     for m in r.methods if m not in ("HEAD", "OPTIONS")})
    assert len(routes) == 13      # a new route is fuzzed too: update the count
    keys = st.sampled_from([h["alice"], h["bob"], h["admin"], {"Authorization": "Bearer nope"}, {}])
    value = st.none() | st.booleans() | st.integers(-5, 10**6) | st.text(max_size=60) \
        | st.lists(st.text(max_size=10), max_size=3)
    body = st.fixed_dictionaries({}, optional={
        "model": st.sampled_from(["sleepray", "x"]) | value, "prompt": st.text(max_size=80) | value,
        "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]),
                                                     "content": st.text(max_size=30)}), max_size=3) | value,
        "max_tokens": st.integers(-2, 40) | value, "stream": st.booleans(), "text": st.text(max_size=40) | value,
        "documents": value, "record_answers": value, "memory": value, "reason": value, "id": value})
    seen = []

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(routes), st.text(max_size=12), body, keys,
           st.sampled_from([None, "on", "off", "maybe"]))
    def check(route, param, payload, key, answers):
        method, path = route
        url = re.sub(r"\{[^}]+\}", lambda _: quote(param, safe="") or "x", path)
        headers = dict(key)
        if answers is not None:
            headers["x-sleepray-record-answers"] = answers
        r = client.request(method, url, json=payload if method in ("POST", "DELETE") else None, headers=headers)
        seen.append(r.status_code)
        assert r.status_code < 500, (method, url, payload, r.text)
    check()
    assert {200, 401, 403} <= set(seen)
