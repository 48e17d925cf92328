"""The sleep controller the awake endpoint uses when no Coordinator actor is running.

A named, detached actor per storage folder (so that every Serve replica sees one phase)
hosting ``sleepray.sleep_control.SleepController``; the sleep itself runs as a Ray task
(a whole sleep over the storage folder, one CPU), so a failed sleep never takes the
status down with it.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import ray

from sleepray.config import from_dict
from sleepray.sleep import run_sleep
from sleepray.sleep_control import SleepController

NAME = "serve-sleeper"


@ray.remote(num_cpus=1, max_retries=0)
def sleep_task(cfg_json: dict, storage: str, trigger: str) -> Optional[dict]:
    logging.basicConfig(level=logging.INFO)
    rec = run_sleep(from_dict(cfg_json), storage, trigger=trigger, progress=False)  # NREM, REM, publish
    return rec.data if rec is not None else None


@ray.remote(num_cpus=0, max_restarts=-1, max_concurrency=8)
class SleeperActor:
    def __init__(self, storage: str, cfg_json: dict):
        logging.basicConfig(level=logging.INFO)
        self.storage, self.cfg_json = storage, cfg_json
        cfg = from_dict(cfg_json)
        self.control = SleepController(cfg, storage, self._run, name="serve", watch=cfg.serve.auto_sleep)

    def _run(self, trigger: str) -> Optional[dict]:
        return ray.get(sleep_task.remote(self.cfg_json, self.storage, trigger))

    def status(self) -> dict:
        return self.control.status()

    def request_sleep(self, reason: str = "requested", cfg_json: Optional[dict] = None) -> dict:
        if cfg_json is not None:   # the config of the latest replica that asked
            self.cfg_json = cfg_json
            self.control.cfg = from_dict(cfg_json)
        return self.control.request_sleep(reason)


def get_or_create(storage: str, namespace: str | None, cfg_json: dict):
    """The sleeper of ``storage`` (created on first use, shared by every replica after)."""
    storage = str(Path(storage).resolve())
    return SleeperActor.options(name=f"{NAME}:{storage}", namespace=namespace, get_if_exists=True,
                                lifetime="detached").remote(storage, cfg_json)
