"""The awake endpoint end to end: real Ray Serve on the session's Ray head with TWO replicas, the
real engine (vLLM on CPU where it imports, else transformers) in each, real MemoryStore actors,
real sleeps, a real keys file with two tenants and an admin, the unmodified ``openai`` client.

Alice's documents go in through ``/v1/memories``; the model answers from them in context;
her sleep consolidates them while both tenants keep sending requests (0 failures; every
response names its version and replica; both replicas switch alice to ``v0001``, bob stays
on ``base``). Afterwards, closed-book, alice's memorised answers are likelier and bob's did
not move. Alice then deletes one consolidated memory: the rebuild sleep publishes ``v0002``
without it in its lineage, and its answers lose log-probability.
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
from sleepray.tenants import add_key
from sleepray.world import World

pytestmark = pytest.mark.slow

MODEL = "sleepray"
NS = "sleepray-test"
EPISODE = World(10_000_777, 1, 0, 0, 1).episode(0)
EPISODE2 = World(10_000_778, 1, 0, 0, 1).episode(0)


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
    keys_file = storage / "keys.yaml"
    keys = {n: add_key(keys_file, n) for n in ("alice", "bob")}
    keys["admin"] = add_key(keys_file, None, admin=True)
    port = _free_port()
    cfg = load_config(None, [
        f"cycle.storage={storage}", f"model.path={seed_test_model}", f"ray.namespace={NS}",
        f"serve.tenants_file={keys_file}", "serve.num_replicas=2", "serve.num_cpus=0.5",
        "serve.poll_seconds=0.5", "serve.rate_limit_rps=0", "serve.max_body_bytes=65536",
        "serve.max_prompt_chars=8000", "serve.auto_sleep=false",
        "serve.max_tokens_limit=960", "engine.max_model_len=1024",
        "nrem.steps=80", "nrem.batch_size=8", "nrem.judge=exact", "nrem.use_lti=false",
        "rem.enabled=false"])
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(awake_app(cfg), name="sleepray-test", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    try:
        yield {"base": base, "storage": Path(storage), "cfg": cfg, "keys": keys}
    finally:
        serve.shutdown()
        for tenant in ("alice", "bob"):
            resolved = (Path(storage) / "tenants" / tenant).resolve()
            for name in (f"memory-store:{resolved}", f"serve-sleeper:{resolved}"):
                try:
                    ray.kill(ray.get_actor(name, namespace=NS))
                except ValueError:
                    pass


def _oc(served, who="alice"):
    from openai import OpenAI
    return OpenAI(base_url=served["base"] + "/v1", api_key=served["keys"][who], max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def oc(served):
    return _oc(served)


def _http(served, who="alice") -> httpx.Client:
    return httpx.Client(base_url=served["base"], headers={"Authorization": f"Bearer {served['keys'][who]}"},
                        timeout=120)


def _tenant_dir(served, who) -> Path:
    return served["storage"] / "tenants" / who


def closed_book(oc, question: str, answer: str, context: bool = False) -> float:
    """log p(answer | "Q: question\\nA:"), scored with echo + logprobs; memory context off
    unless ``context``; never recorded."""
    prompt = f"Q: {question}\nA:"
    r = oc.completions.create(model=MODEL, prompt=f"{prompt} {answer}", max_tokens=0, echo=True,
                              logprobs=0, extra_body={"memory": False, "memory_context": context})
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == f"{prompt} {answer}"
    return sum(v for v, off in zip(lp.token_logprobs, lp.text_offset) if off >= len(prompt))


def test_models_auth_limits_and_bad_input(served, oc):
    import openai
    assert [m.id for m in oc.models.list().data] == [MODEL]
    bad = openai.OpenAI(base_url=served["base"] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.PermissionDeniedError):      # an admin key has no model of its own
        _oc(served, "admin").completions.create(model=MODEL, prompt="Q: x\nA:", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="serve.max_tokens_limit"):
        oc.completions.create(model=MODEL, prompt="Q: x\nA:", max_tokens=961)
    with pytest.raises(openai.BadRequestError, match="context"):
        oc.completions.create(model=MODEL, prompt="word " * 1100, max_tokens=4)
    with pytest.raises(openai.UnprocessableEntityError, match="serve.max_prompt_chars"):
        oc.completions.create(model=MODEL, prompt="w" * 8001, max_tokens=4)
    with pytest.raises(openai.NotFoundError):
        oc.completions.create(model="gpt-x", prompt="hi", max_tokens=1)
    with _http(served) as h:
        r = h.post("/v1/completions", content=b'{"model": "sleepray", "prompt": ')
        assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
        r = h.post("/v1/memories", content=json.dumps({"text": "x" * 70_000}).encode())
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    with _http(served, "admin") as h:
        assert [t["id"] for t in h.get("/v1/tenants").json()["data"]] == ["alice", "bob"]


@pytest.fixture(scope="module")
def streamed(served):
    """One streamed completion of 900 tokens through Serve, on an endpoint doing nothing else
    (before any sleep): (arrival time, chunk) of every event, and the engine's token times."""
    arrivals = []
    with _http(served, "bob") as h, h.stream("POST", "/v1/completions", json={
            "model": MODEL, "prompt": "Q: Who was born in 1942?\nA:", "max_tokens": 900, "temperature": 0,
            "stream": True, "memory": False, "memory_context": False}) as r:
        assert r.status_code == 200 and r.headers["x-sleepray-replica"]
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                arrivals.append((time.time(), json.loads(line[6:])))
    chunks = [c for _, c in arrivals if c.get("choices")]
    made = [c["engine_time"] for c in chunks]
    lag = [a - c["engine_time"] for a, c in arrivals if c.get("choices")]
    early = sum(a < made[-1] for a, c in arrivals if c.get("choices"))
    print(f"{len(chunks)} chunks made over {made[-1] - made[0]:.3f}s; the first arrived {lag[0]:.3f}s after it "
          f"was made, {made[-1] - arrivals[0][0]:.3f}s before the last token was made; lag median "
          f"{sorted(lag)[len(lag) // 2]:.3f}s, max {max(lag):.3f}s; {early} arrived before the generation ended")
    return arrivals, chunks, made


