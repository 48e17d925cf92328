"""Coordinator: the named actor that runs WAKE -> NREM -> REM -> publish (-> deep) -> WAKE.

It hosts the library's sleep controller (``sleepray.sleep_control.SleepController``:
triggers, one sleep at a time, status) with a sleep that runs ``sleepray.sleep.run_sleep``
on :class:`RayBackend` (RolloutWorkers + a Ray Train learner). Every step is recorded on
disk before the next starts, so a Coordinator that is killed and started again (same
storage) resumes the unfinished sleep at its first unfinished step by itself.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

import ray

from sleepray.banks import current_base
from sleepray.config import Config
from sleepray.console import log_to_file
from sleepray.sleep import run_sleep
from sleepray.sleep_control import SleepController
from sleepray.storage import Storage

NAME = "coordinator"


class RayBackend:
    """NREM on a Ray Train run, REM on a one-worker Ray Train run; both fed by the RolloutWorkers
    when ``ray.sampling`` says so."""

    def __init__(self, cfg):
        self.cfg, self.pool = cfg, None

    def _pool(self, store: Storage):
        from actors.rollout import RolloutPool
        base = current_base(self.cfg, store)
        if self.pool is None:
            self.pool = RolloutPool(self.cfg, base)
        else:
            self.pool.ensure_base(base)
        return self.pool

    def nrem(self, cfg, store: Storage, rec) -> dict:
        from actors.learner import fit_step
        start = store.starting_bank()   # the frozen model before expansion = the latest version
        teacher = {"name": start.parent.name, "path": str(start.parent)} if start is not None else None
        return fit_step(cfg, store, rec, "nrem", cfg.ray.num_learner_workers, pool=self._pool(store),
                        teacher=teacher)

    def rem(self, cfg, store: Storage, rec) -> dict:
        from actors.learner import fit_step
        return fit_step(cfg, store, rec, "rem", 1, pool=self._pool(store) if cfg.ray.samples_on_rollouts else None)

    def published(self, version_dir: Path):
        return self.pool.publish(version_dir.name, str(version_dir)) if self.pool is not None else None

    def release(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None


@ray.remote(num_cpus=0, max_restarts=0, max_concurrency=8)
class Coordinator:
    def __init__(self, cfg: dict, watch: bool = True):
        self.cfg = Config.model_validate(cfg)
        self.storage = Path(self.cfg.cycle.storage).resolve()
        log_to_file(Storage(self.storage).logs / "coordinator.log")
        self.backend = RayBackend(self.cfg)
        self.control = SleepController(self.cfg, self.storage, self._sleep, name=NAME, watch=watch)

    def _sleep(self, trigger: str):
        try:
            rec = run_sleep(self.cfg, self.storage, backend=self.backend, trigger=trigger, progress=False)
            return rec.data if rec is not None else None
        finally:
            if self.cfg.ray.release_between_sleeps:
                self.backend.release()

    def request_sleep(self, reason: str = "request") -> dict:
        return self.control.request_sleep(reason)

    def status(self) -> dict:
        return self.control.status()

    def wait_idle(self, timeout: float = 600.0) -> dict:
        return self.control.wait(timeout)

    def rollout_info(self) -> list:
        return self.backend.pool.info() if self.backend.pool is not None else []

    def shutdown(self) -> None:
        self.control.stop()
        self.backend.release()


def start(cfg, watch: bool = True):
    """The Coordinator of ``cfg`` (named, in ``cfg.ray.namespace``; detached when asked)."""
    opts = dict(name=NAME, namespace=cfg.ray.namespace, get_if_exists=True)
    if cfg.ray.detached:
        opts["lifetime"] = "detached"
    return Coordinator.options(**opts).remote(cfg.model_dump(mode="json"), watch)


def sleep_and_wait(coord, trigger: str = "request", timeout: float = 3600.0,
                   on_status: Optional[Callable[[dict], None]] = None) -> dict:
    """Ask for a sleep (or, with ``trigger="pressure"``, wait for the Coordinator to fall
    asleep by itself) and return its status once it is awake again. ``on_status`` sees the
    status about once a second meanwhile (``sleepray.console.SleepBars.update``)."""
    poll = 5.0 if on_status is None else 1.0
    before = ray.get(coord.status.remote())["wakes"]
    if trigger == "request":
        while not ray.get(coord.request_sleep.remote("request"))["accepted"]:
            ray.get(coord.wait_idle.remote(5.0))   # one is running already: the next is ours
            before = ray.get(coord.status.remote())["wakes"]
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = ray.get(coord.wait_idle.remote(poll))
        if on_status is not None:
            on_status(st)
        if st["wakes"] > before and st["phase"] == "wake":
            return st
        time.sleep(0.5)
    raise TimeoutError(f"no sleep finished within {timeout}s")
