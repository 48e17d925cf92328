"""The awake endpoint's HTTP contract, without Ray and without an engine.

* Request models (pydantic, strict types) for the OpenAI-compatible ``/v1/completions``
  and ``/v1/chat/completions`` and for ``/v1/memories``; ``parse_body`` turns any bad
  body into an :class:`APIError` (4xx, OpenAI error shape) with a message naming the
  field, so that bad input never becomes a 500.
* Response builders in the OpenAI shapes (completion, chat completion, their stream
  chunks, legacy ``logprobs`` with ``text_offset``, server-sent events).
* The short-term-memory context policy: ``select_context`` picks the episodes that go
  into a request's context within a token budget (all of them while they fit, else the
  newest or the most relevant to the prompt).
* ``render_chat``: chat messages as a plain prompt (the tokenizer's chat template when
  it has one, else the seed model's ``Q: ...\\nA:`` format).

Extensions to the OpenAI request bodies (pass them with the client's ``extra_body``):
``memory`` (bool: record this interaction into the short-term memory) and
``memory_context`` (bool: put the short-term memory into this request's context).
The headers ``x-sleepray-memory`` and ``x-sleepray-memory-context`` (``on``/``off``)
do the same; the body wins when both are given.
"""
from __future__ import annotations

import json
import math
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MAX_PROMPTS = 16          # prompts in one /v1/completions request
MAX_CHOICES = 32          # n * prompts
MAX_STOPS = 4
MAX_LOGPROBS = 20
MAX_MESSAGES = 256
MAX_SEED = 2**63 - 1
MAX_STOP_CHARS = 200


