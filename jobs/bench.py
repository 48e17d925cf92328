"""Benchmarks of the actor system, side by side in one run, written as JSON (+ a plot).

    python -m jobs.bench --config FILE [KEY=VALUE ...] [--out docs/results/bench.json]
        [--only rollout,publish,sleep] [--sizes 1,2,4]

* rollout: generated tokens/s of vLLM against transformers, same model, same batch,
  same sampling settings (each engine warmed up first, then timed over ``--repeats``);
* publish: seconds from "the learner has written an adapter" to "every RolloutWorker
  has it loaded" (``RolloutPool.publish``), over ``--repeats`` new versions;
* sleep: wall time of one whole sleep (Coordinator -> rollouts -> Ray Train -> publish)
  at three short-term memory sizes (episodes).
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("jobs.bench")


def bench_rollout(cfg, batch: int, max_tokens: int, repeats: int) -> dict:
    from sleepray.engines.base import GenRequest
    from sleepray.engines.factory import make_engine, vllm_available
    from sleepray.models import resolve_model_path
    from sleepray.stream import episodes_from_config
    path = resolve_model_path(cfg.model.path)
    eps = episodes_from_config(cfg.world)
    prompts = [f"{ep.context}\n{p.question}" for ep in eps for p in ep.probes][:batch]
    prompts = (prompts * (batch // max(1, len(prompts)) + 1))[:batch]
    out = {"batch": batch, "max_tokens": max_tokens, "repeats": repeats, "model": path}
    kinds = ["transformers"] + (["vllm"] if vllm_available() else [])
    for kind in kinds:
        eng = make_engine(kind, path, cfg.engine)
        try:
            reqs = [GenRequest(prompt=p, max_tokens=max_tokens, temperature=1.0, seed=i)
                    for i, p in enumerate(prompts)]
            eng.generate(reqs[:2])                            # warm-up
            times, toks = [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                res = eng.generate(reqs)
                times.append(time.perf_counter() - t0)
                toks.append(sum(len(r.token_ids) for r in res))
            out[kind] = {"tokens_per_s": sum(toks) / sum(times), "seconds": times, "tokens": toks}
        finally:
            eng.close()
    if "vllm" in out:
        out["vllm_over_transformers"] = out["vllm"]["tokens_per_s"] / out["transformers"]["tokens_per_s"]
    return out


def bench_publish(cfg, repeats: int) -> dict:
    import ray

    from actors.rollout import RolloutPool
    from sleepray.experts import ExpertBank
    from sleepray.models import load_model, resolve_model_path
    from sleepray.raycluster import connect
    connect(cfg.ray)
    path = resolve_model_path(cfg.model.path)
    model, _ = load_model(path)
    bank = ExpertBank(model, cfg.experts)
    pool = RolloutPool(cfg, path)
    lat, export = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            bank.open_new_expert()
            t0 = time.perf_counter()
            folder = bank.export_combined(Path(tmp) / f"v{i:04d}")
            export.append(time.perf_counter() - t0)
            lat.append(pool.publish(f"v{i:04d}", str(folder)))
            bank.freeze_current()
    info = pool.info()
    pool.shutdown()
    del ray
    return {"rollout_workers": len(info), "engine": info[0]["engine"], "export_seconds": export,
            "publish_seconds": lat, "publish_median_s": statistics.median(lat)}


def bench_sleep(cfg, sizes: list[int]) -> dict:
    from actors import coordinator
    from sleepray.storage import Storage
    from sleepray.memory import MemoryStore
    from sleepray.raycluster import connect
    from sleepray.world import World
    connect(cfg.ray)
    rows = []
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            c = cfg.model_copy(deep=True)
            c.cycle.storage = tmp
            c.ray.namespace = f"bench-{n}-{time.time_ns()}"
            eps = World(c.world.seed + 7919, c.world.people_per_episode, c.world.orgs_per_episode,
                        c.world.places_per_episode, c.world.phrasings_per_fact).episodes(n)
            MemoryStore(Storage(tmp).memory).append(eps)
            coord = coordinator.start(c, watch=False)
            t0 = time.perf_counter()
            st = coordinator.sleep_and_wait(coord)
            wall = time.perf_counter() - t0
            import ray
            ray.get(coord.shutdown.remote())
            ray.kill(coord)
            if st["error"]:
                raise RuntimeError(st["error"])
            phases = {p: m.get("seconds") for p, m in st["last_sleep"]["metrics"].items()}
            rows.append({"episodes": n, "tokens": sum(len(e.context.split()) for e in eps),
                         "wall_seconds": wall, "phase_seconds": phases})
            log.info("sleep over %d episodes: %.1fs %s", n, wall, phases)
    return {"sizes": rows}


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [k for k in ("rollout", "sleep") if k in result]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    for ax, k in zip(axes[0], panels):
        if k == "rollout":
            kinds = [x for x in ("transformers", "vllm") if x in result[k]]
            ax.bar(kinds, [result[k][x]["tokens_per_s"] for x in kinds], color=["#888", "#3a7"][: len(kinds)])
            ax.set_ylabel("generated tokens / s")
            ax.set_title(f"rollout, batch {result[k]['batch']}")
        else:
            rows = result[k]["sizes"]
            ax.plot([r["episodes"] for r in rows], [r["wall_seconds"] for r in rows], "o-")
            ax.set_xlabel("episodes in short-term memory")
            ax.set_ylabel("one sleep, wall seconds")
            ax.set_title("sleep wall time")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["learner"]:       # the learner benchmark: jobs/bench_learner.py
        from jobs.bench_learner import main as learner_main
        return learner_main(argv[1:])
    from sleepray.config import load_config
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m jobs.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", "-c")
    p.add_argument("--out", default="bench.json")
    p.add_argument("--only", default="rollout,publish,sleep")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sizes", default="1,2,4")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    which = set(args.only.split(","))
    result: dict = {"config": cfg.model_dump(mode="json"), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if "rollout" in which:
        result["rollout"] = bench_rollout(cfg, args.batch, args.max_tokens, args.repeats)
    if "publish" in which:
        result["publish"] = bench_publish(cfg, args.repeats)
    if "sleep" in which:
        result["sleep"] = bench_sleep(cfg, [int(s) for s in args.sizes.split(",")])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    summary = {k: v for k, v in result.items() if k != "config"}
    print(json.dumps(summary, indent=2)[:4000])
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
