"""The awake endpoint's load benchmark, without the deployment (``jobs/bench_serve.py`` runs it).

:class:`Load` runs ``clients`` streaming clients in one asyncio loop on a thread of its
own; client ``i`` belongs to tenant ``i % len(tenants)``. Every request is a streamed
``/v1/completions`` and leaves one :class:`Sample`: when it was sent, when its first text
arrived (time to first token), when it ended, whether it failed (any non-200, an error
event, a transport error), the version and the replica that answered. :func:`summary`
turns samples into the table: requests, failures, p50/p99 latency and time to first
token, throughput; :func:`switches` the versions each tenant saw, in order.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np


@dataclass
class Sample:
    tenant: str
    t0: float
    t_first: Optional[float]
    t_end: float
    ok: bool
    status: int
    version: str
    replica: str
    error: str = ""


def _pct(xs: list[float], q: float) -> Optional[float]:
    return round(float(np.percentile(np.array(xs) * 1000, q)), 1) if xs else None


def summary(samples: list[Sample], seconds: float) -> dict:
    """The table's row for ``samples`` that started within a window of ``seconds``."""
    ok = [s for s in samples if s.ok]
    lat = [s.t_end - s.t0 for s in ok]
    ttft = [s.t_first - s.t0 for s in ok if s.t_first is not None]
    return {"requests": len(samples), "failed": len(samples) - len(ok),
            "p50_ms": _pct(lat, 50), "p99_ms": _pct(lat, 99),
            "ttft_p50_ms": _pct(ttft, 50), "ttft_p99_ms": _pct(ttft, 99),
            "seconds": round(seconds, 2), "throughput_rps": round(len(ok) / seconds, 2) if seconds > 0 else None}


def between(samples: list[Sample], windows: list[tuple[float, float]]) -> list[Sample]:
    return [s for s in samples if any(a <= s.t0 < b for a, b in windows)]


def switches(samples: list[Sample]) -> dict[str, list[str]]:
    """Per tenant, the versions its answers named, in the order they first appeared."""
    out: dict[str, list[str]] = {}
    for s in sorted(samples, key=lambda s: s.t_end):
        if s.ok and s.version not in out.setdefault(s.tenant, []):
            out[s.tenant].append(s.version)
    return out


class Load:
    """Streaming clients of several tenants until :meth:`stop` (see the module docstring)."""

    def __init__(self, base: str, keys: dict[str, str], model: str, prompts: list[str], clients: int,
                 max_tokens: int = 16):
        self.base, self.keys, self.model, self.prompts = base, keys, model, prompts
        self.tenants = sorted(keys)
        self.clients, self.max_tokens = int(clients), int(max_tokens)
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="bench-load", daemon=True)

    def start(self) -> "Load":
        self._thread.start()
        return self

    def stop(self) -> list[Sample]:
        self._stop.set()
        self._thread.join(600)
        return self.samples

    async def _main(self) -> None:
        import httpx
        limits = httpx.Limits(max_connections=self.clients + 8, max_keepalive_connections=self.clients + 8)
        async with httpx.AsyncClient(base_url=self.base, timeout=600, limits=limits) as h:
            await asyncio.gather(*(self._client(h, i) for i in range(self.clients)))

    async def _client(self, h, i: int) -> None:
        tenant = self.tenants[i % len(self.tenants)]
        headers = {"Authorization": f"Bearer {self.keys[tenant]}"}
        k = i
        while not self._stop.is_set():
            body = {"model": self.model, "prompt": self.prompts[k % len(self.prompts)], "max_tokens": self.max_tokens,
                    "temperature": 0, "stream": True, "memory": False}
            k += 1
            self.samples.append(await self._one(h, tenant, headers, body))

    @staticmethod
    async def _one(h, tenant: str, headers: dict, body: dict) -> Sample:
        t0, first, status, version, replica, err = time.time(), None, 0, "?", "?", ""
        try:
            async with h.stream("POST", "/v1/completions", json=body, headers=headers) as r:
                status = r.status_code
                version = r.headers.get("x-sleepray-adapter", "?")
                replica = r.headers.get("x-sleepray-replica", "?")
                if status != 200:
                    err = f"{status}: {(await r.aread())[:200]!r}"
                else:
                    done = False
                    async for line in r.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        if line == "data: [DONE]":
                            done = True
                            break
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            err = f"error event: {chunk['error']}"
                            break
                        if first is None and chunk.get("choices") and chunk["choices"][0].get("text"):
                            first = time.time()
                    if not done and not err:
                        err = "the stream ended without [DONE]"
        except Exception as e:  # noqa: BLE001 - a failed request is what is counted
            err = repr(e)[:300]
        return Sample(tenant, t0, first, time.time(), not err, status, version, replica, err)


def as_rows(samples: list[Sample]) -> list[dict]:
    return [asdict(s) for s in samples]
