"""The record of one sleep: ``sleeps/sNNNN/record.json``, written atomically before the
first step and after each step finishes.

    {"sleep_id": "s0003", "version": "v0003", "parent": "v0002", "trigger": "pressure",
     "episodes": [...], "phases": ["nrem", "rem", "publish"], "done": {"nrem": {...metrics}}}

``phases`` are the steps this sleep has (``sleepray.sleep.plan``); the order they run in
is written once, in ``sleepray.sleep.run_sleep``.
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Optional

from sleepray.memory import MemoryStore
from sleepray.storage import Storage, write_json

RECORD = "record.json"
STEPS = ("nrem", "rem", "publish", "deep")


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
    def rebuild(self) -> bool:
        """A rebuild (``sleepray.forget``): fresh experts on the configured base, every live memory."""
        return bool(self.data.get("rebuild"))

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
        write_json(self.path, self.data)

    @classmethod
    def read(cls, path: Path) -> "SleepRecord":
        return cls(path, json.loads(Path(path).read_text()))

    @classmethod
    def new(cls, store: Storage, number: int, data: dict) -> "SleepRecord":
        sid = f"s{number:04d}"
        rec = cls(store.sleep_dir(sid) / RECORD, {"sleep_id": sid, "version": f"v{number:04d}", **data,
                                                  "done": {}, "created_at": time.time()})
        rec.save()
        return rec


def summary(data: dict) -> dict:
    """What a sleep controller reports about a finished sleep, from its record's data."""
    return {"sleep_id": data["sleep_id"], "version": data["version"], "parent": data.get("parent"),
            "trigger": data.get("trigger"), "episodes": len(data["episodes"]),
            "metrics": {p: dict(data["done"].get(p, {})) for p in data["phases"]}}


def records(store: Storage) -> list[SleepRecord]:
    d = store.sleeps
    if not d.is_dir():
        return []
    return [SleepRecord.read(p / RECORD) for p in sorted(d.iterdir()) if (p / RECORD).is_file()]


def unfinished(store: Storage) -> Optional[SleepRecord]:
    return next((r for r in records(store) if not r.complete), None)


def live_episodes(store: Storage, rec: SleepRecord) -> list:
    """The sleep's episodes that are still short-term (a deleted one is never consolidated); a
    rebuild's (``sleepray.forget``): its episodes that are not deleted."""
    want = set(rec.episodes)
    status = "all" if rec.rebuild else "short_term"
    return [e for e in MemoryStore(store.memory).export_episodes(status) if e.episode_id in want]


def phase_seed(cfg, rec: SleepRecord, phase: str) -> int:
    return cfg.seed.seed + 1000 * rec.number + STEPS.index(phase)


def rng_for(cfg, rec: SleepRecord, phase: str) -> random.Random:
    return random.Random(phase_seed(cfg, rec, phase))
