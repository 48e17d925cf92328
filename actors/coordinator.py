"""Coordinator: the named actor that runs WAKE -> NREM -> REM -> publish (-> deep) -> WAKE.

The state machine is ``sleepray.cycle.run_sleep``; this actor adds the triggers (memory
pressure, a schedule, a request), the Ray backend (RolloutWorkers + Ray Train learner),
and status. Every phase is recorded on disk before the next starts, so a Coordinator
that is killed and started again (same storage) resumes the unfinished sleep at its first
unfinished phase by itself.
"""
from __future__ import annotations

import logging
import threading
import time
import traceback
from pathlib import Path
from typing import Optional

import ray

from sleepray.config import Config
from sleepray.cycle import run_sleep, unfinished

log = logging.getLogger(__name__)
NAME = "coordinator"


class RayBackend:
    """NREM on a Ray Train run fed by RolloutWorkers; REM on a one-worker Ray Train run."""

    def __init__(self, cfg):
        self.cfg, self.pool, self.publish_seconds = cfg, None, []

    def _pool(self, storage: Path):
        from actors.rollout import RolloutPool
        from sleepray.sleep_phases import current_base
        base = current_base(self.cfg, storage)
        if self.pool is None:
            self.pool = RolloutPool(self.cfg, base)
        else:
            self.pool.ensure_base(base)
        return self.pool

    def nrem(self, cfg, storage: Path, rec, episodes, out: Path) -> dict:
        from actors.learner import nrem_on_ray
        from sleepray.sleep import adapters_dir
        from sleepray.sleep_phases import starting_bank_dir
        start = starting_bank_dir(cfg, storage)
        teacher = None
        if start is not None:   # the frozen model before expansion = the latest version
            v = start.parent
            teacher = {"name": v.name, "path": str(adapters_dir(storage) / v.name)}
        return nrem_on_ray(cfg, storage, rec, self._pool(storage), teacher)

    def rem(self, cfg, storage: Path, rec, episodes, out: Path) -> dict:
        from actors.learner import rem_on_ray
        return rem_on_ray(cfg, storage, rec)

    def published(self, version_dir: Path) -> None:
        if self.pool is not None:
            self.publish_seconds.append(self.pool.publish(version_dir.name, str(version_dir)))

    def release(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None


@ray.remote(num_cpus=0, max_restarts=0, max_concurrency=8)
class Coordinator:
    def __init__(self, cfg: dict, watch: bool = True):
        self.cfg = Config.model_validate(cfg)
        self.storage = Path(self.cfg.cycle.storage).resolve()
        self.backend = RayBackend(self.cfg)
        self.phase, self.sleep_id, self.last, self.error = "wake", None, None, None
        self.sleeps_done = 0      # sleeps that consolidated something
        self.wakes = 0            # sleep attempts that ended (also: nothing to do, failed)
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._last_sleep_at = time.time()
        if unfinished(self.storage) is not None:
            self.request_sleep("resume")
        if watch:
            threading.Thread(target=self._watch, daemon=True).start()

    # ----------------------------------------------------------------- triggers
    def _pressure(self) -> dict:
        from sleepray.memory import MemoryStore
        return MemoryStore(self.storage / "memory").pressure()

    def _watch(self) -> None:
        cyc = self.cfg.cycle
        while not self._stop.wait(cyc.poll_seconds):
            try:
                if self.busy():
                    continue
                if self._pressure()["short_term_tokens"] >= cyc.capacity_tokens:
                    self.request_sleep("pressure")
                elif cyc.schedule_seconds and time.time() - self._last_sleep_at >= cyc.schedule_seconds:
                    if self._pressure()["short_term_episodes"]:
                        self.request_sleep("schedule")
            except Exception:  # a watcher that dies silently would stop all sleeping
                log.exception("sleep trigger check failed")

    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def request_sleep(self, reason: str = "request") -> dict:
        with self._lock:
            if self.busy():
                return {"accepted": False, "reason": "a sleep is running", "phase": self.phase,
                        "sleep_id": self.sleep_id}
            self.error = None
            self._thread = threading.Thread(target=self._sleep, args=(reason,), daemon=True)
            self._thread.start()
            return {"accepted": True, "reason": reason}

    # -------------------------------------------------------------------- sleep
    def _on_phase(self, rec, phase: str) -> None:
        self.phase, self.sleep_id = phase, rec.sleep_id

    def _sleep(self, reason: str) -> None:
        try:
            rec = run_sleep(self.cfg, self.storage, backend=self.backend, trigger=reason,
                            progress=False, on_phase=self._on_phase)
            if rec is not None:
                self.sleeps_done += 1
                self.last = {"sleep_id": rec.sleep_id, "version": rec.version, "trigger": rec.data["trigger"],
                             "episodes": len(rec.episodes),
                             "metrics": {p: rec.metrics(p) for p in rec.phases},
                             "publish_seconds": self.backend.publish_seconds[-1:]}
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
            log.error("sleep failed: %s\n%s", self.error, traceback.format_exc())
        finally:
            if self.cfg.ray.release_between_sleeps:
                self.backend.release()
            self.phase, self._last_sleep_at = "wake", time.time()
            self.wakes += 1

    # ------------------------------------------------------------------- status
    def status(self) -> dict:
        from sleepray.sleep import latest_version
        v = latest_version(self.storage)
        return {"phase": self.phase, "sleep_id": self.sleep_id if self.busy() else None,
                "pressure": self._pressure(), "adapter_version": v.name if v else None,
                "last_sleep": self.last, "sleeps_done": self.sleeps_done, "wakes": self.wakes,
                "error": self.error,
                "storage": str(self.storage)}

    def wait_idle(self, timeout: float = 600.0) -> dict:
        t = self._thread
        if t is not None:
            t.join(timeout)
        return self.status()

    def rollout_info(self) -> list:
        return self.backend.pool.info() if self.backend.pool is not None else []

    def shutdown(self) -> None:
        self._stop.set()
        self.backend.release()


def start(cfg, watch: bool = True):
    """The Coordinator of ``cfg`` (named, in ``cfg.ray.namespace``; detached when asked)."""
    opts = dict(name=NAME, namespace=cfg.ray.namespace, get_if_exists=True)
    if cfg.ray.detached:
        opts["lifetime"] = "detached"
    return Coordinator.options(**opts).remote(cfg.model_dump(mode="json"), watch)


def sleep_and_wait(coord, trigger: str = "request", timeout: float = 3600.0) -> dict:
    """Ask for a sleep (or, with ``trigger="pressure"``, wait for the Coordinator to fall
    asleep by itself) and return its status once it is awake again."""
    before = ray.get(coord.status.remote())["wakes"]
    if trigger == "request":
        while not ray.get(coord.request_sleep.remote("request"))["accepted"]:
            ray.get(coord.wait_idle.remote(5.0))   # one is running already: the next is ours
            before = ray.get(coord.status.remote())["wakes"]
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = ray.get(coord.wait_idle.remote(5.0))
        if st["wakes"] > before and st["phase"] == "wake":
            return st
        time.sleep(0.5)
    raise TimeoutError(f"no sleep finished within {timeout}s")
