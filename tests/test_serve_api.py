"""The awake endpoint's HTTP layer without Ray: schemas, context policy, routes, swaps, fuzz.

These tests use a FAKE engine (``FakeEngine`` of tests/serve_fakes.py: the seed model's
real tokenizer, canned generations and scores), so that the FastAPI app, validation and
the adapter pointer can be driven in milliseconds. Everything else here is real: the
MemoryStore on a tmp folder, the SleepController running a real NREM-only sleep, the
unmodified ``openai`` client (over Starlette's TestClient transport). The real engine,
Ray Serve and a real sleep are tested in ``tests/test_serve.py``.
"""
import json
import re
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_fakes import MAX_LEN, _publish, _sleeper, made  # noqa: F401  (made: a fixture)

from sleepray.memory import MemoryStore
from sleepray.serve_api import (APIError, ChatMessage, CompletionRequest, MemoryItem, parse_body,
                                render_chat, select_context, text_pieces)
from sleepray.serve_app import build_app


# ----------------------------------------------------------------------------- library
@pytest.mark.parametrize("raw, needle", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b"", "empty"),
    (b'{"model": "m", "prompt": "x", "max_tokens": "5"}', "max_tokens"),
    (b'{"model": "m", "prompt": "x", "temperature": NaN}', "NaN"),
    (b'{"model": "m", "prompt": [1, 2]}', "prompt"),
    (b'{"model": "m", "prompt": "x", "n": 0}', "n:"),
    (b'{"model": "m", "prompt": "x", "max_tokens": 0}', "echo"),
    (b'{"model": "m", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}', "stop"),
    (b'{"prompt": "x"}', "model"),
    (b'{"model": "m", "prompt": "a\\ud800b"}', "Unicode"),
])
def test_bad_bodies_are_clear_400s(raw, needle):
    with pytest.raises(APIError) as e:
        parse_body(CompletionRequest, raw)
    assert e.value.status == 400 and needle in e.value.message


def test_context_policy_all_fits_else_recent_or_relevant():
    items = [MemoryItem("a", "Ann Lee was born in Paris.", 10, 0),
             MemoryItem("b", "Bob Ray works for Acme.", 10, 1),
             MemoryItem("c", "Cid Wu likes chess.", 10, 2)]
    q = "Q: Where was Ann Lee born?\nA:"
    for policy in ("all", "recent", "relevant"):
        assert [i.episode_id for i in select_context(items, q, 30, policy)] == ["a", "b", "c"]
    assert [i.episode_id for i in select_context(items, q, 20, "recent")] == ["b", "c"]
    assert [i.episode_id for i in select_context(items, q, 20, "all")] == ["b", "c"]
    assert [i.episode_id for i in select_context(items, q, 10, "relevant")] == ["a"]
    assert select_context(items, q, 0, "relevant") == []


def test_chat_rendering_uses_the_template_or_the_seed_format(seed_test_model):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(seed_test_model))
    msgs = [ChatMessage(role="system", content="Ann was born in Paris."),
            ChatMessage(role="user", content="Where was Ann born?")]
    assert render_chat(msgs, tok) == "Ann was born in Paris.\nQ: Where was Ann born?\nA:"
    assert render_chat(msgs, None) == "Ann was born in Paris.\nQ: Where was Ann born?\nA:"


@given(st.text(max_size=60))
def test_stream_pieces_concatenate_back(text):
    assert "".join(text_pieces(text)) == text


# ----------------------------------------------------------------------------- routes
def test_openai_client_completion_chat_and_stream(made):
    from openai import OpenAI
    svc, client, store, engine = made()
    oc = OpenAI(base_url="http://testserver/v1", api_key="none", http_client=client)
    assert [m.id for m in oc.models.list().data] == ["sleepray"]
    r = oc.completions.create(model="sleepray", prompt="Q: Where?\nA:", max_tokens=12, temperature=0)
    assert r.choices[0].text == " Paris is nice" and r.system_fingerprint == "base"
    c = oc.chat.completions.create(model="sleepray", messages=[{"role": "user", "content": "Where?"}],
                                   max_tokens=12)
    assert c.choices[0].message.content == "Paris is nice"
    assert engine.prompts[-1].endswith("Q: Where?\nA:")
    parts = [ch.choices[0].text for ch in oc.completions.create(
        model="sleepray", prompt="Q: x\nA:", max_tokens=12, stream=True) if ch.choices]
    assert "".join(parts) == " Paris is nice"
    deltas = [ch.choices[0].delta.content or "" for ch in oc.chat.completions.create(
        model="sleepray", messages=[{"role": "user", "content": "x"}], stream=True,
        stream_options={"include_usage": True}) if ch.choices]
    assert "".join(deltas) == "Paris is nice"
    # what the user sent in every generation was recorded (durably: a fresh store reads it), the
    # model's answers were not (serve.record_answers is off)
    rows = MemoryStore(store.root).episodes("short_term")
    assert [r["kind"] for r in rows] == ["interaction"] * 4
    assert [r["text"] for r in rows] == ["Q: Where?\nA:", "Where?", "Q: x\nA:", "x"]
    assert all(r["model_output"] is None for r in rows)


