"""The FastAPI app of the awake endpoint, over an :class:`~sleepray.awake.AwakeService`.

Routes (OpenAI-compatible where OpenAI has them):

| route | what |
|---|---|
| ``GET /v1/models``, ``GET /v1/models/{id}`` | the served model and its adapter version |
| ``POST /v1/completions`` | completions; ``echo`` + ``logprobs`` (+ ``max_tokens=0``) scores a prompt |
| ``POST /v1/chat/completions`` | chat completions |
| ``POST /v1/memories`` | add a document memory (``text`` or ``documents``, optional ``questions``, ``id``) |
| ``GET /v1/memories`` | list memories (``?status=all|short_term|consolidated|deleted&kind=...``) |
| ``DELETE /v1/memories/{id}`` | delete a short-term memory: it is never consolidated |
| ``GET /v1/sleep/status`` | phase, memory pressure, adapter version, last sleep |
| ``POST /v1/sleep`` | ask for a sleep (``{"reason": ...}`` optional) |
| ``GET /health`` | liveness (no key needed) |

Streaming (``"stream": true``) answers with server-sent events in OpenAI's chunk
format. The engine interface is not incremental: the whole generation is made first
(and recorded into the memory), then sent as a stream of word-sized chunks.

With ``serve.api_key`` set, every ``/v1`` route needs ``Authorization: Bearer KEY``
(401 otherwise). Bad input is a 4xx with an OpenAI-style ``{"error": {...}}`` body.
"""
from __future__ import annotations

import hmac
import logging
from typing import Optional

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sleepray.serve_api import (APIError, ChatRequest, CompletionRequest, MemoryCreate, SleepRequest,
                                chat_chunks, completion_chunks, flag, parse_body, sse)

log = logging.getLogger(__name__)

ADAPTER_HEADER = "x-sleepray-adapter"


def _error(status: int, message: str, type: str, code: Optional[str] = None) -> JSONResponse:
    return JSONResponse(APIError(status, message, type, code=code).body(), status_code=status)


def build_app(service) -> FastAPI:
    app = FastAPI(title="sleepray awake endpoint", docs_url=None, redoc_url=None, openapi_url=None)
    key = service.scfg.api_key

    def check_key(request: Request) -> None:
        if not key:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
        if not given or not hmac.compare_digest(given.encode(), key.encode()):
            raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                           type="authentication_error", code="invalid_api_key")

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        if e.status >= 500:
            log.error("%s %s: %s", request.method, request.url.path, e.message)
        return JSONResponse(e.body(), status_code=e.status)

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

    def switches(request: Request, body) -> tuple[bool, bool]:
        h = request.headers
        record = flag(body.memory, h.get("x-sleepray-memory"), True)
        use_ctx = flag(body.memory_context, h.get("x-sleepray-memory-context"), True)
        return record, use_ctx

    def answer(resp: dict, version: str, stream: bool, chunks) -> object:
        headers = {ADAPTER_HEADER: version}
        if not stream:
            return JSONResponse(resp, headers=headers)

        async def events():
            for c in chunks:
                yield sse(c)
            yield sse("[DONE]")
        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={**headers, "cache-control": "no-cache"})

    auth = [Depends(check_key)]

    @app.get("/health")
    async def health():
        return {"status": "ok", "adapter_version": service.pointer.version}

    @app.get("/v1/models", dependencies=auth)
    async def models():
        return JSONResponse(service.models(), headers={ADAPTER_HEADER: service.pointer.version})

    @app.get("/v1/models/{model_id:path}", dependencies=auth)
    async def model(model_id: str):
        service.check_model(model_id)
        return JSONResponse(service.model_card(), headers={ADAPTER_HEADER: service.pointer.version})

    @app.post("/v1/completions", dependencies=auth)
    async def completions(request: Request):
        body = parse_body(CompletionRequest, await request.body())
        record, use_ctx = switches(request, body)
        resp, version = await service.complete(body, record, use_ctx, "/v1/completions")
        include = bool(body.stream_options and body.stream_options.include_usage)
        return answer(resp, version, body.stream,
                      completion_chunks(resp, include) if body.stream else None)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat(request: Request):
        body = parse_body(ChatRequest, await request.body())
        record, use_ctx = switches(request, body)
        resp, version = await service.chat(body, record, use_ctx, "/v1/chat/completions")
        include = bool(body.stream_options and body.stream_options.include_usage)
        return answer(resp, version, body.stream, chat_chunks(resp, include) if body.stream else None)

    @app.post("/v1/memories", dependencies=auth, status_code=201)
    async def add_memory(request: Request):
        body = parse_body(MemoryCreate, await request.body())
        return JSONResponse(await service.add_memory(body), status_code=201)

    @app.get("/v1/memories", dependencies=auth)
    async def list_memories(status: str = "all", kind: Optional[str] = None):
        return await service.list_memories(status, kind)

    @app.delete("/v1/memories/{memory_id}", dependencies=auth)
    async def delete_memory(memory_id: str):
        return await service.delete_memory(memory_id)

    @app.get("/v1/sleep/status", dependencies=auth)
    async def sleep_status():
        return await service.sleep_status()

    @app.post("/v1/sleep", dependencies=auth)
    async def sleep(request: Request):
        raw = await request.body()
        body = parse_body(SleepRequest, raw) if raw.strip() else SleepRequest()
        return await service.request_sleep(body.reason)

    return app
