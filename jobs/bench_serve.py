"""Load benchmark of the awake endpoint: many tenants and clients, idle and while tenants sleep.

    python -m jobs.bench_serve [--config FILE] [--tenants 8] [--clients 64] [--seconds 30]
                               [--switches 3] [--sleeping 3] [--replicas 1]
                               [--out docs/results/bench_serve.json] [KEY=VALUE ...]

Deploys the endpoint (Ray Serve, the real engine, ``--replicas`` replicas) on a fresh
storage folder under ``cycle.storage`` with ``--tenants`` tenants (a keys file of hashed
keys) and an admin key; each tenant gets one document memory. Then ``--clients``
streaming clients (client i is tenant i mod N; ``sleepray.serve_bench.Load``) run:

1. idle, for ``--seconds``;
2. ``--switches`` rounds: in groups of ``--sleeping`` tenants at once, each tenant of the
   group gets a new document and the admin asks for its sleep; the group is waited for
   until every tenant in it has published its next version.

Writes JSON (the table: requests, failures, p50/p99 latency, p50/p99 time to first token,
throughput, idle and during sleeps; the versions each tenant's answers named in order;
revision, command, seeds), every request as Parquet beside it, and a plot of latency over
time with the sleeps shaded. Latency is measured on the client, end to end over HTTP.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path

log = logging.getLogger("sleepray.bench_serve")


def _wait_versions(h, tenants: list[str], want: str, timeout: float = 900) -> None:
    deadline = time.time() + timeout
    left = set(tenants)
    while left and time.time() < deadline:
        for t in sorted(left):
            st = h.get(f"/v1/tenants/{t}/sleep/status").json()
            if (st.get("last_sleep") or {}).get("error"):
                raise RuntimeError(f"tenant {t}: sleep failed: {st['last_sleep']}")
            if st["phase"] == "wake" and st["adapter_version"] == want:
                left.discard(t)
        time.sleep(0.5)
    if left:
        raise RuntimeError(f"tenants {sorted(left)} did not publish {want} within {timeout}s")


def _plot(samples, sleeps, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    ok = sorted((s for s in samples if s.ok), key=lambda s: s.t0)
    if not ok:
        return
    t0 = ok[0].t0
    x = np.array([s.t0 - t0 for s in ok])
    y = np.array([(s.t_end - s.t0) * 1000 for s in ok])
    f = np.array([((s.t_first or s.t_end) - s.t0) * 1000 for s in ok])
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.scatter(x, y, s=2, alpha=0.3, label="latency")
    ax.scatter(x, f, s=2, alpha=0.3, label="time to first token")
    for a, b in sleeps:
        ax.axvspan(a - t0, b - t0, color="grey", alpha=0.15)
    ax.set_xlabel("seconds (grey: tenants sleeping)")
    ax.set_ylabel("ms")
    ax.set_yscale("log")
    ax.legend(loc="upper left", markerscale=5)
    ax.set_title("awake endpoint under load: every request")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.bench_serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", "-c")
    ap.add_argument("--tenants", type=int, default=8)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=30.0, help="length of the idle measurement")
    ap.add_argument("--switches", type=int, default=3, help="sleeps (version switches) per tenant under load")
    ap.add_argument("--sleeping", type=int, default=3, help="tenants asked to sleep at once")
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--out", default="docs/results/bench_serve.json")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)     # not a line per request

    import httpx
    import pyarrow as pa
    import pyarrow.parquet as pq
    from ray import serve

    from actors.serve import run_serve
    from sleepray import serve_bench as sb
    from sleepray.config import load_config
    from sleepray.provenance import provenance
    from sleepray.raycluster import connect
    from sleepray.tenants import add_key
    from sleepray.world import World, qa_prompt

    cfg = load_config(args.config, [f"serve.num_replicas={args.replicas}", *args.overrides])
    cfg.cycle.storage = str(Path(cfg.cycle.storage) / time.strftime("bench-serve-%Y%m%d-%H%M%S"))
    Path(cfg.cycle.storage).mkdir(parents=True, exist_ok=True)
    keys_file = Path(cfg.cycle.storage) / "keys.yaml"
    tenants = [f"t{i:02d}" for i in range(args.tenants)]
    keys = {t: add_key(keys_file, t) for t in tenants}
    admin = add_key(keys_file, None, admin=True)
    cfg.serve.tenants_file, cfg.serve.api_key = str(keys_file), None
    connect(cfg.ray, log_to_driver=False)
    t_deploy = time.time()
    run_serve(cfg, name="sleepray-bench")
    deploy_s = time.time() - t_deploy
    base = f"http://{cfg.serve.host}:{cfg.serve.port}"
    world = World(cfg.world.seed + 4242, 1, 0, 0, 1)
    n_eps = args.switches + 1
    episodes = {t: [world.episode(i * n_eps + j) for j in range(n_eps)] for i, t in enumerate(tenants)}
    prompts = [qa_prompt(p.question) for eps in episodes.values() for p in eps[0].probes]

    def add(t: str, j: int) -> None:
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {keys[t]}"}, timeout=120) as c:
            c.post("/v1/memories", json={"text": episodes[t][j].context}).raise_for_status()

    for t in tenants:
        add(t, 0)
    load = sb.Load(base, keys, cfg.serve.model_name, prompts, args.clients, args.max_tokens).start()
    t0 = time.time()
    time.sleep(args.seconds)
    idle = [(t0, time.time())]
    windows, rounds = [], []
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {admin}"}, timeout=120) as h:
        for r in range(args.switches):
            want = f"v{r + 1:04d}"
            for g in range(0, len(tenants), args.sleeping):
                group = tenants[g: g + args.sleeping]
                s0 = time.time()
                for t in group:
                    add(t, r + 1)
                    ack = h.post(f"/v1/tenants/{t}/sleep", json={"reason": f"bench round {r + 1}"}).json()
                    if not ack.get("accepted"):
                        raise RuntimeError(f"tenant {t}: sleep not accepted: {ack}")
                _wait_versions(h, group, want)
                windows.append((s0, time.time()))
                rounds.append({"round": r + 1, "tenants": group, "version": want,
                               "seconds": round(time.time() - s0, 1)})
                log.info("round %d: %s published %s in %.1fs", r + 1, group, want, time.time() - s0)
        time.sleep(2.0)          # every replica polls the last versions in
    samples = load.stop()
    t_end = time.time()

    between_all = [s for s in samples if s.t0 >= windows[0][0]] if windows else []
    seen = sb.switches(samples)
    idle_row = sb.summary(sb.between(samples, idle), idle[0][1] - idle[0][0])
    during = sb.summary(sb.between(samples, windows), sum(b - a for a, b in windows))
    result = {
        "benchmark": "awake endpoint under load: tenants x streaming clients, idle and while tenants sleep",
        **provenance([cfg.seed.seed], [cfg.world.seed + 4242],
                     argv=None if argv is None else ["python", "-m", "jobs.bench_serve", *argv]),
        "machine_cpus": os.cpu_count(), "platform": platform.platform(),
        "engine": cfg.engine.kind, "model": cfg.model.path, "tenants": args.tenants, "clients": args.clients,
        "replicas": args.replicas, "max_tokens": args.max_tokens, "deploy_seconds": round(deploy_s, 1),
        "idle": idle_row, "during_sleeps": during,
        "p99_during_over_idle": round(during["p99_ms"] / idle_row["p99_ms"], 2)
        if during["p99_ms"] and idle_row["p99_ms"] else None,
        "switches": {"rounds": rounds, "requests_from_first_sleep": len(between_all),
                     "failed_from_first_sleep": sum(not s.ok for s in between_all),
                     "versions_seen": seen,
                     "min_switches_seen_per_tenant": min((len(v) - 1 for v in seen.values()), default=0),
                     "replicas_seen": sorted({s.replica for s in samples if s.ok})},
        "all": sb.summary(samples, t_end - t0),
        "errors": sorted({s.error for s in samples if not s.ok})[:10],
        "config_overrides": args.overrides,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    pq.write_table(pa.Table.from_pylist(sb.as_rows(samples)), out.with_suffix(".parquet"))
    _plot(samples, windows, out.with_suffix(".png"))
    print(json.dumps({k: result[k] for k in ("idle", "during_sleeps", "p99_during_over_idle")}, indent=2))
    print(json.dumps({k: v for k, v in result["switches"].items() if k != "rounds"}, indent=2))
    print(f"written to {out} (+ .parquet, .png)")
    serve.delete("sleepray-bench")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
