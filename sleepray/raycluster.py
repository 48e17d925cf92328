"""Connecting to Ray the documented way, token authentication included.

``connect(cfg.ray)`` joins ``cfg.ray.address`` or ``RAY_ADDRESS`` when one is set, and
otherwise starts an embedded local cluster (``ray.init()``), which in Ray 2.60 makes an
auth token itself (``~/.ray/auth_token``). A head started with ``RAY_AUTH_MODE=token``
needs the same token on the client: ``ensure_token()`` generates one with
``ray get-auth-token --generate`` when none exists. Authentication is never turned off.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def token_path() -> Path:
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))


def ensure_token() -> None:
    """Make sure a Ray auth token exists (env var, token file, or a freshly generated file)."""
    if os.environ.get("RAY_AUTH_TOKEN") or token_path().is_file():
        return
    ray_bin = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    subprocess.run([ray_bin, "get-auth-token", "--generate"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log.info("generated a Ray auth token at %s", token_path())


def train_env(rcfg) -> dict[str, str]:
    """Environment of the learner's Ray Train runs (set where ``TorchTrainer.fit`` is called; Ray Train
    passes it to its controller): its poll interval. Every NREM step reports, and in Ray 2.60 a
    worker's report waits until the controller has polled the previous one."""
    return {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": f"{rcfg.train_poll_seconds:g}"}


def connect(rcfg, log_to_driver: bool = True, own_logging: bool = False) -> dict:
    """``ray.init`` per the config; returns ``ray.cluster_resources()``. Idempotent.

    ``log_to_driver=False``: the output of Ray's workers and actors stays in the session's log
    folder instead of this console. ``own_logging``: Ray leaves the driver's ``ray`` logger to
    the root logger's handlers (``sleepray.console.setup_logging``)."""
    import ray
    if ray.is_initialized():
        return ray.cluster_resources()
    address = rcfg.address or os.environ.get("RAY_ADDRESS")
    kwargs = dict(namespace=rcfg.namespace, log_to_driver=log_to_driver)
    if own_logging:
        kwargs["configure_logging"] = False
    if address:
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        ensure_token()
        ray.init(address=address, **kwargs)
    else:
        # logical CPUs: at least 4, so that a rollout worker, a learner worker and an
        # evaluation task fit side by side on a small machine (they take turns on the cores)
        ray.init(num_cpus=rcfg.num_cpus or max(4, os.cpu_count() or 1), include_dashboard=True,
                 dashboard_host="127.0.0.1", **kwargs)
    res = ray.cluster_resources()
    log.info("Ray: %s, resources %s", address or "embedded local cluster",
             {k: v for k, v in res.items() if not k.startswith("node:")})
    return res
