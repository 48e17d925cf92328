"""The adapter version a tenant's requests get, switched to new versions without a pause.

:class:`AdapterPointer` polls ``Storage.latest_version`` of one tenant's storage; a new
version is loaded into the shared engine under its own name (``PREFIX + "v0002"``; the
prefix is ``""`` for the tenant "default", ``"alice:"`` for alice) while requests keep
running, then the pointer switches. A request takes the pointer once, at its start, and
holds a reference until it is answered, so in-flight requests finish on the version they
started with; a retired version is unloaded once nothing uses it. Responses name the
version label (``v0002``, ``"base"`` before the first sleep).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

from sleepray.engines.base import GenRequest
from sleepray.storage import Storage, read_lineage

log = logging.getLogger(__name__)

BASE = "base"
WARMUP_PROMPT = "Q: ?\nA:"


def warm_up(engine, adapter: Optional[str] = None) -> None:
    """One 1-token generation, so that the first real request does not pay the engine's
    (or a fresh adapter's) first-use cost."""
    engine.generate([GenRequest(WARMUP_PROMPT, 1, adapter=adapter)])


def _empty(version: Path) -> bool:
    """A version without an adapter: an empty rebuild (``sleepray.forget``), served as the base."""
    return not (version / "adapter_config.json").is_file() and read_lineage(version).get("phase") == "empty"


class AdapterPointer:
    """The adapter version new requests get; swaps to new versions without a pause."""

    def __init__(self, engine, storage: str | Path, prefix: str = ""):
        self.engine = engine
        self.storage = Path(storage)
        self.prefix = prefix                       # engine adapter name = prefix + version
        self._lock = threading.Lock()
        self._current: Optional[str] = None        # engine adapter name of the current version
        self._refs: Counter = Counter()
        self._retired: list[str] = []
        self._failed: set[str] = set()
        self.swaps: list[dict] = []

    @property
    def version(self) -> str:
        return self.label(self._current)

    def label(self, name: Optional[str]) -> str:
        return name[len(self.prefix):] if name else BASE

    @contextmanager
    def use(self):
        """``(version label, engine adapter name or None)`` held for one request."""
        with self._lock:
            cur = self._current
            if cur:
                self._refs[cur] += 1
        try:
            yield (self.label(cur), cur)
        finally:
            if cur:
                with self._lock:
                    self._refs[cur] -= 1

    def poll_once(self) -> bool:
        """Load and switch to a newer published version; unload retired idle ones."""
        latest = Storage(self.storage).latest_version()
        changed = False
        name = self.prefix + latest.name if latest is not None else None
        if latest is not None and _empty(latest):    # a rebuild with every memory forgotten
            changed = self._to_base(latest.name) if self._current is not None else False
            name = None
        if name is not None and name != self._current and name not in self._failed:
            t0 = time.time()
            try:
                self.engine.load_adapter(name, str(latest))
                warm_up(self.engine, name)      # before any request is pointed at it
            except Exception as e:
                self._failed.add(name)
                log.error("adapter %s could not be loaded, keeping %s: %s", name, self.version, e)
                if name in self.engine.adapters():
                    self.engine.unload_adapter(name)
            else:
                with self._lock:
                    old, self._current = self._current, name
                    if old:
                        self._retired.append(old)
                self.swaps.append({"from": self.label(old), "to": latest.name, "at": time.time(),
                                   "load_seconds": round(time.time() - t0, 3)})
                log.info("adapter %s%s -> %s (loaded in %.2fs); in-flight requests finish on %s",
                         self.prefix, self.label(old), latest.name, time.time() - t0, self.label(old))
                changed = True
        self._unload_idle()
        return changed

    def _to_base(self, version: str) -> bool:
        with self._lock:
            old, self._current = self._current, None
            self._retired.append(old)
        self.swaps.append({"from": self.label(old), "to": BASE, "at": time.time(), "load_seconds": 0.0,
                           "version": version})
        log.info("adapter %s%s -> base: version %s has no adapter (every memory was forgotten)",
                 self.prefix, self.label(old), version)
        return True

    def _unload_idle(self) -> None:
        with self._lock:
            idle = [n for n in self._retired if self._refs[n] <= 0]
            self._retired = [n for n in self._retired if n not in idle]
        for n in idle:
            try:
                self.engine.unload_adapter(n)
                log.info("unloaded retired adapter %s", n)
            except Exception as e:
                log.warning("unloading adapter %s: %s", n, e)


class Poller:
    """One thread that polls every pointer (``pointers()``: the current list) every ``every`` s."""

    def __init__(self, pointers: Callable[[], list[AdapterPointer]], every: float):
        self.pointers, self.every = pointers, float(every)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="adapter-poll", daemon=True)

    def start(self) -> "Poller":
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            for p in self.pointers():
                try:
                    p.poll_once()
                except Exception:
                    log.exception("adapter poll of %s failed", p.storage)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
