"""One sleep, top to bottom: open or resume its record, NREM, REM, publish, deep sleep.

    rec = open_sleep(...)          sleeps/sNNNN/record.json: the episodes, the steps planned
    nrem    backend.nrem           a fresh expert learns the short-term episodes (nrem_step)
    rem     backend.rem            dreams, trials, ReST-EM, dream SFT, replay (rem_step)
    publish publish                adapters/vNNNN lands; the episodes become consolidated
    deep    deep_sleep             every K sleeps: the experts merge into the base weights

This module is the only place the order is written. Each step writes its outputs under the
sleep's folder, then is marked done in the record: a process that dies anywhere resumes
at the first unfinished step of the unfinished sleep, and nothing finished is redone.
Deleted memories are dropped before every step that reads them (``live_episodes``); when a
consolidated one was deleted, the next sleep is a rebuild without it (``sleepray.forget``).
The backend decides only where NREM and REM run: :class:`LocalBackend` in this process,
``actors.coordinator.RayBackend`` on RolloutWorkers and a Ray Train learner.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Optional

from sleepray import forget, tb
from sleepray.memory import MemoryStore
from sleepray.nrem_step import nrem_step
from sleepray.publish import deep_sleep, publish
from sleepray.rem_step import rem_step
from sleepray.sleep_record import SleepRecord, live_episodes, records, unfinished
from sleepray.storage import PathLike, Storage

log = logging.getLogger(__name__)
OnStep = Optional[Callable[[SleepRecord, str], None]]


class LocalBackend:
    """NREM and REM in this process, on the learner's own model."""

    def __init__(self, progress: bool = True):
        self.progress = progress

    def nrem(self, cfg, store: Storage, rec: SleepRecord) -> dict:
        return nrem_step(cfg, store, rec, progress=self.progress)

    def rem(self, cfg, store: Storage, rec: SleepRecord) -> dict:
        return rem_step(cfg, store, rec)

    def published(self, version_dir: Path) -> Optional[float]:
        """The new version landed: engines that serve it load it (returns their seconds)."""
        return None


def plan(cfg, number: int, only: Optional[list[str]] = None) -> list[str]:
    """The steps sleep ``number`` has: REM when enabled, deep sleep every K-th sleep."""
    def wanted(step: str) -> bool:
        return only is None or step in only
    return (["nrem"] + (["rem"] if cfg.rem.enabled and wanted("rem") else []) + ["publish"]
            + (["deep"] if number % cfg.experts.deep_sleep_every == 0 and wanted("deep") else []))


def open_sleep(cfg, store: Storage, trigger: str = "request",
               only: Optional[list[str]] = None) -> Optional[SleepRecord]:
    """The unfinished sleep to resume, else a new one over the short-term memory (or None)."""
    rec = unfinished(store)
    if rec is not None:
        log.info("resuming sleep %s at step %s", rec.sleep_id, rec.next_phase)
        return rec
    memory = MemoryStore(store.memory)
    rebuild = {"forgotten": memory.forgotten()} if forget.pending(store, memory) else None
    ids = [r["episode_id"] for r in memory.episodes("all" if rebuild else "short_term")]
    if not ids and not rebuild:
        log.info("short-term memory is empty: nothing to consolidate")
        return None
    if rebuild:
        dropped = forget.purge_replay(store, rebuild["forgotten"])
        log.info("rebuild: %d memories forgotten (%d replay rows dropped); retraining on the %d left",
                 len(rebuild["forgotten"]), dropped, len(ids))
    prev = store.latest_version()
    n = max([int(prev.name[1:]) if prev else 0] + [r.number for r in records(store)]) + 1
    rec = SleepRecord.new(store, n, {"parent": prev.name if prev else None, "trigger": trigger,
                                     "episodes": ids, "phases": plan(cfg, n, only),
                                     **({"rebuild": rebuild} if rebuild else {})})
    log.info("sleep %s (%s%s): %d episodes, steps %s", rec.sleep_id, trigger, ", rebuild" if rebuild else "",
             len(ids), rec.phases)
    return rec


def run_sleep(cfg, storage: PathLike | None = None, backend=None, trigger: str = "request",
              only: Optional[list[str]] = None, progress: bool = True,
              on_phase: OnStep = None) -> Optional[SleepRecord]:
    """Run (or resume) one sleep to the end; returns its record, or None if nothing to do."""
    store = Storage(storage or cfg.cycle.storage)
    backend = backend or LocalBackend(progress=progress)
    rec = open_sleep(cfg, store, trigger, only)
    if rec is None:
        return None
    step(store, rec, "nrem", on_phase, lambda: nrem(cfg, store, rec, backend))
    if "rem" in rec.phases:
        step(store, rec, "rem", on_phase, lambda: rem(cfg, store, rec, backend))
    step(store, rec, "publish", on_phase, lambda: publish_and_tell(cfg, store, rec, backend))
    if "deep" in rec.phases:
        step(store, rec, "deep", on_phase, lambda: deep_sleep(cfg, store, rec))
    return rec


def step(store: Storage, rec: SleepRecord, name: str, on_phase: OnStep, run: Callable[[], dict]) -> None:
    """Run step ``name`` unless the record says it is done; record its metrics and time (in the
    record, then as TensorBoard scalars at the sleep's number: ``sleepray.tb``)."""
    if rec.is_done(name):
        return
    if on_phase:
        on_phase(rec, name)
    t0 = time.time()
    log.info("sleep %s: %s", rec.sleep_id, name)
    metrics = run()
    rec.finish(name, {**metrics, "seconds": round(time.time() - t0, 2)})
    tb.sleep_step(store, rec.number, name, rec.metrics(name))
    log.info("sleep %s: %s done in %.1fs", rec.sleep_id, name, time.time() - t0)


def nrem(cfg, store: Storage, rec: SleepRecord, backend) -> dict:
    if not live_episodes(store, rec):
        return {"skipped": "every episode of this sleep was deleted"}
    return backend.nrem(cfg, store, rec)


def rem(cfg, store: Storage, rec: SleepRecord, backend) -> dict:
    if "skipped" in rec.metrics("nrem") or not live_episodes(store, rec):
        return {"skipped": "no live episodes"}
    return backend.rem(cfg, store, rec)


def publish_and_tell(cfg, store: Storage, rec: SleepRecord, backend) -> dict:
    if "skipped" in rec.metrics("nrem"):
        if rec.rebuild:   # every memory was forgotten: serve the base model again
            return forget.publish_empty(cfg, store, rec)
        return {"skipped": "nothing was trained"}
    metrics = publish(cfg, store, rec)
    seconds = backend.published(store.version_dir(rec.version))
    return metrics if seconds is None else {**metrics, "engines_load_seconds": round(seconds, 3)}


def sleep_full(cfg, storage: PathLike | None = None, progress: bool = True, trigger: str = "request",
               backend=None) -> Optional[Path]:
    """One whole sleep (NREM, REM if enabled, publish, deep every K); the new version folder."""
    return _version_of(run_sleep(cfg, storage, backend=backend, trigger=trigger, progress=progress),
                       Storage(storage or cfg.cycle.storage))


def sleep_nrem(cfg, storage: PathLike | None = None, progress: bool = True) -> Optional[Path]:
    """One NREM-only sleep (``sleepray sleep --phase nrem``); the new version folder."""
    return _version_of(run_sleep(cfg, storage, only=["nrem"], progress=progress),
                       Storage(storage or cfg.cycle.storage))


def _version_of(rec: Optional[SleepRecord], store: Storage) -> Optional[Path]:
    v = store.version_dir(rec.version) if rec is not None else None
    return v if v is not None and v.is_dir() else None
