"""The full wake/sleep loop over a world stream, on Ray.

    python -m jobs.cycle --config FILE [KEY=VALUE ...] [--out results.json]
    ray job submit --working-dir . -- python -m jobs.cycle --config examples/quick.yaml

Joins ``ray.address`` / ``RAY_ADDRESS`` or starts an embedded local Ray; starts the
MemoryStore and Coordinator actors; feeds the stream in ``cycle.n_sleeps`` parts; after
each sleep measures every episode so far, closed-book (a Ray task); writes JSON.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import ray

from sleepray.config import load_config
from sleepray.cycle import evaluate, run_cycle, write_results
from sleepray.raycluster import connect
from sleepray.stream import episodes_from_config

log = logging.getLogger("jobs.cycle")


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m jobs.cycle", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", "-c")
    p.add_argument("--out", help="results JSON (default: <storage>/cycle_results.json)")
    p.add_argument("--trigger", choices=["request", "pressure"], default="request",
                   help="sleep when asked after each part, or when the memory pressure says so")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    return p.parse_args(argv)


def run_on_ray(cfg, trigger: str = "request", progress: bool = True) -> dict:
    """The cycle with the MemoryStore and Coordinator actors; evaluation as Ray tasks."""
    from actors import coordinator, memory_store
    cfg.cycle.storage = str(Path(cfg.cycle.storage).resolve())
    connect(cfg.ray)
    memory = memory_store.get_or_create(cfg.cycle.storage, cfg.ray.namespace)
    coord = coordinator.start(cfg)
    eval_task = ray.remote(num_cpus=1)(evaluate)
    try:
        result = run_cycle(
            cfg, episodes_from_config(cfg.world),
            append=lambda eps: ray.get(memory.append.remote(eps)),
            sleep=lambda trig: coordinator.sleep_and_wait(coord, trig),
            evaluate_fn=lambda eps, ic: ray.get(eval_task.remote(cfg, cfg.cycle.storage, eps, ic)),
            trigger=trigger, progress=progress)
    finally:
        ray.get(coord.shutdown.remote())
        ray.kill(coord)
    result["config"] = cfg.model_dump(mode="json")
    return result


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse(sys.argv[1:] if argv is None else argv)
    cfg = load_config(args.config, args.overrides)
    result = run_on_ray(cfg, args.trigger, progress=not args.no_progress)
    out = write_results(result, args.out or Path(cfg.cycle.storage) / "cycle_results.json")
    R = result["R"]
    print(f"results: {out}")
    for i, row in enumerate(R):
        print(f"after sleep {i + 1}: " + "  ".join("  -  " if v is None else f"{v:.2f}" for v in row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
