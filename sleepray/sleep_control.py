"""Sleep control without a Coordinator: one sleep at a time, in the background.

The awake endpoint asks a named ``coordinator`` actor for sleeps when one runs; when
none does, it uses a :class:`BackgroundSleeper` (in a Ray actor, ``actors/sleeper.py``),
which runs ``sleepray.sleep.sleep_full`` through ``run_sleep`` and reports the same
status dict as the Coordinator: ``phase`` ("nrem" while a sleep runs, "wake" otherwise),
``pressure`` (short-term memory size against ``cycle.capacity_tokens``),
``adapter_version`` (the newest published version) and ``last_sleep``.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from sleepray.memory import MemoryStore
from sleepray.sleep import latest_version

log = logging.getLogger(__name__)


def memory_pressure(storage: str | Path, capacity_tokens: int) -> dict:
    p = MemoryStore(Path(storage) / "memory").pressure()
    return {**p, "capacity_tokens": int(capacity_tokens),
            "fraction": round(p["short_term_tokens"] / max(1, capacity_tokens), 4)}


def version_summary(version: Optional[Path]) -> Optional[dict]:
    """What ``lineage.json`` of a published version says about its sleep."""
    if version is None:
        return None
    try:
        lin = json.loads((version / "lineage.json").read_text())
    except (OSError, ValueError) as e:
        return {"version": version.name, "error": f"unreadable lineage.json: {e}"}
    return {"version": version.name, "phase": lin.get("phase"), "parent": lin.get("parent"),
            "episodes": len(lin.get("episodes") or []), "metrics": lin.get("metrics") or {},
            "created_at": lin.get("created_at")}


class BackgroundSleeper:
    """Runs ``run_sleep(reason) -> version folder or None`` in a thread, one at a time."""

    def __init__(self, storage: str | Path, capacity_tokens: int,
                 run_sleep: Callable[[str], Optional[str]]):
        self.storage = Path(storage)
        self.capacity_tokens = int(capacity_tokens)
        self._run_sleep = run_sleep
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._current: Optional[dict] = None
        self._last: Optional[dict] = None

    @property
    def sleeping(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def status(self) -> dict:
        latest = latest_version(self.storage)
        with self._lock:
            phase = "nrem" if self.sleeping else "wake"
            last = dict(self._last) if self._last else None
            current = dict(self._current) if self._current and phase == "nrem" else None
        if last is None and latest is not None:
            last = version_summary(latest)
        return {"phase": phase, "pressure": memory_pressure(self.storage, self.capacity_tokens),
                "adapter_version": latest.name if latest else None, "last_sleep": last,
                "current_sleep": current, "controller": "serve"}

    def request_sleep(self, reason: str = "requested") -> dict:
        with self._lock:
            if self.sleeping:
                return {"accepted": False, "phase": "nrem",
                        "message": "a sleep is already running", "current_sleep": dict(self._current)}
            self._current = {"reason": reason, "started_at": time.time()}
            self._thread = threading.Thread(target=self._sleep, args=(reason,), name="sleeper",
                                            daemon=True)
            self._thread.start()
        log.info("sleep requested (%s): NREM starts", reason)
        return {"accepted": True, "phase": "nrem", "reason": reason, "controller": "serve"}

    def _sleep(self, reason: str) -> None:
        t0 = time.time()
        rec: dict = {"reason": reason, "started_at": t0}
        try:
            out = self._run_sleep(reason)
            rec["version"] = Path(out).name if out else None
            if out:
                rec.update({k: v for k, v in (version_summary(Path(out)) or {}).items()
                            if k in ("metrics", "episodes", "parent")})
            else:
                rec["message"] = "short-term memory is empty: nothing to consolidate"
        except Exception as e:  # the sleep failed: report it, stay awake
            log.exception("sleep failed")
            rec["error"] = f"{type(e).__name__}: {e}"
        rec["finished_at"] = time.time()
        rec["seconds"] = round(rec["finished_at"] - t0, 2)
        with self._lock:
            self._last, self._current = rec, None
        log.info("sleep finished in %.1fs: version %s%s", rec["seconds"], rec.get("version"),
                 f" (error: {rec['error']})" if "error" in rec else "")

    def wait(self, timeout: Optional[float] = None) -> None:
        t = self._thread
        if t is not None:
            t.join(timeout)