def test_memory_goes_into_context_and_switches_turn_it_off(made):
    svc, client, store, engine = made()
    r = client.post("/v1/memories", json={"text": "Ann Lee was born in Paris.",
                                          "questions": ["Where was Ann Lee born?"], "id": "ann"})
    assert r.status_code == 400 and "questions are evaluation data" in r.text  # memory is documents only
    assert store.episodes("all") == []
    r = client.post("/v1/memories", json={"text": "Ann Lee was born in Paris.", "id": "ann"})
    assert r.status_code == 201 and r.json()["id"] == "ann" and r.json()["status"] == "short_term"
    body = {"model": "sleepray", "prompt": "Q: Where was Ann Lee born?\nA:", "max_tokens": 2}
    r = client.post("/v1/completions", json=body)
    assert engine.prompts[-1].startswith("Ann Lee was born in Paris.\n")
    assert r.json()["memory"]["context"] == ["ann"] and len(r.json()["memory"]["recorded"]) == 1
    r = client.post("/v1/completions", json={**body, "memory": False, "memory_context": False})
    assert engine.prompts[-1] == body["prompt"] and r.json()["memory"] == {"context": [], "recorded": []}
    client.post("/v1/completions", json=body, headers={"x-sleepray-memory-context": "off",
                                                       "x-sleepray-memory": "off"})
    assert engine.prompts[-1] == body["prompt"]
    assert len(store.episodes("short_term")) == 2     # the document + the one recorded interaction
    # echo + logprobs + max_tokens=0 scores the prompt itself, closed-book, without recording
    r = client.post("/v1/completions", json={**body, "max_tokens": 0, "echo": True, "logprobs": 1,
                                             "memory_context": False})
    lp = r.json()["choices"][0]["logprobs"]
    assert r.status_code == 200 and "".join(lp["tokens"]) == body["prompt"]
    assert lp["text_offset"][0] == 0 and all(v == -1.0 for v in lp["token_logprobs"])
    assert len(store.episodes("short_term")) == 2
    # serve.memory=off: nothing in context, nothing recorded
    svc.scfg.memory = "off"
    r = client.post("/v1/completions", json=body)
    assert engine.prompts[-1] == body["prompt"] and len(store.episodes("short_term")) == 2


def test_memories_list_delete_and_conflicts(made):
    svc, client, store, _ = made()
    for i in range(2):
        r = client.post("/v1/memories", json={"documents": [f"Doc {i} says hi."], "id": f"d{i}"})
        assert r.status_code == 201
    assert client.post("/v1/memories", json={"text": "again", "id": "d0"}).status_code == 409
    assert [m["id"] for m in client.get("/v1/memories?kind=document").json()["data"]] == ["d0", "d1"]
    assert client.delete("/v1/memories/d0").json()["deleted"] is True
    assert store.status_of("d0") == "deleted"
    assert [m["id"] for m in client.get("/v1/memories").json()["data"]] == ["d1"]
    assert [m["id"] for m in client.get("/v1/memories?status=deleted").json()["data"]] == ["d0"]
    assert client.delete("/v1/memories/nope").status_code == 404
    store.mark_consolidated(["d1"], "v0001")
    slept = []
    _sleeper(svc).request_sleep = lambda reason: slept.append(reason) or {"accepted": True}
    r = client.delete("/v1/memories/d1").json()      # consolidated: deleted, and a rebuild asked for
    assert r["deleted"] and r["was"] == "consolidated" and r["rebuild"]["accepted"] and slept == ["forget"]
    assert store.status_of("d1") == "deleted"
    assert client.get("/v1/memories?status=bogus").status_code == 400
    for bad in ({}, {"text": "a", "documents": ["b"]}, {"text": "  "}, {"text": "a", "extra": 1},
                {"text": "a", "id": "has space"}):
        r = client.post("/v1/memories", json=bad)
        assert r.status_code == 400, bad


