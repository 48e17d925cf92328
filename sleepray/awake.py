"""The awake model: one engine, the current adapter version, and the short-term memory.

:class:`AwakeService` is what the HTTP routes (``sleepray.serve_app``) call; the Ray
Serve deployment (``actors/serve.py``) builds one per replica. It is plain Python:

* **Adapter versions.** :class:`AdapterPointer` polls ``Storage.latest_version``
  every ``serve.poll_seconds`` in a thread; a new version is loaded into the engine
  under its own name (``engine.load_adapter("v0002", folder)``) while requests keep
  running, then the pointer switches. A request takes the pointer once, at its start,
  and holds a reference until it is answered, so in-flight requests finish on the
  version they started with; a retired version is unloaded once nothing uses it.
  Every response names its version (``x-sleepray-adapter`` header, ``system_fingerprint``
  and ``adapter_version``); ``"base"`` before the first sleep.
* **Batching.** Generation requests of concurrent HTTP requests are collected by one
  worker thread into a single ``engine.generate`` call (up to ``serve.max_batch_size``).
* **Memory.** With ``serve.memory`` on, the short-term memory (``episodes("short_term")``
  of the memory backend) goes in front of the prompt, chosen by
  ``serve_api.select_context`` within ``max_model_len``; every generated interaction
  is appended to the memory (kind ``interaction``) and acknowledged durable before the
  response returns. Requests opt out with ``memory`` / ``memory_context`` (body) or the
  ``x-sleepray-memory*`` headers. Scoring-only requests (``echo`` with ``max_tokens=0``)
  are not recorded.

The memory backend and the sleep control are small async interfaces
(:class:`LocalMemory` / :class:`LocalControl` here; Ray actor ones in ``actors/serve.py``).
"""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import queue
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from sleepray.engines.base import GenRequest, ScoreRequest
from sleepray.serve_api import (APIError, ChatRequest, CompletionRequest, MemoryCreate, MemoryItem,
                                chat_logprobs, chat_response, completion_logprobs, completion_response,
                                memory_object, merge_logprobs, new_id, render_chat, select_context,
                                usage, with_context)
from sleepray.storage import Storage

log = logging.getLogger(__name__)

BASE = "base"
WARMUP_PROMPT = "Q: ?\nA:"


def warm_up(engine, adapter: Optional[str] = None) -> None:
    """One 1-token generation, so that the first real request does not pay the engine's
    (or a fresh adapter's) first-use cost."""
    engine.generate([GenRequest(WARMUP_PROMPT, 1, adapter=adapter)])


