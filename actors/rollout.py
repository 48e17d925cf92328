"""RolloutWorker: one generation engine (vLLM by default, transformers where vLLM can't run).

Generates teacher and student samples and scores tokens for the learner. Adapters are
LoRA versions addressed by name AND folder, so a worker loads what a request needs by
itself: a worker that Ray restarted after a crash (``max_restarts``; its pending calls
are retried, ``max_task_retries=-1``) needs no state from anyone. ``publish`` loads a new
version ahead of use; the engine is never restarted for an adapter, only for a new base
(after a deep sleep).
"""
from __future__ import annotations

import logging
import os
import time
from typing import Optional

import ray

from sleepray.config import EngineConfig, ExpertConfig
from sleepray.engines.factory import make_engine

log = logging.getLogger(__name__)


class RolloutWorker:
    def __init__(self, model_path: str, engine: dict, experts: dict, kind: str = "auto", seed: int = 0,
                 dtype: str = "auto"):
        self.engine_cfg, self.kind, self.seed, self.dtype = EngineConfig(**engine), kind, seed, dtype
        ecfg = ExpertConfig(**experts)
        self.max_rank = ecfg.rank * ecfg.max_slots          # the combined (cat) adapter's rank
        self.targets = list(ecfg.target_modules)
        self.paths: dict[str, str] = {}
        self.engine = None
        self._start(model_path)

    def _start(self, model_path: str) -> None:
        t0 = time.time()
        if self.engine is not None:
            self.engine.close()
        self.model_path = model_path
        self.engine = make_engine(self.kind, model_path, self.engine_cfg, max_lora_rank=self.max_rank,
                                  seed=self.seed, dtype=self.dtype, lora_target_modules=self.targets)
        self.paths = {}
        log.info("rollout engine %s on %s ready in %.1fs (pid %d)", type(self.engine).__name__,
                 model_path, time.time() - t0, os.getpid())

    # ----------------------------------------------------------------- adapters
    def ensure_base(self, model_path: str) -> bool:
        """Restart the engine on a new base model (after a deep sleep); True if it did."""
        if model_path == self.model_path:
            return False
        self._start(model_path)
        return True

    def load(self, adapters: dict) -> list[str]:
        """Make sure every ``{name: folder}`` is loaded; old versions beyond the cache go."""
        new = []
        for name, path in adapters.items():
            if name and self.paths.get(name) != path:
                if name in self.paths:
                    self.engine.unload_adapter(name)
                self.engine.load_adapter(name, path)
                self.paths[name] = path
                new.append(name)
        keep = set(adapters)
        for old in [n for n in self.paths if n not in keep][: max(0, len(self.paths) - self.engine_cfg.max_loras)]:
            self.engine.unload_adapter(old)
            del self.paths[old]
        return new

    def publish(self, name: str, path: str) -> float:
        t0 = time.time()
        self.load({name: path})
        return time.time() - t0

    # --------------------------------------------------------------- generation
    def generate(self, requests: list, adapters: Optional[dict] = None) -> list:
        self.load(adapters or {})
        return self.engine.generate(requests)

    def score(self, requests: list, adapters: Optional[dict] = None) -> list:
        self.load(adapters or {})
        return self.engine.score(requests)

    def info(self) -> dict:
        return {"pid": os.getpid(), "engine": type(self.engine).__name__, "model": self.model_path,
                "adapters": dict(self.paths), "node": ray.get_runtime_context().get_node_id()}


class RolloutPool:
    """The RolloutWorkers of a sleep: requests are sharded over them, in order."""

    def __init__(self, cfg, model_path: str, n: Optional[int] = None):
        cls = ray.remote(RolloutWorker).options(
            num_cpus=1, num_gpus=1 if cfg.ray.use_gpu else 0, max_restarts=cfg.ray.actor_max_restarts,
            max_task_retries=-1, resources=dict(cfg.ray.rollout_resources) or None)
        self.workers = [cls.remote(model_path, cfg.engine.model_dump(), cfg.experts.model_dump(),
                                   cfg.ray.rollout_engine, cfg.seed.seed + i, cfg.model.dtype)
                        for i in range(n or cfg.ray.num_rollout_workers)]
        ray.get([w.info.remote() for w in self.workers])     # engines are up

    def _shard(self, method: str, requests: list, adapters: Optional[dict]) -> list:
        n = len(self.workers)
        parts = [requests[i::n] for i in range(n)]
        refs = [getattr(w, method).remote(p, adapters) for w, p in zip(self.workers, parts) if p]
        outs = ray.get(refs)
        res: list = [None] * len(requests)
        for i, out in enumerate(outs):
            res[i::n] = out
        return res

    def generate(self, requests: list, adapters: Optional[dict] = None) -> list:
        return self._shard("generate", requests, adapters)

    def score(self, requests: list, adapters: Optional[dict] = None) -> list:
        return self._shard("score", requests, adapters)

    def publish(self, name: str, path: str) -> float:
        """Load a new adapter version on every worker; returns the wall time to the last one."""
        t0 = time.time()
        ray.get([w.publish.remote(name, path) for w in self.workers])
        return time.time() - t0

    def ensure_base(self, model_path: str) -> None:
        ray.get([w.ensure_base.remote(model_path) for w in self.workers])

    def info(self) -> list[dict]:
        return ray.get([w.info.remote() for w in self.workers])

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
        self.workers = []
