"""Generation for the awake endpoint: one batching thread over the engine, and token streams.

* :class:`GenBatcher`: one worker thread collects the generation requests of concurrent
  HTTP requests into one ``engine.generate`` call (up to ``serve.max_batch_size``
  requests). A batch that fails is retried request by request, so one bad request fails
  alone (a request that already streamed tokens fails rather than being sent twice).
* :class:`DeltaStream`: the tokens of one HTTP request as the engine makes them
  (``engine.generate(..., on_delta=...)``, see ``sleepray.engines.base``), handed from the
  batcher thread to the request's event loop, then its whole results.
* :class:`ChatText`: a chat reply's pieces with its leading and trailing whitespace cut, as
  the non-streamed reply (``text.strip()``) has it.
"""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import queue
import threading
from typing import Callable, Optional

from sleepray.engines.base import GenDelta, GenRequest

log = logging.getLogger(__name__)


class _Item:
    def __init__(self, reqs: list[GenRequest], on_delta: Optional[Callable[[int, GenDelta], None]]):
        self.reqs, self.on_delta = reqs, on_delta
        self.fut: cf.Future = cf.Future()
        self.streamed = False


class GenBatcher:
    """One worker thread that runs the queued generation requests as one engine batch."""

    def __init__(self, engine, max_batch: int):
        self.engine = engine
        self.max_batch = int(max_batch)
        self._q: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="gen-batcher", daemon=True)
        self._thread.start()

    async def generate(self, reqs: list[GenRequest], on_delta: Optional[Callable[[int, GenDelta], None]] = None):
        """The results of ``reqs``; ``on_delta(i, delta)`` (called in the batcher thread) gets each
        request's new tokens as they are made."""
        item = _Item(reqs, on_delta)
        self._q.put(item)
        return await asyncio.wrap_future(item.fut)

    def stop(self) -> None:
        self._q.put(None)

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            items, n = [item], len(item.reqs)
            while n < self.max_batch:
                try:
                    nxt = self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._q.put(None)
                    break
                items.append(nxt)
                n += len(nxt.reqs)
            self._serve(items)

    def _serve(self, items: list[_Item]) -> None:
        flat = [r for it in items for r in it.reqs]
        owner = [(it, k) for it in items for k in range(len(it.reqs))]

        def dispatch(i: int, delta: GenDelta) -> None:
            it, k = owner[i]
            if it.on_delta is not None:
                it.streamed = True
                try:
                    it.on_delta(k, delta)
                except Exception:  # a consumer's bug must not abort the whole batch
                    log.exception("a stream consumer failed")
        try:
            streaming = any(it.on_delta is not None for it in items)
            results = self.engine.generate(flat, on_delta=dispatch) if streaming else self.engine.generate(flat)
        except Exception as e:
            if len(items) == 1:
                _settle(items[0].fut, exc=e)
            else:  # isolate the request that failed the batch
                for one in items:
                    if one.streamed:
                        _settle(one.fut, exc=e)
                    else:
                        self._serve([one])
            return
        i = 0
        for it in items:
            _settle(it.fut, result=results[i: i + len(it.reqs)])
            i += len(it.reqs)


def _settle(fut: cf.Future, result=None, exc: Optional[BaseException] = None) -> None:
    if fut.set_running_or_notify_cancel():
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)


class DeltaStream:
    """``async for i, delta in DeltaStream(batcher, reqs)``: request ``i``'s new tokens as they come;
    then ``await stream.results()`` (raises what the generation raised)."""

    def __init__(self, batcher: GenBatcher, reqs: list[GenRequest]):
        self._loop = asyncio.get_running_loop()
        self._q: asyncio.Queue = asyncio.Queue()
        self._task = asyncio.ensure_future(batcher.generate(reqs, on_delta=self._put))
        self._task.add_done_callback(lambda _: self._q.put_nowait(None))

    def _put(self, i: int, delta: GenDelta) -> None:     # the batcher's thread
        self._loop.call_soon_threadsafe(self._q.put_nowait, (i, delta))

    def __aiter__(self):
        return self

    async def __anext__(self):
        item = await self._q.get()
        if item is None:
            raise StopAsyncIteration
        return item

    async def results(self):
        return await self._task


class ChatText:
    """Pieces of one chat reply, sent as ``text.strip()`` would have it: leading whitespace dropped,
    trailing whitespace held back until more text follows it."""

    def __init__(self):
        self._started, self._held = False, ""

    def feed(self, piece: str) -> str:
        text = self._held + piece
        if not self._started:
            text = text.lstrip()
            self._started = bool(text)
        body = text.rstrip()
        self._held = text[len(body):]
        return body
