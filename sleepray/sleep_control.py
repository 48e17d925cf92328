"""The sleep controller: one sleep at a time in a background thread, its triggers, its status.

Hosted alike by the Coordinator actor (``actors/coordinator.py``: sleeps on the Ray
backend) and by the awake endpoint when no Coordinator runs (``actors/sleeper.py``: a
sleep as a Ray task; ``sleepray.awake.LocalControl``: in this process). It is given a
``sleep(trigger) -> record data or None`` callable and does the rest:

* triggers: a request (:meth:`request_sleep`), a forgotten memory (``sleepray.forget``: a
  rebuild is due), memory pressure (short-term tokens reach
  ``cycle.capacity_tokens``) and a schedule (``cycle.schedule_seconds`` since the last
  sleep, with something to consolidate), checked every ``cycle.poll_seconds`` when watching;
* the real step: read from the sleep's record on disk (``nrem``, ``rem``, ``publish``,
  ``deep``), ``wake`` when no sleep runs;
* one status schema (:meth:`status`), the same for every host.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from sleepray import forget
from sleepray.memory import MemoryStore
from sleepray.sleep_record import records, summary, unfinished
from sleepray.storage import LINEAGE, PathLike, Storage

log = logging.getLogger(__name__)


def memory_pressure(store: Storage, capacity_tokens: int) -> dict:
    p = MemoryStore(store.memory).pressure()
    return {**p, "capacity_tokens": int(capacity_tokens),
            "fraction": round(p["short_term_tokens"] / max(1, capacity_tokens), 4)}


def version_summary(version: Optional[Path]) -> Optional[dict]:
    """What ``lineage.json`` of a published version says about its sleep."""
    if version is None:
        return None
    try:
        lin = json.loads((version / LINEAGE).read_text())
    except (OSError, ValueError) as e:
        return {"version": version.name, "error": f"unreadable lineage.json: {e}"}
    return {"version": version.name, "sleep_id": lin.get("sleep_id"), "trigger": lin.get("trigger"),
            "phase": lin.get("phase"), "parent": lin.get("parent"),
            "episodes": len(lin.get("episodes") or []), "metrics": lin.get("metrics") or {},
            "created_at": lin.get("created_at")}


class SleepController:
    def __init__(self, cfg, storage: PathLike, sleep: Callable[[str], Optional[dict]],
                 name: str = "controller", watch: bool = False):
        self.cfg, self.store, self.name = cfg, Storage(storage), name
        self._sleep_fn = sleep
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._current: Optional[dict] = None
        self._last: Optional[dict] = None
        self.sleeps_done = 0      # sleeps that consolidated something
        self.wakes = 0            # sleep attempts that ended (also: nothing to do, failed)
        self._last_sleep_at = time.time()
        if unfinished(self.store) is not None:
            self.request_sleep("resume")
        if watch:
            threading.Thread(target=self._watch, name=f"{name}-triggers", daemon=True).start()

    # ----------------------------------------------------------------- triggers
    @property
    def sleeping(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def due(self) -> Optional[str]:
        """The trigger that asks for a sleep now (``forget``, ``pressure``, ``schedule``), if any."""
        cyc = self.cfg.cycle
        memory = MemoryStore(self.store.memory)
        if forget.pending(self.store, memory):
            return "forget"
        p = memory.pressure()
        if p["short_term_tokens"] >= cyc.capacity_tokens:
            return "pressure"
        if cyc.schedule_seconds and time.time() - self._last_sleep_at >= cyc.schedule_seconds \
                and p["short_term_episodes"]:
            return "schedule"
        return None

    def _watch(self) -> None:
        while not self._stop.wait(self.cfg.cycle.poll_seconds):
            try:
                reason = None if self.sleeping else self.due()
                if reason:
                    self.request_sleep(reason)
            except Exception:  # a watcher that dies silently would stop all sleeping
                log.exception("sleep trigger check failed")

    def request_sleep(self, reason: str = "request") -> dict:
        with self._lock:
            if self.sleeping:
                return {"accepted": False, "reason": reason, "message": "a sleep is already running",
                        "phase": self.phase(), "current_sleep": dict(self._current or {}),
                        "controller": self.name}
            self._current = {"reason": reason, "started_at": time.time()}
            self._thread = threading.Thread(target=self._run, args=(reason,), name=f"{self.name}-sleep",
                                            daemon=True)
            self._thread.start()
        log.info("sleep requested (%s)", reason)
        return {"accepted": True, "reason": reason, "phase": self.phase(), "controller": self.name}

    # -------------------------------------------------------------------- sleep
    def _run(self, reason: str) -> None:
        t0 = time.time()
        last: dict = {"reason": reason, "started_at": t0, "version": None}
        try:
            data = self._sleep_fn(reason)
            if data is None:
                last["message"] = "short-term memory is empty: nothing to consolidate"
            else:
                last.update(summary(data))
                self.sleeps_done += 1
        except Exception as e:  # the sleep failed: report it, stay awake
            log.exception("sleep failed")
            last["error"] = f"{type(e).__name__}: {e}"
        last["finished_at"] = time.time()
        last["seconds"] = round(last["finished_at"] - t0, 2)
        with self._lock:
            self._last, self._current = last, None
            self._last_sleep_at = time.time()
            self.wakes += 1
        log.info("sleep finished in %.1fs: version %s%s", last["seconds"], last.get("version"),
                 f" (error: {last['error']})" if "error" in last else "")

    def phase(self, rec=None) -> str:
        """``wake``, or the step the running sleep is in, from its record on disk (``rec``: the
        unfinished record, when the caller has read it already)."""
        if not self.sleeping:
            return "wake"
        rec = rec or unfinished(self.store)
        if rec is not None:
            return rec.next_phase or "publish"
        started = (self._current or {}).get("started_at", 0)
        newest = next(iter(records(self.store)[-1:]), None)
        if newest is None or newest.data.get("created_at", 0) < started:
            return "nrem"           # the record is not written yet: a sleep starts with NREM
        return newest.phases[-1]    # its steps are done; the host is finishing up

    # ------------------------------------------------------------------- status
    def status(self) -> dict:
        latest = self.store.latest_version()
        rec = unfinished(self.store) if self.sleeping else None
        phase = self.phase(rec)
        with self._lock:
            last = dict(self._last) if self._last else version_summary(latest)
            current = dict(self._current) if self._current and phase != "wake" else None
        if current is not None and rec is not None:
            current["sleep_id"] = rec.sleep_id
        return {"controller": self.name, "phase": phase, "sleep_id": (current or {}).get("sleep_id"),
                "pressure": memory_pressure(self.store, self.cfg.cycle.capacity_tokens),
                "adapter_version": latest.name if latest else None, "last_sleep": last,
                "current_sleep": current, "sleeps_done": self.sleeps_done, "wakes": self.wakes,
                "error": (self._last or {}).get("error"), "storage": str(self.store.root)}

    def wait(self, timeout: Optional[float] = None) -> dict:
        t = self._thread
        if t is not None:
            t.join(timeout)
        return self.status()

    def stop(self) -> None:
        self._stop.set()