# ----------------------------------------------------------------------------- adapters
class AdapterPointer:
    """The adapter version new requests get; swaps to new versions without a pause."""

    def __init__(self, engine, storage: str | Path):
        self.engine = engine
        self.storage = Path(storage)
        self._lock = threading.Lock()
        self._current: Optional[str] = None        # version name == engine adapter name
        self._refs: Counter = Counter()
        self._retired: list[str] = []
        self._failed: set[str] = set()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.swaps: list[dict] = []

    @property
    def version(self) -> str:
        return self._current or BASE

    @contextmanager
    def use(self):
        """``(version label, engine adapter name or None)`` held for one request."""
        with self._lock:
            cur = self._current
            if cur:
                self._refs[cur] += 1
        try:
            yield (cur or BASE, cur)
        finally:
            if cur:
                with self._lock:
                    self._refs[cur] -= 1

    def poll_once(self) -> bool:
        """Load and switch to a newer published version; unload retired idle ones."""
        latest = Storage(self.storage).latest_version()
        changed = False
        if latest is not None and latest.name != self._current and latest.name not in self._failed:
            t0 = time.time()
            try:
                self.engine.load_adapter(latest.name, str(latest))
                warm_up(self.engine, latest.name)      # before any request is pointed at it
            except Exception as e:
                self._failed.add(latest.name)
                log.error("adapter %s could not be loaded, keeping %s: %s", latest.name, self.version, e)
                if latest.name in self.engine.adapters():
                    self.engine.unload_adapter(latest.name)
            else:
                with self._lock:
                    old, self._current = self._current, latest.name
                    if old:
                        self._retired.append(old)
                self.swaps.append({"from": old or BASE, "to": latest.name, "at": time.time(),
                                   "load_seconds": round(time.time() - t0, 3)})
                log.info("adapter %s -> %s (loaded in %.2fs); in-flight requests finish on %s",
                         old or BASE, latest.name, time.time() - t0, old or BASE)
                changed = True
        self._unload_idle()
        return changed

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

    def start(self, every: float) -> None:
        def loop():
            while not self._stop.wait(every):
                try:
                    self.poll_once()
                except Exception:
                    log.exception("adapter poll failed")
        self._thread = threading.Thread(target=loop, name="adapter-poll", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


# ----------------------------------------------------------------------------- batching
class GenBatcher:
    """One worker thread that runs the queued generation requests as one engine batch."""

    def __init__(self, engine, max_batch: int):
        self.engine = engine
        self.max_batch = int(max_batch)
        self._q: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="gen-batcher", daemon=True)
        self._thread.start()

    async def generate(self, reqs: list[GenRequest]):
        fut: cf.Future = cf.Future()
        self._q.put((reqs, fut))
        return await asyncio.wrap_future(fut)

    def stop(self) -> None:
        self._q.put(None)

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            items, n = [item], len(item[0])
            while n < self.max_batch:
                try:
                    nxt = self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._q.put(None)
                    break
                items.append(nxt)
                n += len(nxt[0])
            self._serve(items)

    def _serve(self, items) -> None:
        try:
            flat = [r for reqs, _ in items for r in reqs]
            results = self.engine.generate(flat)
        except Exception as e:
            if len(items) == 1:
                _settle(items[0][1], exc=e)
            else:  # isolate the request that failed the batch
                for one in items:
                    self._serve([one])
            return
        i = 0
        for reqs, fut in items:
            _settle(fut, result=results[i: i + len(reqs)])
            i += len(reqs)


def _settle(fut: cf.Future, result=None, exc: Optional[BaseException] = None) -> None:
    if fut.set_running_or_notify_cancel():
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)


# ----------------------------------------------------------------------------- backends
class LocalMemory:
    """The memory backend on a ``MemoryStore`` in this process."""

    def __init__(self, store):
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


