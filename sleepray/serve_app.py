"""The FastAPI app of the awake endpoint, over an :class:`~sleepray.awake.AwakeService`.

Routes (OpenAI-compatible where OpenAI has them):

| route | what |
|---|---|
| ``GET /v1/models``, ``GET /v1/models/{id}`` | the served model and its adapter version |
| ``POST /v1/completions`` | completions; ``echo`` + ``logprobs`` (+ ``max_tokens=0``) scores a prompt |
| ``POST /v1/chat/completions`` | chat completions |
| ``POST /v1/memories`` | add a document memory (``text`` or ``documents``, optional ``id``) |
| ``GET /v1/memories`` | list memories (``?status=all|short_term|consolidated|deleted&kind=...``) |
| ``DELETE /v1/memories/{id}`` | delete a memory: short-term, never consolidated; consolidated, rebuilt without |
| ``GET /v1/sleep/status`` | phase, memory pressure, adapter version, last sleep |
| ``POST /v1/sleep`` | ask for a sleep (``{"reason": ...}`` optional) |
| ``GET /v1/tenants`` | admin: every tenant and the version it serves |
| ``GET /v1/tenants/{t}/sleep/status``, ``POST /v1/tenants/{t}/sleep`` | admin: a tenant's sleep |
| ``GET /health`` | liveness (no key needed) |

Every ``/v1`` route but the admin ones acts on the caller's own tenant (its key's; the
tenant "default" when no key is configured): its memories, its sleeps, its adapter.

Streaming (``"stream": true``) answers with server-sent events in OpenAI's chunk format, each
chunk sent as the engine makes its tokens (``engine_time`` in each chunk: when it did); with
``echo`` or log-probs the answer is made whole first, then sent as chunks.

Limits, checked before any tokenizing: a body over ``serve.max_body_bytes`` is refused
unread (413), a prompt / chat / memory over ``serve.max_prompt_chars`` /
``serve.max_memory_chars`` gets 422, a tenant over its rate gets 429 with
``retry-after``. A missing or unknown key is 401, a key that may not do this 403. Every
error has an OpenAI-style ``{"error": {...}}`` body.
"""
from __future__ import annotations

import logging
from typing import Optional

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sleepray.serve_api import (APIError, ChatRequest, CompletionRequest, MemoryCreate, SleepRequest, flag,
                                parse_body, sse)
from sleepray.tenants import Principal

log = logging.getLogger(__name__)

ADAPTER_HEADER = "x-sleepray-adapter"
REPLICA_HEADER = "x-sleepray-replica"     # which replica answered (several replicas, one storage)


def _error(status: int, message: str, type: str, code: Optional[str] = None) -> JSONResponse:
    return JSONResponse(APIError(status, message, type, code=code).body(), status_code=status)


