"""Forgetting a consolidated memory: the next sleep rebuilds the experts without it.

A LoRA expert trained on a memory cannot have that one memory subtracted out of it, and
a deep sleep has merged older experts into the base weights. The smallest scheme that
is correct is to retrain: when a consolidated memory is deleted (``MemoryStore.forgotten``
lists it until a rebuild covers it), the next sleep is a **rebuild**:

* its episodes are every live memory, consolidated and short-term (the deleted ones are
  excluded, as deletions always are);
* it starts from the configured base model (``cfg.model``, not a deep-sleep merge, which
  may hold the memory) with a fresh expert bank, and a fresh dream writer;
* dreams and probes about forgotten memories are removed from the replay buffer first;
* its version's lineage lists the episodes it was trained on, ``"rebuild": true`` and
  ``"forgotten"``; the memories it re-trains are marked consolidated by it.

Later sleeps build on the rebuild's version and ignore bases merged before it. When no
memory is left at all, the rebuild publishes an empty version (lineage only, no adapter):
the endpoint serves the base model for it.

Until that version is published and the endpoint switched to it, the forgotten memory is
still in the served weights; its text stays in its append-only memory segment on disk,
excluded from every read (``sleepray.memory``).
"""
from __future__ import annotations

import logging
import time
from typing import Optional

from sleepray.memory import MemoryStore
from sleepray.replay import ReplayBuffer
from sleepray.storage import LINEAGE, Storage, read_lineage, write_json

log = logging.getLogger(__name__)


def pending(store: Storage, memory: Optional[MemoryStore] = None) -> list[str]:
    """Forgotten memories the latest version may still hold (a rebuild is due when non-empty)."""
    forgotten = (memory or MemoryStore(store.memory)).forgotten()
    if not forgotten:
        return []
    latest = store.latest_version()
    covered = set(read_lineage(latest).get("forgotten") or []) if latest is not None else set()
    return [e for e in forgotten if e not in covered]


def purge_replay(store: Storage, episode_ids: list[str]) -> int:
    """Drop the replay buffer's dreams and probes about these episodes; the rows removed."""
    if not store.replay.is_file():
        return 0
    return ReplayBuffer(store.replay).drop_episodes(episode_ids)


def publish_empty(cfg, store: Storage, rec) -> dict:
    """A rebuild with nothing left to train: a version with a lineage and no adapter (= the base)."""
    final = store.version_dir(rec.version)
    if not (final / LINEAGE).is_file():
        write_json(final / LINEAGE, {
            "version": rec.version, "sleep_id": rec.sleep_id, "phase": "empty", "parent": rec.data["parent"],
            "base_model": None, "expert": None, "experts_on": [], "episodes": [], "trigger": rec.data["trigger"],
            "rebuild": True, "forgotten": rec.data["rebuild"]["forgotten"], "config": cfg.model_dump(mode="json"),
            "metrics": {}, "created_at": time.time()})
    log.info("rebuild %s: no memory left; %s serves the base model", rec.sleep_id, rec.version)
    return {"version": rec.version, "marked": 0, "empty": True}