class APIError(Exception):
    """An error answered to the client as ``{"error": {...}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None,
                 retry_after: Optional[float] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.retry_after = retry_after

    def headers(self) -> dict:
        return {} if self.retry_after is None else {"retry-after": str(max(1, math.ceil(self.retry_after)))}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


# ----------------------------------------------------------------------------- requests
class _Body(BaseModel):
    # unknown fields are ignored (as OpenAI-compatible servers do); known ones are typed strictly
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class _GenBody(_Body):
    model: str = Field(min_length=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=8)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = Field(None, max_length=256)
    memory: Optional[bool] = Field(None, description="record this interaction (default: serve.memory)")
    memory_context: Optional[bool] = Field(None, description="put the short-term memory in context")
    record_answers: Optional[bool] = Field(None, description="also record the model's answer, marked as "
                                                             "model output (default: serve.record_answers)")

    @model_validator(mode="after")
    def _common(self):
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"stop: at most {MAX_STOPS} stop strings, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop: stop strings must not be empty")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0:
                raise ValueError(f"{name}: only 0 is supported")
        if self.logit_bias:
            raise ValueError("logit_bias: not supported")
        return self

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_GenBody):
    prompt: Union[str, list[str]]
    max_tokens: Optional[int] = Field(16, ge=0)
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: Optional[str] = None
    best_of: Optional[int] = None

    @model_validator(mode="after")
    def _completion(self):
        if isinstance(self.prompt, list):
            if not self.prompt:
                raise ValueError("prompt: the list of prompts is empty")
            if len(self.prompt) > MAX_PROMPTS:
                raise ValueError(f"prompt: at most {MAX_PROMPTS} prompts per request")
        if self.n * len(self.prompts) > MAX_CHOICES:
            raise ValueError(f"n * number of prompts must be <= {MAX_CHOICES}")
        if self.suffix:
            raise ValueError("suffix: not supported")
        if self.best_of not in (None, self.n):
            raise ValueError("best_of: only best_of == n is supported")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 is only allowed with echo=true (scoring the prompt)")
        if self.max_tokens == 0 and self.stream:
            raise ValueError("max_tokens: 0 can't be streamed")
        return self

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatRequest(_GenBody):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _chat(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs=true")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise ValueError("give max_tokens or max_completion_tokens, not two different values")
        return self

    @property
    def requested_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class MemoryCreate(_Body):
    """POST /v1/memories: one document memory (knowledge to learn in the next sleep)."""
    model_config = ConfigDict(extra="forbid", strict=True)
    text: Optional[str] = None
    documents: Optional[list[str]] = Field(None, min_length=1, max_length=256)
    id: Optional[str] = Field(None, min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:\-]+$")
    source: Optional[str] = Field(None, max_length=200)

    @model_validator(mode="before")
    @classmethod
    def _no_questions(cls, data):
        if isinstance(data, dict) and "questions" in data:
            raise ValueError("questions: a memory is documents only; questions are evaluation data and never "
                             "enter memory (a sleep writes its own questions about the documents)")
        return data

    @model_validator(mode="after")
    def _one_of(self):
        if (self.text is None) == (self.documents is None):
            raise ValueError("give exactly one of 'text' or 'documents'")
        docs = self.documents if self.documents is not None else [self.text]
        if not any(d.strip() for d in docs):
            raise ValueError("the memory is empty")
        return self

    def record(self, n_tokens: int) -> dict:
        """As a MemoryStore record of kind "document"."""
        docs = [d for d in (self.documents if self.documents is not None else [self.text]) if d.strip()]
        return {"episode_id": self.id or new_id("mem"), "kind": "document", "text": "\n".join(docs),
                "documents": docs,
                "source": self.source or "serve:/v1/memories", "n_tokens": int(n_tokens)}


class SleepRequest(_Body):
    reason: str = Field("requested through /v1/sleep", max_length=500)


def _format_validation(err: ValidationError) -> str:
    parts = []
    for e in err.errors(include_url=False)[:8]:
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-after"))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def _no_constants(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _valid_unicode(obj) -> bool:
    """No lone surrogates ("\\ud800" is valid JSON, but no tokenizer or file takes it)."""
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
    return True


def parse_body(model_cls: type[BaseModel], raw: bytes):
    """Parse and validate a JSON body; every failure is an ``APIError(400)``."""
    if not raw or not raw.strip():
        raise APIError(400, "request body is empty: send a JSON object")
    try:
        data = json.loads(raw, parse_constant=_no_constants)
    except (ValueError, RecursionError) as e:
        raise APIError(400, f"request body is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(data, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(data).__name__}")
    if not _valid_unicode(data):
        raise APIError(400, "request body has a string that is not valid Unicode (a lone surrogate)")
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        raise APIError(400, f"invalid request: {_format_validation(e)}") from None
    except (RecursionError, ValueError, TypeError) as e:
        raise APIError(400, f"invalid request: {str(e)[:200]}") from None


def _too_long(field: str, n: int, limit: int, knob: str) -> APIError:
    return APIError(422, f"{field} is {n} characters, over this server's limit of {limit} ({knob})",
                    param=field, code="string_above_max_length")


def check_lengths(body, scfg) -> None:
    """422 for a prompt, chat or memory longer than the server takes: checked on characters,
    before anything is tokenized (``serve.max_prompt_chars``, ``serve.max_memory_chars``)."""
    if isinstance(body, CompletionRequest):
        for i, p in enumerate(body.prompts):
            if len(p) > scfg.max_prompt_chars:
                raise _too_long("prompt" if isinstance(body.prompt, str) else f"prompt.{i}", len(p),
                                scfg.max_prompt_chars, "serve.max_prompt_chars")
    elif isinstance(body, ChatRequest):
        n = sum(len(m.text) for m in body.messages)
        if n > scfg.max_prompt_chars:
            raise _too_long("messages", n, scfg.max_prompt_chars, "serve.max_prompt_chars")
    elif isinstance(body, MemoryCreate):
        n = sum(len(d) for d in (body.documents if body.documents is not None else [body.text]))
        if n > scfg.max_memory_chars:
            raise _too_long("documents" if body.documents is not None else "text", n,
                            scfg.max_memory_chars, "serve.max_memory_chars")
    for s in getattr(body, "stops", []):
        if len(s) > MAX_STOP_CHARS:
            raise _too_long("stop", len(s), MAX_STOP_CHARS, "a fixed limit")


def user_turns(messages: list[ChatMessage]) -> str:
    """What the user sent in this request: the user messages after the last assistant message
    (a client resends the whole conversation every turn; earlier turns were recorded then)."""
    last = max((i for i, m in enumerate(messages) if m.role == "assistant"), default=-1)
    return "\n".join(m.text for m in messages[last + 1:] if m.role == "user" and m.text.strip())


def flag(body_value: Optional[bool], header: Optional[str], default: Optional[bool]) -> Optional[bool]:
    """A per-request on/off switch: the body field, else the header, else the default."""
    if body_value is not None:
        return bool(body_value)
    if header is not None:
        h = header.strip().lower()
        if h in ("0", "off", "false", "no"):
            return False
        if h in ("1", "on", "true", "yes"):
            return True
        raise APIError(400, f"header value {header!r} must be on/off")
    return default


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


# ----------------------------------------------------------------------------- chat
def render_chat(messages: list[ChatMessage], tokenizer=None) -> str:
    """Messages as one prompt ending where the assistant's reply begins."""
    msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in messages]
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # a template that refuses these messages (e.g. role order)
            raise APIError(400, f"the model's chat template rejects these messages: {e}") from None
    out = []
    for m in msgs:
        if m["role"] == "system":
            out.append(f"{m['content']}\n")
        elif m["role"] == "user":
            out.append(f"Q: {m['content']}\n")
        else:
            out.append(f"A: {m['content']}\n")
    return "".join(out) + "A:"