def build_app(service) -> FastAPI:
    app = FastAPI(title="sleepray awake endpoint", docs_url=None, redoc_url=None, openapi_url=None)
    limit = service.scfg.max_body_bytes

    def principal(request: Request) -> Principal:
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
        return service.authenticate(given)

    def tenant(p: Principal = Depends(principal)):
        return service.tenant_of(p)

    async def read_body(request: Request) -> bytes:
        """The body, refused with 413 past ``serve.max_body_bytes`` without reading the rest."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"the request body is {declared} bytes, over this server's limit of {limit} "
                                "(serve.max_body_bytes)", code="request_too_large")
        chunks, n = [], 0
        async for c in request.stream():
            n += len(c)
            if n > limit:
                raise APIError(413, f"the request body is over this server's limit of {limit} bytes "
                                    "(serve.max_body_bytes)", code="request_too_large")
            chunks.append(c)
        return b"".join(chunks)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        if e.status >= 500:
            log.error("%s %s: %s", request.method, request.url.path, e.message)
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers())

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        msg = "; ".join(f"{'.'.join(str(p) for p in x['loc'])}: {x['msg']}" for x in e.errors()[:8])
        return _error(400, f"invalid request: {msg}", "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        return _error(e.status_code, str(e.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        return _error(500, f"internal error: {type(e).__name__}: {str(e)[:300]}", "server_error")

    def switches(request: Request, body) -> tuple[bool, bool, Optional[bool]]:
        h = request.headers
        record = flag(body.memory, h.get("x-sleepray-memory"), True)
        use_ctx = flag(body.memory_context, h.get("x-sleepray-memory-context"), True)
        answers = flag(body.record_answers, h.get("x-sleepray-record-answers"), None)   # None: the config's
        return record, use_ctx, answers

    def headers(version: str) -> dict:
        return {ADAPTER_HEADER: version, REPLICA_HEADER: service.replica}

    async def streamed(t, body, request: Request, endpoint: str):
        record, use_ctx, answers = switches(request, body)
        version, chunks = await service.stream(t, body, record, use_ctx, endpoint, answers)

        async def events():
            async for c in chunks:
                yield sse(c)
            yield sse("[DONE]")
        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={**headers(version), "cache-control": "no-cache"})

    @app.get("/health")
    async def health():
        return {"status": "ok", "tenants": len(service.tenants)}

    @app.get("/v1/models")
    async def models(t=Depends(tenant)):
        return JSONResponse(service.models(t), headers=headers(t.pointer.version))

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, t=Depends(tenant)):
        service.check_model(model_id)
        return JSONResponse(service.model_card(t), headers=headers(t.pointer.version))

    async def generate(request: Request, t, schema, endpoint: str):
        body = parse_body(schema, await read_body(request))
        if body.stream:
            return await streamed(t, body, request, endpoint)
        record, use_ctx, answers = switches(request, body)
        run = service.chat if schema is ChatRequest else service.complete
        resp, version = await run(t, body, record, use_ctx, endpoint, answers)
        return JSONResponse(resp, headers=headers(version))

    @app.post("/v1/completions")
    async def completions(request: Request, t=Depends(tenant)):
        return await generate(request, t, CompletionRequest, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat(request: Request, t=Depends(tenant)):
        return await generate(request, t, ChatRequest, "/v1/chat/completions")

    @app.post("/v1/memories", status_code=201)
    async def add_memory(request: Request, t=Depends(tenant)):
        body = parse_body(MemoryCreate, await read_body(request))
        return JSONResponse(await service.add_memory(t, body), status_code=201)

    @app.get("/v1/memories")
    async def list_memories(status: str = "all", kind: Optional[str] = None, t=Depends(tenant)):
        return await service.list_memories(t, status, kind)

    @app.delete("/v1/memories/{memory_id}")
    async def delete_memory(memory_id: str, t=Depends(tenant)):
        return await service.delete_memory(t, memory_id)

    @app.get("/v1/sleep/status")
    async def sleep_status(t=Depends(tenant)):
        return await service.sleep_status(t)

    @app.post("/v1/sleep")
    async def sleep(request: Request, t=Depends(tenant)):
        raw = await read_body(request)
        body = parse_body(SleepRequest, raw) if raw.strip() else SleepRequest()
        return await service.request_sleep(t, body.reason)

    @app.get("/v1/tenants")
    async def tenants(p: Principal = Depends(principal)):
        return await service.list_tenants(p)

    @app.get("/v1/tenants/{name}/sleep/status")
    async def tenant_sleep_status(name: str, p: Principal = Depends(principal)):
        return await service.sleep_status(service.admin_tenant(p, name))

    @app.post("/v1/tenants/{name}/sleep")
    async def tenant_sleep(name: str, request: Request, p: Principal = Depends(principal)):
        t = service.admin_tenant(p, name)
        raw = await read_body(request)
        body = parse_body(SleepRequest, raw) if raw.strip() else SleepRequest()
        return await service.request_sleep(t, body.reason)

    return app
