"""The awake model: one engine, the current adapter version, and the short-term memory.

:class:`AwakeService` is what the HTTP routes (``sleepray.serve_app``) call; the Ray
Serve deployment (``actors/serve.py``) builds one per replica. It is plain Python:

* **Tenants.** A request's API key names its tenant (``sleepray.tenants``); each tenant
  has its own storage folder: short-term memory, sleeps, expert stack, adapter versions.
  A request only ever sees its own tenant's memories and adapter; one engine serves every
  tenant's adapter over the shared base (vLLM multi-LoRA). Per tenant a token-bucket rate
  limit (429).
* **Adapter versions.** Each tenant's :class:`~sleepray.adapter_pointer.AdapterPointer`
  follows its latest published version (one poller thread, every ``serve.poll_seconds``);
  in-flight requests finish on the version they started with. Every response names its
  version (``x-sleepray-adapter`` header, ``system_fingerprint`` and ``adapter_version``);
  ``"base"`` before the tenant's first sleep.
* **Batching and streaming.** Generation requests of concurrent HTTP requests are collected
  by one worker thread into a single ``engine.generate`` call (up to ``serve.max_batch_size``;
  ``sleepray.gen_batcher``); a streamed request gets its tokens as the engine makes them
  (:meth:`AwakeService.stream`).
* **Memory.** With ``serve.memory`` on, the short-term memory (``episodes("short_term")``
  of the memory backend) goes in front of the prompt, chosen by
  ``serve_api.select_context`` within ``max_model_len``; every generated interaction
  is appended to the memory (kind ``interaction``) and acknowledged durable before the
  response returns. What is recorded is what the user sent (the prompt; a chat's new user
  turns); the model's answer only with ``serve.record_answers`` or the request's
  ``record_answers``, and then in the memory's ``model_output`` column, which no sleep
  reads. Requests opt out with ``memory`` / ``memory_context`` (body) or the
  ``x-sleepray-memory*`` headers. Scoring-only requests (``echo`` with ``max_tokens=0``)
  are not recorded.
* **Forgetting.** Deleting a consolidated memory records the deletion and asks the
  tenant's sleep control for a sleep: the next sleep rebuilds the tenant's experts from
  its remaining memories (``sleepray.forget``).

The memory backend and the sleep control of each tenant come from a ``backends`` callable
(``sleepray.awake_backends.LocalBackends`` in process; ``actors.serve.RayBackends`` on Ray).
"""
from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Optional

from sleepray.adapter_pointer import Poller, warm_up
from sleepray.awake_backends import Tenant
from sleepray.engines.base import GenRequest, ScoreRequest
from sleepray.gen_batcher import ChatText, DeltaStream, GenBatcher
from sleepray.serve_api import (APIError, ChatRequest, CompletionRequest, MemoryCreate, MemoryItem,
                                chat_chunks, chat_logprobs, chat_response, check_lengths,
                                completion_chunks, completion_logprobs, completion_response, memory_object,
                                merge_logprobs, new_id, render_chat, select_context, stream_chunk, usage,
                                user_turns, with_context)
from sleepray.tenants import DEFAULT, KeyRing, Principal, RateLimiter, tenant_storage

log = logging.getLogger(__name__)


async def _aiter(items):
    for x in items:
        yield x


class _StreamDone:
    """What a stream does after its last token: record, and the usage chunk."""

    def __init__(self, record, answers, users, n, endpoint, include_usage, n_in, context):
        self.record, self.answers, self.users, self.n, self.endpoint = record, answers, users, n, endpoint
        self.include_usage, self.n_in, self.context = include_usage, n_in, context