def _v1_routes() -> list[tuple[str, str]]:
    """(method, concrete path) for every ``/v1`` route ``build_app`` defines, read from the app
    itself (a stub service: building the app reads only ``scfg.max_body_bytes``), so that a route added
    later is covered by the key check below without editing this test."""
    from types import SimpleNamespace

    from fastapi.routing import APIRoute
    app = build_app(SimpleNamespace(scfg=SimpleNamespace(max_body_bytes=1)))
    out = set()
    for r in app.routes:
        if isinstance(r, APIRoute) and r.path.startswith("/v1"):
            path = re.sub(r"\{[^}]+\}", "some-id", r.path)   # path parameters get a value
            out |= {(m, path) for m in r.methods if m not in ("HEAD", "OPTIONS")}
    return sorted(out)


V1_ROUTES = _v1_routes()


def test_the_route_list_is_read_from_the_app():
    """Guards the parametrisation below against silently covering nothing."""
    assert {("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
            ("GET", "/v1/models/some-id"), ("POST", "/v1/memories"), ("GET", "/v1/memories"),
            ("DELETE", "/v1/memories/some-id"), ("GET", "/v1/sleep/status"), ("POST", "/v1/sleep")} \
        <= set(V1_ROUTES)


@pytest.mark.parametrize("method, path", V1_ROUTES)
def test_every_v1_route_needs_the_api_key(made, method, path):
    svc, client, store, engine = made("serve.api_key=sekret")
    slept = []
    _sleeper(svc).request_sleep = lambda reason: slept.append(reason) or {"accepted": True}
    body = {"model": "sleepray", "prompt": "Q: x\nA:", "max_tokens": 2,
            "messages": [{"role": "user", "content": "x"}], "text": "Ann Lee was born in Paris."}
    n_prompts = len(engine.prompts)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer "},
                    {"x-api-key": "wrong"}, {"Authorization": "Basic sekret"}):
        r = client.request(method, path, json=body if method == "POST" else None, headers=headers)
        assert r.status_code == 401, (headers, r.status_code, r.text)
        assert r.json()["error"]["code"] == "invalid_api_key"
    # nothing behind the check ran: no generation, no memory, no sleep
    assert len(engine.prompts) == n_prompts and store.episodes("all") == [] and slept == []
    # the right key (either header) gets past the check (whatever the route then answers)
    for headers in ({"Authorization": "Bearer sekret"}, {"x-api-key": "sekret"}):
        r = client.request(method, path, json=body if method == "POST" else None, headers=headers)
        assert r.status_code != 401, (headers, r.text)


def test_limits_model_and_api_key(made):
    svc, client, _, _ = made("serve.api_key=sekret")
    body = {"model": "sleepray", "prompt": "Q: x\nA:", "max_tokens": 2}
    h = {"Authorization": "Bearer sekret"}
    assert client.post("/v1/completions", json=body, headers=h).status_code == 200
    r = client.post("/v1/completions", json={**body, "max_tokens": 33}, headers=h)
    assert r.status_code == 400 and "serve.max_tokens_limit" in r.json()["error"]["message"]
    r = client.post("/v1/completions", json={**body, "prompt": "word " * 200}, headers=h)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = client.post("/v1/completions", json={**body, "model": "gpt-4"}, headers=h)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert client.get("/v1/nowhere", headers=h).status_code == 404
    assert client.get("/health").status_code == 200


def test_context_is_cut_to_fit_the_model(made):
    svc, client, store, engine = made("serve.context_policy=relevant")
    for i in range(12):
        client.post("/v1/memories", json={"text": f"Person{i} Name{i} was born in Town{i}. " * 2})
    body = {"model": "sleepray", "prompt": "Q: Where was Person3 Name3 born?\nA:", "max_tokens": 8,
            "memory": False}
    r = client.post("/v1/completions", json=body).json()
    ids = r["memory"]["context"]
    assert 0 < len(ids) < 12 and r["usage"]["prompt_tokens"] + 8 <= MAX_LEN
    assert "Person3 Name3" in engine.prompts[-1]


def test_adapter_swap_keeps_in_flight_requests_on_the_old_version(made, tmp_path):
    svc, client, _, engine = made()
    _publish(tmp_path, "v0001")
    assert svc.pointer.poll_once() and svc.pointer.version == "v0001"
    engine.gate = threading.Event()
    results = {}
    t = threading.Thread(target=lambda: results.setdefault("r", client.post(
        "/v1/completions", json={"model": "sleepray", "prompt": "Q: x\nA:", "max_tokens": 2})))
    t.start()
    time.sleep(0.3)                      # the request holds v0001 and waits in the engine
    _publish(tmp_path, "v0002")
    assert svc.pointer.poll_once() and svc.pointer.version == "v0002"
    assert "v0001" not in engine.unloaded       # still in use
    engine.gate.set()
    t.join(10)
    r = results["r"]
    assert r.status_code == 200 and r.headers["x-sleepray-adapter"] == "v0001"
    svc.pointer.poll_once()
    assert engine.unloaded == ["v0001"] and engine.loaded == ["v0001", "v0002"]
    r = client.post("/v1/completions", json={"model": "sleepray", "prompt": "Q: x\nA:", "max_tokens": 2})
    assert r.headers["x-sleepray-adapter"] == "v0002" and r.json()["system_fingerprint"] == "v0002"


