"""The load benchmark's client and table (sleepray/serve_bench.py) against a real HTTP server:
uvicorn serving the endpoint's app with two tenants over the FakeEngine of tests/serve_fakes.py
(the real-engine run is ``python -m jobs.bench_serve``, results in docs/results/bench_serve.json)."""
import socket
import threading
import time

import pytest
from serve_fakes import _publish, made  # noqa: F401  (made: a fixture)

from sleepray import serve_bench as sb
from sleepray.tenants import add_key


def test_summary_and_switches_count_what_happened():
    s = [sb.Sample("a", 0.0, 0.1, 1.0, True, 200, "base", "r1"),
         sb.Sample("a", 1.0, 1.2, 3.0, True, 200, "v0001", "r1"),
         sb.Sample("b", 1.0, None, 1.5, False, 500, "?", "?", "500: boom"),
         sb.Sample("a", 2.0, 2.1, 2.5, True, 200, "base", "r2")]      # a replica still on base
    row = sb.summary(s, 4.0)
    assert row["requests"] == 4 and row["failed"] == 1 and row["throughput_rps"] == 0.75
    assert row["p50_ms"] == 1000.0 and row["ttft_p50_ms"] == 100.0
    assert sb.switches(s) == {"a": ["base", "v0001"]}
    assert sb.between(s, [(0.5, 1.5)]) == s[1:3]


@pytest.fixture
def server(made, tmp_path):
    import uvicorn

    from sleepray.serve_app import build_app
    f = tmp_path / "keys.yaml"
    keys = {t: add_key(f, t) for t in ("a", "b")}
    svc, _, _, _ = made(f"serve.tenants_file={f}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(build_app(svc), host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    while not srv.started:
        time.sleep(0.05)
    yield svc, f"http://127.0.0.1:{port}", keys
    srv.should_exit = True
    th.join(10)


def test_load_streams_for_every_tenant_and_sees_a_switch(server):
    svc, base, keys = server
    load = sb.Load(base, {**keys, "c": "not-a-key"}, "sleepray", ["Q: x\nA:", "Q: y\nA:"], clients=6,
                   max_tokens=4).start()
    time.sleep(1.0)
    _publish(svc.tenants["a"].storage.root, "v0001")
    assert svc.tenants["a"].pointer.poll_once()
    time.sleep(1.0)
    samples = load.stop()
    good = [s for s in samples if s.tenant in ("a", "b")]
    assert good and all(s.ok and s.t0 < s.t_first <= s.t_end for s in good)
    assert {s.tenant for s in good} == {"a", "b"} and {s.replica for s in good} == {"local"}
    assert sb.switches(samples) == {"a": ["base", "v0001"], "b": ["base"]}
    bad = [s for s in samples if s.tenant == "c"]       # a wrong key: every request counted as failed
    assert bad and not any(s.ok for s in bad) and {s.status for s in bad} == {401}
