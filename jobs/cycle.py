"""The full wake/sleep loop over a world stream, on Ray.

    python -m jobs.cycle --config FILE [KEY=VALUE ...] [--out results.json]
    ray job submit --working-dir . -- python -m jobs.cycle --config examples/quick.yaml

Joins ``ray.address`` / ``RAY_ADDRESS`` or starts an embedded local Ray; starts the
MemoryStore and Coordinator actors; feeds the stream in ``cycle.n_sleeps`` parts; after
each sleep measures every episode so far, closed-book (a Ray task); writes JSON.

The console shows one progress line per step of each sleep (``sleepray.console.SleepBars``)
and warnings; the driver's log is ``<storage>/logs/run.log``, Ray's workers' output stays in
``<storage>/logs/ray`` (the Ray session's logs) unless ``--verbose``; TensorBoard event
files go to ``<storage>/tensorboard``.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import ray

from sleepray.config import load_config
from sleepray.console import SleepBars, link_ray_logs, setup_logging
from sleepray.cycle import evaluate, run_cycle, write_results
from sleepray.raycluster import connect
from sleepray.storage import Storage
from sleepray.stream import episodes_from_config

log = logging.getLogger("jobs.cycle")


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m jobs.cycle", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", "-c")
    p.add_argument("--out", help="results JSON (default: <storage>/cycle_results.json)")
    p.add_argument("--trigger", choices=["request", "pressure"], default="request",
                   help="sleep when asked after each part, or when the memory pressure says so")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="the driver's INFO logs and every Ray worker's output (Ray Train's per-step reports, "
                        "checkpoints, vLLM) on the console too")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    return p.parse_args(argv)


def run_on_ray(cfg, trigger: str = "request", progress: bool = True, verbose: bool = True,
               episodes: list | None = None) -> dict:
    """The cycle with the MemoryStore and Coordinator actors; evaluation as Ray tasks.
    ``episodes``: the stream (default: the configured world's).

    Not ``verbose``: Ray's workers' output stays out of this console (``<storage>/logs/ray``)
    and the sleeps show as progress lines instead (``progress``)."""
    from actors import coordinator, memory_store
    cfg.cycle.storage = str(Path(cfg.cycle.storage).resolve())
    store = Storage(cfg.cycle.storage)
    connect(cfg.ray, log_to_driver=verbose, own_logging=not verbose)
    ray_logs = link_ray_logs(store.logs)
    log.info("logs: %s; Ray's workers: %s; TensorBoard: %s", store.logs, ray_logs, store.tensorboard)
    memory = memory_store.get_or_create(cfg.cycle.storage, cfg.ray.namespace)
    coord = coordinator.start(cfg)
    eval_task = ray.remote(num_cpus=1)(evaluate)
    bars = SleepBars(cfg, store.root, enabled=progress)
    try:
        result = run_cycle(
            cfg, episodes if episodes is not None else episodes_from_config(cfg.world),
            append=lambda eps: ray.get(memory.append.remote(eps)),
            sleep=lambda trig: coordinator.sleep_and_wait(coord, trig, on_status=bars.update),
            evaluate_fn=lambda eps, ic: ray.get(eval_task.remote(cfg, cfg.cycle.storage, eps, ic)),
            trigger=trigger, progress=False, on_sleep=bars.sleep_done)
    finally:
        bars.close()
        ray.get(coord.shutdown.remote())
        ray.kill(coord)
    result["config"] = cfg.model_dump(mode="json")
    return result


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    cfg = load_config(args.config, args.overrides)
    run_log = setup_logging(Storage(Path(cfg.cycle.storage).resolve()).logs, args.verbose)
    print(f"logs: {run_log.parent}/ (run.log, coordinator.log, learner-*.log, ray/: Ray's workers); "
          f"curves: tensorboard --logdir {Storage(Path(cfg.cycle.storage).resolve()).tensorboard}", flush=True)
    result = run_on_ray(cfg, args.trigger, progress=not args.no_progress, verbose=args.verbose)
    out = write_results(result, args.out or Path(cfg.cycle.storage) / "cycle_results.json")
    R = result["R"]
    print(f"results: {out}")
    for i, row in enumerate(R):
        print(f"after sleep {i + 1}: " + "  ".join("  -  " if v is None else f"{v:.2f}" for v in row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