# ----------------------------------------------------------------------------- context
@dataclass(frozen=True)
class MemoryItem:
    episode_id: str
    text: str
    n_tokens: int            # tokens of ``text`` plus its separator
    order: int               # append order (0 = oldest)


_WORD = re.compile(r"[a-z0-9]+")
_STOP = frozenset("a an the of in on at to is was were be by for and or what who which where when "
                  "how did does do q". split())


def _words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in _STOP}


def relevance(prompt: str, text: str) -> float:
    """Token overlap (share of the prompt's content words found in ``text``), with a
    fuzzy-match tie-breaker (rapidfuzz token_set_ratio)."""
    from rapidfuzz import fuzz
    pw = _words(prompt)
    overlap = len(pw & _words(text)) / len(pw) if pw else 0.0
    return overlap + 0.001 * fuzz.token_set_ratio(prompt, text) / 100.0


def select_context(items: list[MemoryItem], prompt: str, budget: int, policy: str) -> list[MemoryItem]:
    """The episodes to put in the context, in append order, within ``budget`` tokens.

    All of them when they fit. Otherwise ``all``/``recent`` keep the newest that fit and
    ``relevant`` the most relevant to ``prompt`` (ties: newer first)."""
    if policy not in ("all", "recent", "relevant"):
        raise ValueError(f"unknown context policy {policy!r}")
    if budget <= 0 or not items:
        return []
    if sum(i.n_tokens for i in items) <= budget:
        return sorted(items, key=lambda i: i.order)
    if policy == "relevant":
        ranked = sorted(items, key=lambda i: (-relevance(prompt, i.text), -i.order))
    else:
        ranked = sorted(items, key=lambda i: -i.order)
    chosen, used = [], 0
    for it in ranked:
        if used + it.n_tokens <= budget:
            chosen.append(it)
            used += it.n_tokens
    return sorted(chosen, key=lambda i: i.order)


def with_context(context: list[MemoryItem], prompt: str) -> str:
    """The model input: the memory (one episode a line block) then the prompt, as the seed
    model reads facts followed by a question (``sleepray.world.qa_prompt``)."""
    if not context:
        return prompt
    return "\n".join(i.text for i in context) + "\n" + prompt


# ----------------------------------------------------------------------------- responses
def completion_logprobs(tokens: list[str], token_logprobs: list[Optional[float]],
                        top: Optional[list[dict]], start_offset: int = 0) -> dict:
    """The legacy completions ``logprobs`` object."""
    offsets, pos = [], start_offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": token_logprobs,
            "top_logprobs": top, "text_offset": offsets}