def test_a_bad_adapter_version_is_skipped_not_fatal(made, tmp_path):
    svc, _, _, _ = made()
    d = _publish(tmp_path, "v0001")
    (d / "adapter_model.safetensors").unlink()
    assert not svc.pointer.poll_once() and svc.pointer.version == "base"


def test_sleep_status_and_request_without_a_coordinator(made, tmp_path):
    svc, client, _, _ = made()
    st = client.get("/v1/sleep/status").json()
    assert st["phase"] == "wake" and st["adapter_version"] is None and st["serving_adapter"] == "base"
    assert st["pressure"]["short_term_episodes"] == 0
    r = client.post("/v1/sleep", json={"reason": "test"}).json()
    assert r["accepted"] is True
    _sleeper(svc).wait(60)
    st = client.get("/v1/sleep/status").json()
    assert st["phase"] == "wake" and st["last_sleep"]["version"] is None
    assert "nothing to consolidate" in st["last_sleep"]["message"]
    assert client.post("/v1/sleep", content=b"{bad").status_code == 400


# ----------------------------------------------------------------------------- fuzz
_json = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70)
                     | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30)
                     | st.text(st.characters(categories=["Cs", "Cc", "So"]), max_size=4),
                     lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                     max_leaves=12)
_surrogates = st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3).map(lambda s: f"Q: {s}")
_fields = {"model": st.sampled_from(["sleepray", "x", ""]) | _json,
           "prompt": st.text(max_size=300) | _surrogates | st.lists(st.text(max_size=40), max_size=3) | _json,
           "messages": st.lists(st.fixed_dictionaries(
               {"role": st.sampled_from(["user", "system", "assistant", "tool"]) | _json,
                "content": st.text(max_size=80) | _surrogates | _json}), max_size=3) | _json,
           "max_tokens": st.integers(-3, 600) | _json, "temperature": st.floats(-1, 3) | _json,
           "top_p": st.floats(-1, 2) | _json, "n": st.integers(-1, 10), "stream": st.booleans(),
           "echo": st.booleans(), "logprobs": st.integers(-1, 30) | st.booleans(),
           "top_logprobs": st.integers(-1, 30), "stop": _json, "seed": st.integers(-5, 2**70),
           "memory": st.booleans() | _json, "memory_context": st.booleans(),
           "text": st.text(max_size=50) | _json, "documents": _json, "questions": _json,
           "id": st.text(max_size=10) | _json, "reason": _json}
_valid = {"/v1/completions": {"model": "sleepray", "prompt": "Q: x\nA:", "max_tokens": 4},
          "/v1/chat/completions": {"model": "sleepray", "messages": [{"role": "user", "content": "x"}]},
          "/v1/memories": {"text": "Fuzz Person lives in Fuzztown."}, "/v1/sleep": {}}


@st.composite
def _mutated(draw):
    """("post", path, a valid body with 0-3 fields replaced by arbitrary values, False)."""
    path = draw(st.sampled_from(sorted(_valid)))
    keys = draw(st.lists(st.sampled_from(sorted(_fields)), max_size=3, unique=True))
    return "post", path, {**_valid[path], **{k: draw(_fields[k]) for k in keys}}, False


_random = st.tuples(st.sampled_from(["post", "get"]),
                    st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/memories", "/v1/sleep"]),
                    st.fixed_dictionaries({}, optional=_fields) | _json, st.booleans())


def test_fuzzed_requests_never_get_a_5xx(made):
    """Random bodies, truncated JSON, and valid bodies with some fields made arbitrary."""
    svc, client, _, _ = made()
    _sleeper(svc).request_sleep = lambda reason: {"accepted": False, "phase": "wake"}
    seen = []

    @settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
    @given(_random | _mutated())
    def check(case):
        method, path, body, raw = case
        if method == "get":
            r = client.get(path, params={"status": str(body)[:10], "kind": str(body)[:5]} if raw else None)
        elif raw:
            r = client.post(path, content=json.dumps(body).encode()[:-1] or b"x")
        else:   # ASCII-escaped JSON, so that lone surrogates reach the server
            r = client.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})
        seen.append((path, r.status_code))
        assert r.status_code < 500, (path, body, r.text)
        if r.status_code >= 400:
            assert r.json()["error"]["message"]
    check()
    assert {("/v1/completions", 200), ("/v1/chat/completions", 200), ("/v1/completions", 400)} <= set(seen)
