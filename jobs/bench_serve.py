"""Benchmark of the awake endpoint: latency idle and during sleeps, failures across swaps.

    python -m jobs.bench_serve [--config FILE] [--seconds 10] [--concurrency 2] [--swaps 3]
                               [--out runs/bench_serve.json] [KEY=VALUE ...]

Deploys the endpoint (Ray Serve, real engine) on a fresh storage folder under
``cycle.storage``, adds one document memory, then

1. idle: ``--concurrency`` clients send ``/v1/completions`` for ``--seconds``;
2. ``--swaps`` times: add another document, ``POST /v1/sleep``, keep the clients going
   until the replica serves the new adapter version (and one second more).

Writes JSON: p50/p99/mean latency and throughput idle and during the sleeps, the failed
requests (any non-200 or transport error) across the swaps, and the versions seen.
Latency is measured on the client, end to end over HTTP.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import threading
import time
from pathlib import Path

log = logging.getLogger("sleepray.bench_serve")


def _stats(samples: list[tuple[float, float, bool, str]], seconds: float) -> dict:
    import numpy as np
    ok = [e - s for s, e, good, _ in samples if good]
    lat = np.array(ok) * 1000 if ok else np.array([float("nan")])
    return {"requests": len(samples), "failed": sum(not g for _, _, g, _ in samples),
            "p50_ms": round(float(np.percentile(lat, 50)), 1), "p99_ms": round(float(np.percentile(lat, 99)), 1),
            "mean_ms": round(float(lat.mean()), 1), "seconds": round(seconds, 2),
            "throughput_rps": round(len(ok) / seconds, 2) if seconds > 0 else None}


class Load:
    """``concurrency`` threads sending completions; every request is logged with its times."""

    def __init__(self, base: str, headers: dict, model: str, prompts: list[str], concurrency: int):
        self.base, self.headers, self.model, self.prompts = base, headers, model, prompts
        self.samples: list[tuple[float, float, bool, str]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(concurrency)]

    def _run(self, i: int) -> None:
        import httpx
        with httpx.Client(base_url=self.base, headers=self.headers, timeout=300) as h:
            k = i
            while not self._stop.is_set():
                body = {"model": self.model, "prompt": self.prompts[k % len(self.prompts)], "max_tokens": 8,
                        "temperature": 0, "memory": False}
                t0 = time.time()
                try:
                    r = h.post("/v1/completions", json=body)
                    good, version = r.status_code == 200, r.headers.get("x-sleepray-adapter", "?")
                    if not good:
                        self.errors.append(f"{r.status_code}: {r.text[:200]}")
                except Exception as e:  # noqa: BLE001 - a failed request is what we count
                    good, version = False, "?"
                    self.errors.append(repr(e))
                self.samples.append((t0, time.time(), good, version))
                k += 1

    def start(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(300)

    def between(self, a: float, b: float) -> list:
        return [s for s in self.samples if a <= s[0] < b]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.bench_serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", "-c")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of the idle measurement")
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--swaps", type=int, default=3, help="sleeps (adapter swaps) to run under load")
    ap.add_argument("--out", default="runs/bench_serve.json")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import httpx
    from ray import serve

    from actors.serve import run_serve
    from sleepray.config import load_config
    from sleepray.raycluster import connect
    from sleepray.world import World, qa_prompt

    cfg = load_config(args.config, args.overrides)
    cfg.cycle.storage = str(Path(cfg.cycle.storage) / time.strftime("bench-serve-%Y%m%d-%H%M%S"))
    connect(cfg.ray, log_to_driver=False)
    t_deploy = time.time()
    run_serve(cfg, name="sleepray-bench")
    deploy_s = time.time() - t_deploy
    base = f"http://{cfg.serve.host}:{cfg.serve.port}"
    headers = {"Authorization": f"Bearer {cfg.serve.api_key}"} if cfg.serve.api_key else {}
    world = World(cfg.world.seed + 4242, 1, 0, 0, 1)
    episodes = [world.episode(i) for i in range(args.swaps + 1)]
    prompts = [qa_prompt(p.question) for ep in episodes for p in ep.probes]
    h = httpx.Client(base_url=base, headers=headers, timeout=60)

    def add(ep):
        r = h.post("/v1/memories", json={"text": ep.context})
        r.raise_for_status()

    add(episodes[0])
    load = Load(base, headers, cfg.serve.model_name, prompts, args.concurrency).start()
    t0 = time.time()
    time.sleep(args.seconds)
    idle = (t0, time.time())
    sleeps = []
    for i in range(args.swaps):
        add(episodes[i + 1])
        before = h.get("/v1/sleep/status").json()["serving_adapter"]
        s0 = time.time()
        ack = h.post("/v1/sleep", json={"reason": f"bench swap {i + 1}"}).json()
        if not ack.get("accepted", False):
            raise RuntimeError(f"sleep not accepted: {ack}")
        while True:
            st = h.get("/v1/sleep/status").json()
            if st["phase"] == "wake" and st["serving_adapter"] != before:
                break
            if st["phase"] == "wake" and (st.get("last_sleep") or {}).get("error"):
                raise RuntimeError(f"sleep failed: {st['last_sleep']}")
            time.sleep(0.5)
        s1 = time.time()
        sleeps.append({"from": before, "to": st["serving_adapter"], "seconds": round(s1 - s0, 1),
                       "window": (s0, s1)})
        log.info("swap %d: %s -> %s after %.1fs", i + 1, before, st["serving_adapter"], s1 - s0)
        time.sleep(1.0)
    t_end = time.time()
    load.stop()
    h.close()

    during = [s for sl in sleeps for s in load.between(*sl["window"])]
    swap_window = load.between(sleeps[0]["window"][0], t_end) if sleeps else []
    versions = []
    for *_, v in sorted(load.samples):
        if not versions or versions[-1] != v:
            versions.append(v)
    result = {
        "benchmark": "awake endpoint (Ray Serve) latency idle / during sleep, failures across swaps",
        "machine": {"platform": platform.platform(), "cpus": __import__("os").cpu_count()},
        "engine": cfg.engine.kind, "model": cfg.model.path, "concurrency": args.concurrency,
        "max_tokens": 8, "deploy_seconds": round(deploy_s, 1),
        "idle": _stats(load.between(*idle), idle[1] - idle[0]),
        "during_sleep": _stats(during, sum(sl["window"][1] - sl["window"][0] for sl in sleeps)),
        "swaps": {"count": len(sleeps), "requests": len(swap_window),
                  "failed_requests": sum(not g for _, _, g, _ in swap_window),
                  "versions_in_order": versions,
                  "sleeps": [{k: v for k, v in sl.items() if k != "window"} for sl in sleeps]},
        "errors": load.errors[:10],
        "config_overrides": args.overrides,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("idle", "during_sleep", "swaps")}, indent=2))
    print(f"written to {out}")
    serve.delete("sleepray-bench")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