def merge_logprobs(a: dict, b: dict) -> dict:
    out = {k: a[k] + b[k] for k in ("tokens", "token_logprobs", "text_offset")}
    out["top_logprobs"] = (a["top_logprobs"] or []) + (b["top_logprobs"] or []) \
        if (a["top_logprobs"] is not None or b["top_logprobs"] is not None) else None
    return out


def chat_logprobs(tokens: list[str], logprobs: list[float], top: Optional[list[list[tuple[str, float]]]]) -> dict:
    content = []
    for j, (t, lp) in enumerate(zip(tokens, logprobs)):
        content.append({"token": t, "logprob": lp, "bytes": list(t.encode("utf-8", "replace")),
                        "top_logprobs": [{"token": s, "logprob": v, "bytes": list(s.encode("utf-8", "replace"))}
                                         for s, v in (top[j] if top else [])]})
    return {"content": content}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_response(rid: str, model: str, choices: list[dict], use: dict, fingerprint: str,
                        extra: Optional[dict] = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": use, "system_fingerprint": fingerprint, **(extra or {})}


def chat_response(rid: str, model: str, choices: list[dict], use: dict, fingerprint: str,
                  extra: Optional[dict] = None) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": use, "system_fingerprint": fingerprint, **(extra or {})}


def text_pieces(text: str) -> list[str]:
    """Split a finished generation into stream deltas (a word and its trailing space each);
    the pieces concatenate back to ``text`` exactly."""
    return re.findall(r"\s*\S+\s*|\s+", text) or [""]


def completion_chunks(resp: dict, include_usage: bool) -> list[dict]:
    """A finished completion response as the chunks of its stream."""
    base = {k: resp[k] for k in ("id", "object", "created", "model", "system_fingerprint")}
    out = []
    for c in resp["choices"]:
        pieces = text_pieces(c["text"])
        for j, piece in enumerate(pieces):
            last = j == len(pieces) - 1
            out.append({**base, "choices": [{"index": c["index"], "text": piece, "logprobs": None,
                                             "finish_reason": c["finish_reason"] if last else None}],
                        "usage": None})
    if include_usage:
        out.append({**base, "choices": [], "usage": resp["usage"]})
    return out


def chat_chunks(resp: dict, include_usage: bool) -> list[dict]:
    base = {k: resp[k] for k in ("id", "created", "model", "system_fingerprint")}
    base["object"] = "chat.completion.chunk"
    out = []
    for c in resp["choices"]:
        out.append({**base, "choices": [{"index": c["index"], "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}], "usage": None})
        for piece in text_pieces(c["message"]["content"]):
            out.append({**base, "choices": [{"index": c["index"], "delta": {"content": piece},
                                             "logprobs": None, "finish_reason": None}], "usage": None})
        out.append({**base, "choices": [{"index": c["index"], "delta": {}, "logprobs": None,
                                         "finish_reason": c["finish_reason"]}], "usage": None})
    if include_usage:
        out.append({**base, "choices": [], "usage": resp["usage"]})
    return out


def stream_chunk(base: dict, index: int, part: dict, finish: Optional[str], engine_time: float) -> dict:
    """One chunk of a real stream: ``part`` is ``{"text": ...}`` (completions) or ``{"delta": ...}``
    (chat); ``engine_time`` is when the engine made its tokens (``time.time()``)."""
    return {**base, "choices": [{"index": index, **part, "logprobs": None, "finish_reason": finish}],
            "usage": None, "engine_time": engine_time}


def sse(obj: Any) -> str:
    """One server-sent event (``data: ...``); ``sse("[DONE]")`` ends a stream."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


def memory_object(row: dict, status: str) -> dict:
    created = row.get("created_at")
    return {"id": row["episode_id"], "object": "memory", "kind": row["kind"], "status": status,
            "text": row["text"], "documents": list(row.get("documents") or []),
            "source": row.get("source") or "", "n_tokens": row.get("n_tokens"),
            "model_output": row.get("model_output"),
            "created_at": created.isoformat() if hasattr(created, "isoformat") else created}