def test_streaming_chunks_carry_the_engines_token_times(streamed):
    arrivals, chunks, made = streamed
    assert len(chunks) >= 64 and made == sorted(made)
    assert all(arrival >= c["engine_time"] for arrival, c in arrivals if c.get("choices"))


def test_streaming_sends_tokens_as_the_engine_makes_them(streamed):
    """The first chunk reaches the client before the engine has made the last token (both clocks
    are this machine's: ``engine_time`` in each chunk, ``time.time()`` here), and most tokens are
    made after it came. 900 tokens (~3 s here), so that one stall of the 2-core machine cannot
    hide it. How far delivery falls behind the engine is printed, not asserted: in a full CI run
    only 382 of 900 chunks arrived before the generation ended (on this machine alone, most)."""
    arrivals, chunks, made = streamed
    assert arrivals[0][0] < made[-1]
    assert sum(t > arrivals[0][0] for t in made) >= len(made) // 2     # most were made after it came


class Load:
    """Clients of both tenants sending completions until stopped; every answer's (tenant, version,
    replica), every failure."""

    def __init__(self, served, probes):
        self.served, self.probes = served, probes
        self.stop, self.errors, self.seen = threading.Event(), [], []
        self.threads = [threading.Thread(target=self._run, args=(who, i), daemon=True)
                        for who in ("alice", "bob") for i in range(2)]

    def _run(self, who, i):
        with _http(self.served, who) as h:
            while not self.stop.is_set():
                try:
                    r = h.post("/v1/completions", json={
                        "model": MODEL, "prompt": f"Q: {self.probes[i].question}\nA:", "max_tokens": 6,
                        "temperature": 0, "memory": False, "memory_context": False})
                    assert r.status_code == 200, r.text
                    assert r.json()["system_fingerprint"] == r.headers["x-sleepray-adapter"]
                    self.seen.append((who, r.headers["x-sleepray-adapter"], r.headers["x-sleepray-replica"]))
                except Exception as e:  # noqa: BLE001 - every failure counts
                    self.errors.append(repr(e))
                time.sleep(0.05)   # leave the 2-core test machine some room for the sleep

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def wait_all_replicas(self, who: str, version: str, timeout: float = 60) -> None:
        """Until every replica seen has answered ``who`` with ``version`` since now."""
        n0, deadline = len(self.seen), time.time() + timeout
        replicas = {r for _, _, r in self.seen}
        while time.time() < deadline:
            late = {r for w, v, r in self.seen[n0:] if w == who and v == version}
            if late >= replicas:
                return
            time.sleep(0.2)
        raise AssertionError(f"not every replica serves {who} {version}: {sorted(set(self.seen[n0:]))}")

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(120)


