"""MemoryStore actor: the one writer of a storage folder's episode memory.

Thin: every method is ``sleepray.memory.MemoryStore``'s. An append returns only once the
segment is flushed and fsynced (the library's contract), so a reply from ``append`` is
an acknowledgement that survives a crash of this actor, of the node, or of the caller.
"""
from __future__ import annotations

from pathlib import Path

import ray

from sleepray.memory import MemoryStore
from sleepray.storage import Storage

NAME = "memory-store"


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)
class MemoryStoreActor:
    def __init__(self, storage: str):
        self.store = MemoryStore(Storage(storage).memory)
        self.store.verify()   # quarantines corrupt segments, keeps the rest

    def append(self, records: list) -> dict:
        r = self.store.append(records)
        return {"segment": r.segment, "episode_ids": r.episode_ids, "sha256": r.sha256}

    def mark_consolidated(self, episode_ids: list[str], sleep_id: str, adapter_version: str) -> list[str]:
        return self.store.mark_consolidated(episode_ids, sleep_id, adapter_version=adapter_version)

    def delete(self, episode_ids: list[str], reason: str = "") -> list[str]:
        return self.store.delete(episode_ids, reason)

    def episodes(self, status: str = "short_term") -> list[dict]:
        return self.store.episodes(status)          # documents only: the store holds no evaluation data

    def status_of(self, episode_id: str):
        return self.store.status_of(episode_id)

    def pressure(self) -> dict:
        return self.store.pressure()


def get_or_create(storage: str, namespace: str | None = None):
    """The named MemoryStore actor of ``storage`` (created on first use, shared after)."""
    name = f"{NAME}:{Path(storage).resolve()}"
    return MemoryStoreActor.options(name=name, namespace=namespace, get_if_exists=True,
                                    lifetime="detached").remote(str(Path(storage).resolve()))
