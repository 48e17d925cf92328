"""What the awake service keeps per tenant, and the in-process memory and sleep backends.

A :class:`Tenant` is one storage folder (``sleepray.tenants.tenant_storage``) with its
memory backend, its sleep control and its :class:`~sleepray.adapter_pointer.AdapterPointer`
over the shared engine. The service asks a *backends* callable for the first two:
``backends(tenant, storage) -> (memory, control)``: :class:`LocalBackends` here (the
MemoryStore and a SleepController in this process), ``actors.serve.RayBackends`` on Ray
(the tenant's MemoryStore actor and its sleeper actor, or the Coordinator).

Both interfaces are small and async: memory ``append / delete / episodes / status_of``,
control ``status / request_sleep``.
"""
from __future__ import annotations

import asyncio
from typing import Callable, Optional

from sleepray.adapter_pointer import AdapterPointer
from sleepray.memory import MemoryStore
from sleepray.storage import Storage
from sleepray.tenants import DEFAULT


class Tenant:
    def __init__(self, name: str, storage: Storage, engine, memory, control):
        self.name, self.storage = name, storage
        self.memory, self.control = memory, control
        self.pointer = AdapterPointer(engine, storage.root, "" if name == DEFAULT else f"{name}:")
        self.ntok: dict[str, int] = {}        # episode id -> tokens of its context line

    def __repr__(self) -> str:
        return f"Tenant({self.name!r}, {str(self.storage.root)!r}, {self.pointer.version})"


class LocalMemory:
    """The memory backend on a ``MemoryStore`` in this process."""

    def __init__(self, store: MemoryStore):
        self.store = store

    async def append(self, records: list[dict]) -> dict:
        r = await asyncio.to_thread(self.store.append, records)
        return {"segment": r.segment, "episode_ids": r.episode_ids, "sha256": r.sha256}

    async def delete(self, ids: list[str], reason: str = "") -> list[str]:
        return await asyncio.to_thread(self.store.delete, ids, reason)

    async def episodes(self, status: str = "short_term") -> list[dict]:
        return await asyncio.to_thread(self.store.episodes, status)

    async def status_of(self, episode_id: str):
        return await asyncio.to_thread(self.store.status_of, episode_id)


class LocalControl:
    """The sleep control on a :class:`~sleepray.sleep_control.SleepController` in this process."""

    def __init__(self, sleeper):
        self.sleeper = sleeper

    async def status(self) -> dict:
        return await asyncio.to_thread(self.sleeper.status)

    async def request_sleep(self, reason: str) -> dict:
        return await asyncio.to_thread(self.sleeper.request_sleep, reason)


def _whole_sleep(cfg, storage, trigger: str) -> Optional[dict]:
    from sleepray.sleep import run_sleep
    rec = run_sleep(cfg, storage, trigger=trigger, progress=False)
    return rec.data if rec is not None else None


class LocalBackends:
    """Per tenant, its MemoryStore and a SleepController in this process; ``sleep(cfg, storage,
    trigger) -> record data or None`` runs one sleep (default: a whole ``run_sleep``)."""

    def __init__(self, cfg, sleep: Optional[Callable] = None, watch: Optional[bool] = None):
        self.cfg, self.sleep = cfg, sleep or _whole_sleep
        self.watch = cfg.serve.auto_sleep if watch is None else bool(watch)
        self.controllers: dict[str, object] = {}

    def __call__(self, tenant: str, storage: Storage):
        from sleepray.sleep_control import SleepController
        root = storage.root
        ctl = SleepController(self.cfg, root, lambda trigger: self.sleep(self.cfg, root, trigger),
                              name=f"serve:{tenant}", watch=self.watch)
        self.controllers[tenant] = ctl
        return LocalMemory(MemoryStore(storage.memory)), LocalControl(ctl)
