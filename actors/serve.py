"""AwakeModel: the Ray Serve deployment of the awake endpoint (DESIGN.md section 2).

Each replica builds one engine (``make_engine``: vLLM where it imports, else
transformers) and an ``AwakeService`` (``sleepray/awake.py``; routes in
``sleepray/serve_app.py``). The replica talks to the storage only through actors:

* memory: per tenant, the named MemoryStore actor of the tenant's storage folder
  (``actors/memory_store.py``), which acknowledges an append once it is fsynced;
* sleep control: for the tenant "default", the named ``coordinator`` actor of
  ``ray.namespace`` when one runs (``request_sleep.remote(reason)`` / ``status.remote()``);
  otherwise the tenant's serve sleeper (``actors/sleeper.py``), one per storage folder,
  whose sleep is a Ray task: a tenant's sleep never blocks serving;
* adapters: each replica polls every tenant's ``adapters/`` every ``serve.poll_seconds``
  and swaps versions itself (the folder must be visible to the replica's node), so with
  several replicas each switches on its own, and every response names its version.

``awake_app(cfg)`` builds the application; ``run_serve(cfg)`` starts Serve's HTTP proxy
on ``serve.host:serve.port`` and deploys it under the name ``sleepray`` at ``/``.
"""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import ray
from ray import serve

log = logging.getLogger("sleepray.serve")

APP_NAME = "sleepray"
COORDINATOR = "coordinator"


class ActorMemory:
    """The awake service's memory backend on the MemoryStore actor."""

    def __init__(self, handle):
        self.h = handle

    async def append(self, records: list[dict]) -> dict:
        return await self.h.append.remote(records)

    async def delete(self, ids: list[str], reason: str = "") -> list[str]:
        return await self.h.delete.remote(ids, reason)

    async def episodes(self, status: str = "short_term") -> list[dict]:
        return await self.h.episodes.remote(status)

    async def status_of(self, episode_id: str):
        return await self.h.status_of.remote(episode_id)


class RayControl:
    """Sleep control: the Coordinator when it runs (the tenant "default" only), the serve sleeper
    of the tenant's storage otherwise."""

    def __init__(self, cfg, storage: str, coordinator: bool = True):
        self.namespace, self.storage = cfg.ray.namespace, storage
        self.cfg_json = cfg.model_dump(mode="json")
        self.use_coordinator = coordinator

    def _coordinator(self):
        if not self.use_coordinator:
            return None
        try:
            return ray.get_actor(COORDINATOR, namespace=self.namespace)
        except ValueError:
            return None

    def _sleeper(self):
        from actors.sleeper import get_or_create
        return get_or_create(self.storage, self.namespace, self.cfg_json)

    async def status(self) -> dict:
        coord = await asyncio.to_thread(self._coordinator)
        if coord is not None:
            return await coord.status.remote()
        sleeper = await asyncio.to_thread(self._sleeper)
        return await sleeper.status.remote()

    async def request_sleep(self, reason: str) -> dict:
        coord = await asyncio.to_thread(self._coordinator)
        if coord is not None:
            log.info("asking the coordinator for a sleep (%s)", reason)
            return await coord.request_sleep.remote(reason)
        sleeper = await asyncio.to_thread(self._sleeper)
        return await sleeper.request_sleep.remote(reason, self.cfg_json)


class RayBackends:
    """Per tenant: its MemoryStore actor and its sleep control (``sleepray.awake_backends``)."""

    def __init__(self, cfg):
        self.cfg = cfg

    def __call__(self, tenant: str, storage):
        from actors.memory_store import get_or_create
        from sleepray.tenants import DEFAULT
        root = str(storage.root)
        return (ActorMemory(get_or_create(root, self.cfg.ray.namespace)),
                RayControl(self.cfg, root, coordinator=tenant == DEFAULT))


@serve.deployment(name="AwakeModel")
@serve.ingress()
class AwakeModel:
    def __init__(self, cfg_json: dict):
        logging.basicConfig(level=logging.INFO)
        from sleepray.awake import AwakeService
        from sleepray.config import from_dict
        from sleepray.engines import make_engine

        cfg = from_dict(cfg_json)
        storage = cfg.cycle.storage
        engine = make_engine(cfg.engine.kind, cfg.model.path, cfg.engine,
                             max_lora_rank=cfg.experts.rank * cfg.experts.max_slots,
                             dtype=cfg.model.dtype, seed=cfg.seed.seed,
                             lora_target_modules=list(cfg.experts.target_modules))
        self.service = AwakeService(cfg, engine, RayBackends(cfg), storage)
        self.service.replica = serve.get_replica_context().replica_id.unique_id
        self.service.start()

    def check_health(self):
        self.service.check_health()

    def __serve_build_asgi_app__(self):
        from sleepray.serve_app import build_app
        return build_app(self.service)

    def __del__(self):
        service = getattr(self, "service", None)
        if service is not None:
            service.close()


def awake_app(cfg):
    """The Serve application of ``cfg`` (storage made absolute for the replicas)."""
    from sleepray.tenants import KeyRing, check_bind
    check_bind(cfg.serve)
    KeyRing.from_config(cfg.serve)     # a bad tenants file fails here, not in every replica
    cfg = cfg.model_copy(deep=True)
    cfg.cycle.storage = str(Path(cfg.cycle.storage).expanduser().resolve())
    if cfg.serve.tenants_file:
        cfg.serve.tenants_file = str(Path(cfg.serve.tenants_file).expanduser().resolve())
    Path(cfg.cycle.storage).mkdir(parents=True, exist_ok=True)
    return AwakeModel.options(
        num_replicas=cfg.serve.num_replicas, max_ongoing_requests=cfg.serve.max_ongoing_requests,
        ray_actor_options={"num_cpus": cfg.serve.num_cpus}).bind(cfg.model_dump(mode="json"))


def run_serve(cfg, blocking: bool = False, name: str = APP_NAME):
    """Start Serve's HTTP proxy on ``serve.host:serve.port`` and deploy the app at ``/``."""
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    handle = serve.run(awake_app(cfg), name=name, route_prefix="/", blocking=False)
    log.info("awake endpoint up: http://%s:%d/v1 (model %r)", cfg.serve.host, cfg.serve.port,
             cfg.serve.model_name)
    if blocking:
        import time
        try:
            while True:
                time.sleep(10)
        except KeyboardInterrupt:
            log.info("stopping the awake endpoint")
            serve.delete(name)
    return handle
