"""The sleep state machine: NREM -> REM -> publish (-> deep sleep every K sleeps).

One sleep is a folder ``storage/sleeps/sNNNN/`` with a phase record ``record.json``,
written (atomically, fsynced) before the first phase and after each phase finishes:

    {"sleep_id": "s0003", "version": "v0003", "parent": "v0002", "trigger": "pressure",
     "episodes": [...], "phases": ["nrem", "rem", "publish"], "done": {"nrem": {...metrics}}}

Each phase writes its outputs under the sleep folder first (``nrem/bank``, ``rem/bank``,
``rem/dreams.parquet``), then marks itself done. A process that dies anywhere resumes at
the first unfinished phase of the unfinished sleep: nothing finished is redone, and the
episodes are marked consolidated only once their adapter version has landed (publish is
idempotent). Deleted memories are dropped before every phase that reads them.

Where a phase runs is the backend's business: ``LocalBackend`` runs it in this process;
``actors.coordinator`` passes one that uses RolloutWorkers and a Ray Train learner.
"""
from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Callable, Optional

from sleepray.experts import _atomic_write_json
from sleepray.memory import MemoryStore

log = logging.getLogger(__name__)

SLEEPS_DIR = "sleeps"
RECORD = "record.json"


class SleepRecord:
    def __init__(self, path: Path, data: dict):
        self.path, self.data = Path(path), data

    @property
    def dir(self) -> Path:
        return self.path.parent

    @property
    def sleep_id(self) -> str:
        return self.data["sleep_id"]

    @property
    def version(self) -> str:
        return self.data["version"]

    @property
    def number(self) -> int:
        return int(self.version[1:])

    @property
    def episodes(self) -> list[str]:
        return list(self.data["episodes"])

    @property
    def phases(self) -> list[str]:
        return list(self.data["phases"])

    def is_done(self, phase: str) -> bool:
        return phase in self.data["done"]

    @property
    def complete(self) -> bool:
        return all(self.is_done(p) for p in self.phases)

    @property
    def next_phase(self) -> Optional[str]:
        return next((p for p in self.phases if not self.is_done(p)), None)

    def metrics(self, phase: str) -> dict:
        return dict(self.data["done"].get(phase, {}))

    def finish(self, phase: str, metrics: dict) -> None:
        self.data["done"][phase] = {**metrics, "finished_at": time.time()}
        self.save()

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        _atomic_write_json(self.path, self.data)

    @classmethod
    def read(cls, path: Path) -> "SleepRecord":
        return cls(path, json.loads(Path(path).read_text()))


def records(storage: str | Path) -> list[SleepRecord]:
    d = Path(storage) / SLEEPS_DIR
    if not d.is_dir():
        return []
    return [SleepRecord.read(p / RECORD) for p in sorted(d.iterdir()) if (p / RECORD).is_file()]


def unfinished(storage: str | Path) -> Optional[SleepRecord]:
    return next((r for r in records(storage) if not r.complete), None)


def phases_for(cfg, number: int, only: Optional[list[str]] = None) -> list[str]:
    phases = ["nrem"]
    if cfg.rem.enabled and (only is None or "rem" in only):
        phases.append("rem")
    phases.append("publish")
    if number % cfg.experts.deep_sleep_every == 0 and (only is None or "deep" in only):
        phases.append("deep")
    return phases


def open_sleep(cfg, storage: str | Path, trigger: str = "request",
               only: Optional[list[str]] = None) -> Optional[SleepRecord]:
    """The unfinished sleep to resume, else a new one over the short-term memory (or None)."""
    from sleepray.sleep import latest_version
    storage = Path(storage)
    rec = unfinished(storage)
    if rec is not None:
        log.info("resuming sleep %s at phase %s", rec.sleep_id, rec.next_phase)
        return rec
    store = MemoryStore(storage / "memory")
    ids = [r["episode_id"] for r in store.episodes("short_term")]
    if not ids:
        log.info("short-term memory is empty: nothing to consolidate")
        return None
    prev = latest_version(storage)
    n = max([int(prev.name[1:]) if prev else 0] + [r.number for r in records(storage)]) + 1
    rec = SleepRecord(storage / SLEEPS_DIR / f"s{n:04d}" / RECORD, {
        "sleep_id": f"s{n:04d}", "version": f"v{n:04d}", "parent": prev.name if prev else None,
        "trigger": trigger, "episodes": ids, "phases": phases_for(cfg, n, only), "done": {},
        "created_at": time.time()})
    rec.save()
    log.info("sleep %s (%s): %d episodes, phases %s", rec.sleep_id, trigger, len(ids), rec.phases)
    return rec


def live_episodes(storage: Path, rec: SleepRecord) -> list:
    """The sleep's episodes that are still short-term (a deleted one is never consolidated)."""
    want = set(rec.episodes)
    return [e for e in MemoryStore(storage / "memory").export_episodes("short_term")
            if e.episode_id in want]


def phase_seed(cfg, rec: SleepRecord, phase: str) -> int:
    return cfg.seed.seed + 1000 * rec.number + ["nrem", "rem", "publish", "deep"].index(phase)


def run_sleep(cfg, storage: str | Path | None = None, backend=None, trigger: str = "request",
              only: Optional[list[str]] = None, progress: bool = True,
              on_phase: Optional[Callable[[SleepRecord, str], None]] = None) -> Optional[SleepRecord]:
    """Run (or resume) one sleep to the end; returns its record, or None if nothing to do."""
    from sleepray.sleep_phases import LocalBackend, PHASES
    storage = Path(storage or cfg.cycle.storage)
    backend = backend or LocalBackend(progress=progress)
    rec = open_sleep(cfg, storage, trigger, only)
    if rec is None:
        return None
    for phase in rec.phases:
        if rec.is_done(phase):
            continue
        if on_phase:
            on_phase(rec, phase)
        t0 = time.time()
        log.info("sleep %s: phase %s", rec.sleep_id, phase)
        metrics = PHASES[phase](cfg, storage, rec, backend)
        rec.finish(phase, {**metrics, "seconds": round(time.time() - t0, 2)})
        log.info("sleep %s: phase %s done in %.1fs", rec.sleep_id, phase, time.time() - t0)
    return rec


def rng_for(cfg, rec: SleepRecord, phase: str) -> random.Random:
    return random.Random(phase_seed(cfg, rec, phase))