# ----------------------------------------------------------------------------- service
class AwakeService:
    def __init__(self, cfg, engine, memory, control, storage: str | Path | None = None):
        self.cfg, self.scfg = cfg, cfg.serve
        self.engine, self.tok = engine, engine.tokenizer
        self.max_len = int(engine.cfg.max_model_len)
        self.memory, self.control = memory, control
        self.model_id = cfg.serve.model_name
        self.pointer = AdapterPointer(engine, storage or cfg.cycle.storage)
        self.batcher = GenBatcher(engine, cfg.serve.max_batch_size)
        self._ntok: dict[str, int] = {}
        self._has_bos = self.n_tokens("") > 0   # "" tokenizes to [BOS]
        self.created = int(time.time())

    def start(self) -> "AwakeService":
        warm_up(self.engine)
        self.pointer.poll_once()
        self.pointer.start(self.scfg.poll_seconds)
        log.info("awake: serving %s (%s engine) on adapter %s, memory %s, context policy %s",
                 self.model_id, self.engine.kind, self.pointer.version, self.scfg.memory,
                 self.scfg.context_policy)
        return self

    def check_health(self) -> None:
        """Raises when the replica can't serve (Serve then replaces it)."""
        if not self.batcher._thread.is_alive():
            raise RuntimeError("the generation batcher thread is dead")
        if getattr(self.engine, "_closed", False):
            raise RuntimeError("the engine is closed")

    def close(self) -> None:
        self.pointer.stop()
        self.batcher.stop()
        self.engine.close()

    # -------------------------------------------------------------- helpers
    def n_tokens(self, text: str, special: bool = True) -> int:
        return len(self.tok(text, add_special_tokens=special)["input_ids"])

    def token_strings(self, ids: list[int]) -> list[str]:
        """Each token's text, such that they concatenate to the decoded text."""
        out, prev = [], ""
        for j in range(len(ids)):
            cur = self.tok.decode(ids[: j + 1], skip_special_tokens=True)
            out.append(cur[len(prev):] if cur.startswith(prev) else self.tok.decode([ids[j]]))
            prev = cur
        return out

    def check_model(self, model: str) -> None:
        if model != self.model_id:
            raise APIError(404, f"The model '{model}' does not exist; this server serves "
                                f"'{self.model_id}' (see /v1/models)", code="model_not_found",
                           param="model")

    def _check_max_tokens(self, mt: int) -> None:
        if mt > self.scfg.max_tokens_limit:
            raise APIError(400, f"max_tokens={mt} is over this server's limit of "
                                f"{self.scfg.max_tokens_limit} (serve.max_tokens_limit)", param="max_tokens")

    def use_memory(self) -> bool:
        return self.scfg.memory == "on"

    async def _context(self, prompt: str, budget: int) -> list[MemoryItem]:
        rows = await self.memory.episodes("short_term")
        items = []
        for i, r in enumerate(rows):
            eid = r["episode_id"]
            if eid not in self._ntok:
                self._ntok[eid] = self.n_tokens(r["text"] + "\n", special=False)
            items.append(MemoryItem(eid, r["text"], self._ntok[eid], i))
        return select_context(items, prompt, budget, self.scfg.context_policy)

    async def _prepare(self, prompt: str, max_tokens: int, use_ctx: bool):
        """(model input, memory items in it, its token count); 400 when the prompt can't fit."""
        n = self.n_tokens(prompt)
        if n == 0:
            raise APIError(400, "the prompt is empty", param="prompt")
        if n + max_tokens > self.max_len:
            raise APIError(400, f"the prompt is {n} tokens; with max_tokens={max_tokens} that is over "
                                f"the model's context of {self.max_len} tokens", param="prompt",
                           code="context_length_exceeded")
        ctx: list[MemoryItem] = []
        full = prompt
        if use_ctx:
            ctx = await self._context(prompt, self.max_len - n - max_tokens)
            full = with_context(ctx, prompt)
            while ctx and self.n_tokens(full) + max_tokens > self.max_len:
                ctx = ctx[1:]   # joins can tokenize a little longer than the parts
                full = with_context(ctx, prompt)
        return full, ctx, self.n_tokens(full)

    async def _record(self, pairs: list[tuple[str, str]], source: str) -> list[str]:
        recs = []
        for prompt, reply in pairs:
            text = prompt + reply
            if text.strip():
                recs.append({"episode_id": new_id("int"), "kind": "interaction", "text": text,
                             "documents": [text], "source": source,
                             "n_tokens": self.n_tokens(text, special=False)})
        if not recs:
            return []
        receipt = await self.memory.append(recs)   # durable before the response returns
        return list(receipt["episode_ids"])

    async def _generate(self, reqs: list[GenRequest]):
        try:
            return await self.batcher.generate(reqs)
        except (ValueError, TypeError) as e:   # the engine's own input checks
            raise APIError(400, f"the engine rejected the request: {e}") from None

    async def _score(self, reqs: list[ScoreRequest]):
        try:
            return await asyncio.to_thread(self.engine.score, reqs)
        except (ValueError, TypeError) as e:
            raise APIError(400, f"the engine rejected the request: {e}") from None

    def _gen_requests(self, full: str, req, mt: int, adapter, stops, topk: int) -> list[GenRequest]:
        return [GenRequest(full, mt, temperature=req.temperature, top_p=req.top_p, logprobs_topk=topk,
                           adapter=adapter, seed=None if req.seed is None else (req.seed + k) % 2**63,
                           stop=stops or None) for k in range(req.n)]

    def _top(self, topk) -> Optional[list[dict]]:
        if topk is None:
            return None
        return [{self.tok.decode([t]): lp for t, lp in row} for row in topk]

    async def _score_prompt(self, ctx: list[MemoryItem], prompt: str, k: int, adapter) -> dict:
        """Echo log-probs of the prompt's own tokens (under the memory context, if any)."""
        ids = list(self.tok(prompt, add_special_tokens=False)["input_ids"])
        if not ids:
            return completion_logprobs([], [], [] if k else None)
        if ctx:
            sreq, first = ScoreRequest(with_context(ctx, ""), continuation_ids=ids, logprobs_topk=k,
                                       adapter=adapter), []
        elif self._has_bos:
            sreq, first = ScoreRequest("", continuation_ids=ids, logprobs_topk=k, adapter=adapter), []
        else:  # no BOS: the first token has no log-prob (as in OpenAI's echo)
            sreq, first = ScoreRequest(self.tok.decode(ids[:1]), continuation_ids=ids[1:],
                                       logprobs_topk=k, adapter=adapter), [None]
        res = (await self._score([sreq]))[0]
        tokens = self.token_strings(ids)
        lps = first + list(res.logprobs)
        top = self._top(res.topk) if k else None
        if top is not None and first:
            top = [None] + top
        return completion_logprobs(tokens, lps, top)

    # -------------------------------------------------------------- completions
    async def complete(self, req: CompletionRequest, record: bool, use_ctx: bool, endpoint: str):
        self.check_model(req.model)
        mt = 16 if req.max_tokens is None else req.max_tokens
        self._check_max_tokens(mt)
        record, use_ctx = record and self.use_memory(), use_ctx and self.use_memory()
        topk = req.logprobs or 0
        with self.pointer.use() as (version, adapter):
            prepared = [await self._prepare(p, mt, use_ctx) for p in req.prompts]
            results = []
            if mt > 0:
                reqs = [g for (full, _, _), p in zip(prepared, req.prompts)
                        for g in self._gen_requests(full, req, mt, adapter, req.stops, topk)]
                results = await self._generate(reqs)
            echoes = []
            if req.echo and req.logprobs is not None:
                echoes = [await self._score_prompt(ctx, p, topk, adapter)
                          for (_, ctx, _), p in zip(prepared, req.prompts)]
        choices, n_out, pairs = [], 0, []
        for i, p in enumerate(req.prompts):
            for k in range(req.n):
                g = results[i * req.n + k] if results else None
                text = (p if req.echo else "") + (g.text if g else "")
                lp = None
                if req.logprobs is not None:
                    lp = echoes[i] if echoes else completion_logprobs([], [], [] if topk else None)
                    if g is not None:
                        start = len(p) if req.echo else 0
                        gen = completion_logprobs(self.token_strings(g.token_ids), list(g.logprobs),
                                                  self._top(g.topk), start)
                        lp = merge_logprobs(lp, gen) if req.echo else gen
                choices.append({"index": len(choices), "text": text, "logprobs": lp,
                                "finish_reason": (g.finish_reason or "stop") if g else "length"})
                n_out += len(g.token_ids) if g else 0
                if g is not None and k == 0:
                    pairs.append((p, g.text))
        recorded = await self._record(pairs, f"serve:{endpoint}") if record and pairs else []
        extra = {"adapter_version": version,
                 "memory": {"context": sorted({c.episode_id for _, ctx, _ in prepared for c in ctx}),
                            "recorded": recorded}}
        resp = completion_response(new_id("cmpl"), self.model_id, choices,
                                   usage(sum(n for _, _, n in prepared), n_out), version, extra)
        return resp, version

    # -------------------------------------------------------------- chat
    async def chat(self, req: ChatRequest, record: bool, use_ctx: bool, endpoint: str):
        self.check_model(req.model)
        record, use_ctx = record and self.use_memory(), use_ctx and self.use_memory()
        prompt = render_chat(req.messages, self.tok)
        mt = req.requested_max_tokens
        if mt is not None:
            self._check_max_tokens(mt)
        else:  # default: as much as fits, up to the server's limit
            mt = max(1, min(self.scfg.max_tokens_limit, self.max_len - self.n_tokens(prompt)))
        stops = list(dict.fromkeys(req.stops + list(self.scfg.chat_stop)))
        topk = (req.top_logprobs or 0) if req.logprobs else 0
        with self.pointer.use() as (version, adapter):
            full, ctx, n_in = await self._prepare(prompt, mt, use_ctx)
            results = await self._generate(self._gen_requests(full, req, mt, adapter, stops, topk))
        choices = []
        for k, g in enumerate(results):
            content = g.text.strip()
            lp = None
            if req.logprobs:
                top = None
                if g.topk is not None and req.top_logprobs:
                    top = [[(self.tok.decode([t]), v) for t, v in row] for row in g.topk]
                lp = chat_logprobs(self.token_strings(g.token_ids), list(g.logprobs), top)
            choices.append({"index": k, "message": {"role": "assistant", "content": content},
                            "logprobs": lp, "finish_reason": g.finish_reason or "stop"})
        recorded = []
        if record:
            recorded = await self._record([(prompt, " " + choices[0]["message"]["content"])],
                                          f"serve:{endpoint}")
        extra = {"adapter_version": version,
                 "memory": {"context": [c.episode_id for c in ctx], "recorded": recorded}}
        resp = chat_response(new_id("chatcmpl"), self.model_id, choices,
                             usage(n_in, sum(len(g.token_ids) for g in results)), version, extra)
        return resp, version

    # -------------------------------------------------------------- models
    def models(self) -> dict:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "sleepray",
                "adapter_version": self.pointer.version, "max_model_len": self.max_len}

    # -------------------------------------------------------------- memories
    async def add_memory(self, body: MemoryCreate) -> dict:
        if body.id is not None and await self.memory.status_of(body.id) is not None:
            raise APIError(409, f"a memory with id {body.id!r} already exists", param="id")
        rec = body.record(0)
        rec["n_tokens"] = self.n_tokens(rec["text"], special=False)
        try:
            receipt = await self.memory.append([rec])
        except ValueError as e:
            raise APIError(400, f"memory rejected: {str(e).strip().splitlines()[-1][:300]}") from None
        log.info("memory %s added (%d tokens), durable in %s", rec["episode_id"], rec["n_tokens"],
                 receipt["segment"])
        rows = [r for r in await self.memory.episodes("short_term") if r["episode_id"] == rec["episode_id"]]
        return memory_object(rows[0] if rows else {**rec, "created_at": None}, "short_term")

    async def list_memories(self, status: str, kind: Optional[str]) -> dict:
        statuses = {"all": ["short_term", "consolidated"], "short_term": ["short_term"],
                    "consolidated": ["consolidated"], "deleted": ["deleted"]}
        if status not in statuses:
            raise APIError(400, f"status must be one of {sorted(statuses)}, got {status!r}", param="status")
        kinds = ("document", "interaction", "episode")
        if kind is not None and kind not in kinds:
            raise APIError(400, f"kind must be one of {list(kinds)}, got {kind!r}", param="kind")
        data = []
        for st in statuses[status]:
            data += [memory_object(r, st) for r in await self.memory.episodes(st)
                     if kind is None or r["kind"] == kind]
        return {"object": "list", "data": data}

    async def delete_memory(self, memory_id: str) -> dict:
        st = await self.memory.status_of(memory_id)
        if st is None:
            raise APIError(404, f"no memory with id {memory_id!r}", code="memory_not_found")
        if st == "consolidated":
            raise APIError(409, f"memory {memory_id!r} is already consolidated into the adapter "
                                "weights; deleting it now would not remove it from them")
        if st == "short_term":
            await self.memory.delete([memory_id], reason="deleted through /v1/memories")
            self._ntok.pop(memory_id, None)
            log.info("memory %s deleted: it will never be consolidated", memory_id)
        return {"id": memory_id, "object": "memory", "deleted": True}

    # -------------------------------------------------------------- sleep
    async def sleep_status(self) -> dict:
        st = dict(await self.control.status())
        st["serving_adapter"] = self.pointer.version
        return st

    async def request_sleep(self, reason: str) -> dict:
        return dict(await self.control.request_sleep(reason))