def _sleep(h, path: str = "/v1/sleep", version: str = "v0001", expect_accept: bool = True) -> dict:
    """Ask (unless already asked) and wait until the tenant is awake on ``version``."""
    if expect_accept:
        r = h.post(path, json={"reason": "test"}).json()
        assert r["accepted"] is True and r["phase"] == "nrem", r
    deadline = time.time() + 300
    while time.time() < deadline:
        st = h.get("/v1/sleep/status").json()
        if st["phase"] == "wake" and st["serving_adapter"] == version:
            break
        time.sleep(1)
    assert st["phase"] == "wake" and st["adapter_version"] == version, st
    assert st["last_sleep"]["version"] == version and "error" not in st["last_sleep"], st
    return st


def test_tenants_sleep_and_forget_across_two_replicas_without_failures(served, oc):
    alice_dir, bob_oc = _tenant_dir(served, "alice"), _oc(served, "bob")
    with _http(served) as h, _http(served, "bob") as hb:
        for mid, ep in (("bio-1", EPISODE), ("bio-2", EPISODE2)):
            assert h.post("/v1/memories", json={"text": ep.context, "id": mid}).status_code == 201
        decoy = h.post("/v1/memories", json={"text": "Zorblat Quenthive lives on the moon.", "id": "decoy"})
        assert decoy.status_code == 201
        assert h.delete("/v1/memories/decoy").json()["deleted"] is True
        listed = {m["id"]: m["status"] for m in h.get("/v1/memories").json()["data"]}
        assert listed == {"bio-1": "short_term", "bio-2": "short_term"}
        # bob sees none of it: not listed, not deletable, not in his context
        assert hb.get("/v1/memories").json()["data"] == []
        assert hb.delete("/v1/memories/bio-1").status_code == 404
        r = hb.post("/v1/completions", json={"model": MODEL, "prompt": "Q: x\nA:", "max_tokens": 2})
        assert r.json()["memory"]["context"] == []

    # the first question is asked while awake below and recorded as memory: the gain is graded on
    # the others only, questions the sleep never saw
    asked, probes = EPISODE.probes[0], EPISODE.probes[1:]
    before = [closed_book(oc, p.question, p.answer) for p in probes]
    bob_before = [closed_book(bob_oc, p.question, p.answer) for p in probes]
    in_ctx = [closed_book(oc, p.question, p.answer, context=True) for p in probes]
    assert sum(in_ctx) > sum(before), "the memory in context should make the answers likelier"

    # a served interaction is in alice's MemoryStore (on disk) by the time its response returns: what
    # she sent, not the model's answer
    c = oc.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": asked.question}],
                                   max_tokens=8, temperature=0)
    rec = c.model_extra["memory"]["recorded"]
    alice_mem = MemoryStore(Storage(alice_dir).memory)
    assert len(rec) == 1 and alice_mem.status_of(rec[0]) == "short_term"
    row = [r for r in alice_mem.episodes() if r["episode_id"] == rec[0]][0]
    assert row["text"] == asked.question and row["model_output"] is None
    assert sorted(c.model_extra["memory"]["context"]) == ["bio-1", "bio-2"] and c.system_fingerprint == "base"
    ask = dict(model=MODEL, messages=[{"role": "user", "content": asked.question}], max_tokens=8,
               temperature=0, extra_body={"memory": False})
    whole = oc.chat.completions.create(**ask).choices[0].message.content
    streamed = "".join(ch.choices[0].delta.content or ""
                       for ch in oc.chat.completions.create(**ask, stream=True) if ch.choices)
    assert streamed == whole and whole and "\n" not in whole

    # alice sleeps under traffic from both tenants; both replicas switch her, bob stays on base
    with Load(served, probes) as load, _http(served) as h:
        st = _sleep(h)
        assert st["last_sleep"]["metrics"], st     # lineage.json's metrics of the sleep
        load.wait_all_replicas("alice", "v0001")
        load.wait_all_replicas("bob", "base")
    assert load.errors == []
    assert len({r for _, _, r in load.seen}) == 2, "both replicas answered"
    alice_v = [v for w, v, _ in load.seen if w == "alice"]
    assert alice_v[0] == "base" and alice_v[-1] == "v0001"
    assert {v for w, v, _ in load.seen if w == "bob"} == {"base"}

    # closed-book after the sleep: alice's memorised answers are likelier; bob's did not move
    after = [closed_book(oc, p.question, p.answer) for p in probes]
    bob_after = [closed_book(bob_oc, p.question, p.answer) for p in probes]
    gained = sum(a > b for a, b in zip(after, before))
    print(f"closed-book log p(answer): before {sum(before) / len(probes):.3f}, "
          f"after {sum(after) / len(probes):.3f}, in context {sum(in_ctx) / len(probes):.3f}; "
          f"{gained}/{len(probes)} answers gained; bob {sum(bob_before):.3f} -> {sum(bob_after):.3f}")
    assert sum(after) > sum(before) and gained > len(probes) // 2
    assert all(abs(a - b) < 1e-2 for a, b in zip(bob_after, bob_before))

    # the consolidated documents left short-term memory; the deleted one was never trained
    lineage = json.loads((alice_dir / "adapters" / "v0001" / "lineage.json").read_text())
    assert {"bio-1", "bio-2"} <= set(lineage["episodes"]) and "decoy" not in lineage["episodes"]
    with _http(served) as h:
        assert not {"bio-1", "bio-2"} & {m["id"] for m in h.get("/v1/memories?status=short_term").json()["data"]}
        assert [m["id"] for m in h.get("/v1/memories?status=deleted").json()["data"]] == ["decoy"]

    # forgetting: deleting consolidated bio-1 rebuilds alice's experts without it, under traffic
    with Load(served, probes) as load, _http(served) as h:
        r = h.delete("/v1/memories/bio-1").json()
        assert r["was"] == "consolidated" and r["rebuild"]["accepted"] is True, r
        _sleep(h, version="v0002", expect_accept=False)
        load.wait_all_replicas("alice", "v0002")
    assert load.errors == []
    lin2 = json.loads((alice_dir / "adapters" / "v0002" / "lineage.json").read_text())
    assert lin2["rebuild"] is True and lin2["forgotten"] == ["bio-1"]
    assert "bio-1" not in lin2["episodes"] and "bio-2" in lin2["episodes"]
    forgotten = [closed_book(oc, p.question, p.answer) for p in probes]
    print(f"after forgetting bio-1: {sum(forgotten) / len(probes):.3f} (v0001 {sum(after) / len(probes):.3f})")
    assert sum(forgotten) < sum(after)
    assert all(abs(a - b) < 1e-2 for a, b in zip([closed_book(bob_oc, p.question, p.answer) for p in probes],
                                                 bob_before))


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
    with _http(served, "bob") as h:
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