# ----------------------------------------------------------------------------- service
class AwakeService:
    def __init__(self, cfg, engine, backends, storage: str | Path | None = None):
        self.cfg, self.scfg = cfg, cfg.serve
        self.engine, self.tok = engine, engine.tokenizer
        self.max_len = int(engine.cfg.max_model_len)
        self.storage = Path(storage or cfg.cycle.storage)
        self.model_id = cfg.serve.model_name
        self.keys = KeyRing.from_config(cfg.serve)
        self.limiter = RateLimiter(cfg.serve.rate_limit_rps, cfg.serve.rate_limit_burst)
        self.tenants: dict[str, Tenant] = {}
        for name in self.keys.tenants:
            st = tenant_storage(self.storage, name)
            memory, control = backends(name, st)
            self.tenants[name] = Tenant(name, st, engine, memory, control)
        self.batcher = GenBatcher(engine, cfg.serve.max_batch_size)
        self.poller = Poller(lambda: [t.pointer for t in self.tenants.values()], cfg.serve.poll_seconds)
        self._has_bos = self.n_tokens("") > 0   # "" tokenizes to [BOS]
        self.replica = "local"                  # the Serve replica's id (actors/serve.py sets it)
        self.created = int(time.time())

    @property
    def pointer(self):
        """The tenant "default"'s adapter pointer (the one-user endpoint's)."""
        return self.tenants[DEFAULT].pointer

    def start(self) -> "AwakeService":
        warm_up(self.engine)
        for t in self.tenants.values():
            t.pointer.poll_once()
        self.poller.start()
        log.info("awake: serving %s (%s engine) to %d tenant(s) %s, memory %s, context policy %s",
                 self.model_id, self.engine.kind, len(self.tenants),
                 {n: t.pointer.version for n, t in self.tenants.items()}, self.scfg.memory,
                 self.scfg.context_policy)
        return self

    def check_health(self) -> None:
        """Raises when the replica can't serve (Serve then replaces it)."""
        if not self.batcher._thread.is_alive():
            raise RuntimeError("the generation batcher thread is dead")
        if getattr(self.engine, "_closed", False):
            raise RuntimeError("the engine is closed")

    def close(self) -> None:
        self.poller.stop()
        self.batcher.stop()
        self.engine.close()

    # -------------------------------------------------------------- tenants
    def authenticate(self, key: Optional[str]) -> Principal:
        p = self.keys.authenticate(key)
        if p is None:
            raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                           type="authentication_error", code="invalid_api_key")
        return p

    def tenant_of(self, principal: Principal) -> Tenant:
        """The caller's own tenant, rate-limited (429 over ``serve.rate_limit_rps``)."""
        if principal.tenant is None:
            raise APIError(403, "this is an admin key: it manages tenants (/v1/tenants) and has no memory "
                                "or model of its own", type="permission_error", code="admin_key")
        wait = self.limiter.take(principal.tenant, principal.rate_limit_rps)
        if wait is not None:
            raise APIError(429, f"rate limit of tenant {principal.tenant!r} reached; retry in {wait:.2f}s",
                           type="rate_limit_error", code="rate_limit_exceeded", retry_after=wait)
        return self.tenants[principal.tenant]

    @staticmethod
    def _admin_only(principal: Principal, what: str) -> None:
        if not principal.admin:
            raise APIError(403, f"only an admin key may {what}", type="permission_error", code="not_admin")

    def admin_tenant(self, principal: Principal, name: str) -> Tenant:
        self._admin_only(principal, "manage tenants")
        if name not in self.tenants:
            raise APIError(404, f"no tenant {name!r}", code="tenant_not_found")
        return self.tenants[name]

    async def list_tenants(self, principal: Principal) -> dict:
        self._admin_only(principal, "list tenants")
        data = []
        for name, t in self.tenants.items():
            data.append({"id": name, "object": "tenant", "adapter_version": t.pointer.version,
                         "storage": str(t.storage.root)})
        return {"object": "list", "data": data}

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

    async def _context(self, t: Tenant, prompt: str, budget: int) -> list[MemoryItem]:
        rows = await t.memory.episodes("short_term")
        items = []
        for i, r in enumerate(rows):
            eid = r["episode_id"]
            if eid not in t.ntok:
                t.ntok[eid] = self.n_tokens(r["text"] + "\n", special=False)
            items.append(MemoryItem(eid, r["text"], t.ntok[eid], i))
        return select_context(items, prompt, budget, self.scfg.context_policy)

    async def _prepare(self, t: Tenant, prompt: str, max_tokens: int, use_ctx: bool):
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
            ctx = await self._context(t, prompt, self.max_len - n - max_tokens)
            full = with_context(ctx, prompt)
            while ctx and self.n_tokens(full) + max_tokens > self.max_len:
                ctx = ctx[1:]   # joins can tokenize a little longer than the parts
                full = with_context(ctx, prompt)
        return full, ctx, self.n_tokens(full)

    async def _record(self, t: Tenant, items: list[tuple[str, Optional[str]]], source: str) -> list[str]:
        """Record what the user sent (``(user text, model answer or None)``) into the tenant's
        memory; the answer goes to ``model_output``, which no sleep trains on."""
        recs = []
        for user, answer in items:
            if user.strip():
                recs.append({"episode_id": new_id("int"), "kind": "interaction", "text": user,
                             "documents": [user], "source": source, "model_output": answer,
                             "n_tokens": self.n_tokens(user, special=False)})
        if not recs:
            return []
        receipt = await t.memory.append(recs)   # durable before the response returns
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

    def _switches(self, record: bool, use_ctx: bool, answers: Optional[bool]) -> tuple[bool, bool, bool]:
        on = self.use_memory()
        return record and on, use_ctx and on, self.scfg.record_answers if answers is None else answers

    def _plan(self, req) -> tuple[list[str], int, list[str]]:
        """(prompts, max_tokens, stop strings) of a completion or chat request, checked against the
        model, the lengths and the server's token limit."""
        self.check_model(req.model)
        check_lengths(req, self.scfg)
        if isinstance(req, ChatRequest):
            prompt = render_chat(req.messages, self.tok)
            mt = req.requested_max_tokens
            if mt is not None:
                self._check_max_tokens(mt)
            else:  # default: as much as fits, up to the server's limit
                mt = max(1, min(self.scfg.max_tokens_limit, self.max_len - self.n_tokens(prompt)))
            return [prompt], mt, list(dict.fromkeys(req.stops + list(self.scfg.chat_stop)))
        mt = 16 if req.max_tokens is None else req.max_tokens
        self._check_max_tokens(mt)
        return req.prompts, mt, req.stops

    # -------------------------------------------------------------- completions
    async def complete(self, t: Tenant, req: CompletionRequest, record: bool, use_ctx: bool, endpoint: str,
                       answers: Optional[bool] = None):
        _, mt, _ = self._plan(req)
        record, use_ctx, answers = self._switches(record, use_ctx, answers)
        topk = req.logprobs or 0
        with t.pointer.use() as (version, adapter):
            prepared = [await self._prepare(t, p, mt, use_ctx) for p in req.prompts]
            results = []
            if mt > 0:
                reqs = [g for (full, _, _), p in zip(prepared, req.prompts)
                        for g in self._gen_requests(full, req, mt, adapter, req.stops, topk)]
                results = await self._generate(reqs)
            echoes = []
            if req.echo and req.logprobs is not None:
                echoes = [await self._score_prompt(ctx, p, topk, adapter)
                          for (_, ctx, _), p in zip(prepared, req.prompts)]
        choices, n_out, sent = [], 0, []
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
                    sent.append((p, g.text if answers else None))
        recorded = await self._record(t, sent, f"serve:{endpoint}") if record and sent else []
        extra = {"adapter_version": version,
                 "memory": {"context": sorted({c.episode_id for _, ctx, _ in prepared for c in ctx}),
                            "recorded": recorded}}
        resp = completion_response(new_id("cmpl"), self.model_id, choices,
                                   usage(sum(n for _, _, n in prepared), n_out), version, extra)
        return resp, version

    # -------------------------------------------------------------- chat
    async def chat(self, t: Tenant, req: ChatRequest, record: bool, use_ctx: bool, endpoint: str,
                   answers: Optional[bool] = None):
        (prompt,), mt, stops = self._plan(req)
        record, use_ctx, answers = self._switches(record, use_ctx, answers)
        topk = (req.top_logprobs or 0) if req.logprobs else 0
        with t.pointer.use() as (version, adapter):
            full, ctx, n_in = await self._prepare(t, prompt, mt, use_ctx)
            results = await self._generate(self._gen_requests(full, req, mt, adapter, stops, topk))
        choices = []
        for k, g in enumerate(results):
            content = g.text.strip()
            lp = None
            if req.logprobs:
                top = None
                if g.topk is not None and req.top_logprobs:
                    top = [[(self.tok.decode([t_]), v) for t_, v in row] for row in g.topk]
                lp = chat_logprobs(self.token_strings(g.token_ids), list(g.logprobs), top)
            choices.append({"index": k, "message": {"role": "assistant", "content": content},
                            "logprobs": lp, "finish_reason": g.finish_reason or "stop"})
        recorded = []
        if record:
            reply = choices[0]["message"]["content"] if answers else None
            recorded = await self._record(t, [(user_turns(req.messages), reply)], f"serve:{endpoint}")
        extra = {"adapter_version": version,
                 "memory": {"context": [c.episode_id for c in ctx], "recorded": recorded}}
        resp = chat_response(new_id("chatcmpl"), self.model_id, choices,
                             usage(n_in, sum(len(g.token_ids) for g in results)), version, extra)
        return resp, version

    # -------------------------------------------------------------- streaming
    async def stream(self, t: Tenant, req, record: bool, use_ctx: bool, endpoint: str,
                     answers: Optional[bool] = None):
        """``(version, async iterator of chunks)`` of a streamed completion or chat. Checks, the
        context and the version are settled before it returns (their errors are plain 4xx); then
        every chunk leaves as the engine makes its tokens. With ``echo`` or log-probs the answer is
        made whole first and then sent as chunks."""
        chat = isinstance(req, ChatRequest)
        include = bool(req.stream_options and req.stream_options.include_usage)
        if (req.logprobs if chat else (req.echo or req.logprobs is not None)):
            resp, version = await (self.chat if chat else self.complete)(t, req, record, use_ctx, endpoint, answers)
            return version, _aiter(chat_chunks(resp, include) if chat else completion_chunks(resp, include))
        prompts, mt, stops = self._plan(req)
        users = [user_turns(req.messages)] if chat else prompts
        record, use_ctx, answers = self._switches(record, use_ctx, answers)
        hold = t.pointer.use()
        version, adapter = hold.__enter__()
        try:
            prepared = [await self._prepare(t, p, mt, use_ctx) for p in prompts]
        except BaseException:
            hold.__exit__(None, None, None)
            raise
        reqs = [g for full, _, _ in prepared for g in self._gen_requests(full, req, mt, adapter, stops, 0)]
        base = {"id": new_id("chatcmpl" if chat else "cmpl"), "created": int(time.time()),
                "object": "chat.completion.chunk" if chat else "text_completion", "model": self.model_id,
                "system_fingerprint": version}
        done = _StreamDone(record, answers, users, req.n, endpoint, include, sum(n for _, _, n in prepared),
                           sorted({c.episode_id for _, ctx, _ in prepared for c in ctx}))
        return version, self._events(t, reqs, base, chat, hold, done)

    async def _events(self, t: Tenant, reqs: list[GenRequest], base: dict, chat: bool, hold, done: "_StreamDone"):
        texts = [ChatText() for _ in reqs]
        try:
            if chat:
                for i in range(len(reqs)):
                    yield stream_chunk(base, i, {"delta": {"role": "assistant", "content": ""}}, None, time.time())
            stream = DeltaStream(self.batcher, reqs)
            async for i, d in stream:
                piece = texts[i].feed(d.text) if chat else d.text
                finish = (d.finish_reason or "stop") if d.finished else None
                if piece or finish:
                    part = {"delta": {"content": piece} if piece else {}} if chat else {"text": piece}
                    yield stream_chunk(base, i, part, finish, d.t)
            results = await stream.results()
        except APIError as e:
            yield e.body()
            return
        except (ValueError, TypeError) as e:     # the engine's own input checks
            yield APIError(400, f"the engine rejected the request: {e}").body()
            return
        finally:
            hold.__exit__(None, None, None)
        recorded = []
        if done.record:
            sent = [(u, (results[k * done.n].text.strip() if chat else results[k * done.n].text)
                     if done.answers else None) for k, u in enumerate(done.users)]
            recorded = await self._record(t, sent, f"serve:{done.endpoint}")
        if done.include_usage:
            yield {**base, "choices": [], "usage": usage(done.n_in, sum(len(g.token_ids) for g in results)),
                   "memory": {"context": done.context, "recorded": recorded}}

    # -------------------------------------------------------------- models
    def models(self, t: Tenant) -> dict:
        return {"object": "list", "data": [self.model_card(t)]}

    def model_card(self, t: Tenant) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "sleepray",
                "adapter_version": t.pointer.version, "max_model_len": self.max_len}

    # -------------------------------------------------------------- memories
    async def add_memory(self, t: Tenant, body: MemoryCreate) -> dict:
        check_lengths(body, self.scfg)
        if body.id is not None and await t.memory.status_of(body.id) is not None:
            raise APIError(409, f"a memory with id {body.id!r} already exists", param="id")
        rec = body.record(0)
        rec["n_tokens"] = self.n_tokens(rec["text"], special=False)
        try:
            receipt = await t.memory.append([rec])
        except ValueError as e:
            raise APIError(400, f"memory rejected: {str(e).strip().splitlines()[-1][:300]}") from None
        log.info("tenant %s: memory %s added (%d tokens), durable in %s", t.name, rec["episode_id"],
                 rec["n_tokens"], receipt["segment"])
        rows = [r for r in await t.memory.episodes("short_term") if r["episode_id"] == rec["episode_id"]]
        return memory_object(rows[0] if rows else {**rec, "created_at": None}, "short_term")

    async def list_memories(self, t: Tenant, status: str, kind: Optional[str]) -> dict:
        statuses = {"all": ["short_term", "consolidated"], "short_term": ["short_term"],
                    "consolidated": ["consolidated"], "deleted": ["deleted"]}
        if status not in statuses:
            raise APIError(400, f"status must be one of {sorted(statuses)}, got {status!r}", param="status")
        kinds = ("document", "interaction", "episode")
        if kind is not None and kind not in kinds:
            raise APIError(400, f"kind must be one of {list(kinds)}, got {kind!r}", param="kind")
        data = []
        for st in statuses[status]:
            data += [memory_object(r, st) for r in await t.memory.episodes(st)
                     if kind is None or r["kind"] == kind]
        return {"object": "list", "data": data}

    async def delete_memory(self, t: Tenant, memory_id: str) -> dict:
        """A short-term memory is never consolidated; a consolidated one is deleted and the tenant's
        next sleep rebuilds its experts without it (``sleepray.forget``), asked for now."""
        st = await t.memory.status_of(memory_id)
        if st is None:
            raise APIError(404, f"no memory with id {memory_id!r}", code="memory_not_found")
        out = {"id": memory_id, "object": "memory", "deleted": True, "was": st}
        if st != "deleted":
            await t.memory.delete([memory_id], reason="deleted through /v1/memories")
            t.ntok.pop(memory_id, None)
        if st == "short_term":
            log.info("tenant %s: memory %s deleted: it will never be consolidated", t.name, memory_id)
        elif st == "consolidated":
            sleep = dict(await t.control.request_sleep("forget"))
            out["rebuild"] = {"requested": True, "accepted": bool(sleep.get("accepted")),
                              "message": "the next sleep rebuilds this tenant's experts without it; "
                                         "until a version without it is published it is still in the "
                                         "served weights"}
            log.info("tenant %s: consolidated memory %s deleted; rebuild asked (accepted=%s)",
                     t.name, memory_id, sleep.get("accepted"))
        return out

    # -------------------------------------------------------------- sleep
    async def sleep_status(self, t: Tenant) -> dict:
        st = dict(await t.control.status())
        st["serving_adapter"] = t.pointer.version
        st["tenant"] = t.name
        return st

    async def request_sleep(self, t: Tenant, reason: str) -> dict:
        return {**dict(await t.control.request_sleep(reason)), "tenant": t.name}
