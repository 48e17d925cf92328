"""One generation interface, two implementations (vLLM and plain transformers).

Both engines

* generate with per-token log-probs of the SAMPLED tokens (and optional top-k lists),
* score given continuation tokens under a context (teacher log-probs for GKD),
* switch LoRA adapters per request, without restarting (``load_adapter(name, path)``
  registers a version; a request picks it with ``adapter=name``; ``None`` = base).

Log-prob semantics (identical in both engines): every log-prob is
``log_softmax(logits)`` of the model in float32, i.e. of the model's own distribution at
temperature 1 without top-p filtering, whatever temperature/top_p the request samples
with (vLLM's default ``logprobs_mode="raw_logprobs"``). Top-k lists are the k most
likely tokens of that distribution, most likely first, as ``(token_id, logprob)``.

Streaming: ``generate(requests, on_delta=fn)`` calls ``fn(i, GenDelta)`` from the generating
thread each time the engine has produced new tokens of ``requests[i]`` (vLLM: every engine
step; transformers: every decoding step). Guarantees, in both engines:

* every generated token is in exactly one delta, in order; the concatenated ``token_ids`` /
  ``logprobs`` / ``topk`` of a request's deltas equal its ``GenResult``'s;
* the concatenated ``text`` pieces equal ``GenResult.text``. A piece is already detokenized;
  while a request has stop strings, the last ``max(len(stop)) - 1`` characters are held back
  until they are known not to start a stop string (vLLM's own rule), so a stop string (or its
  start) is never sent; an incomplete UTF-8 tail is held back too. A delta may therefore carry
  tokens with ``text == ""``;
* the last delta of each request, and only it, has ``finished=True`` and the
  ``finish_reason`` of the result; ``t`` is ``time.time()`` when the engine produced the tokens;
* the return value is the same with or without ``on_delta`` (same batches, same seeds);
* an exception raised by ``on_delta`` aborts the requests still running in the engine and
  propagates out of ``generate``; the engine stays usable.

``on_delta`` runs in the generating thread while the engine's lock is held, between engine
steps: it should only hand the delta on (e.g. ``loop.call_soon_threadsafe``) and must not call
the engine. Deltas of different requests interleave; where an engine runs a call as several
batches in turn (vLLM on CPU: base, then adapter requests; transformers: per adapter and
``batch_size`` chunk) a later batch's first delta comes after the earlier batch's last.

Tokenization: a prompt / score context is tokenized with the model's tokenizer and its
special tokens (BOS); a string ``continuation`` is tokenized on its own without special
tokens and appended (pass ``continuation_ids`` to score exact tokens, e.g. a sample's).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Callable, Optional

from sleepray.config import EngineConfig

__all__ = ["GenRequest", "GenResult", "GenDelta", "OnDelta", "ScoreRequest", "ScoreResult", "Engine",
           "DEFAULT_MAX_LORA_RANK"]

DEFAULT_MAX_LORA_RANK = 64
TopK = list[list[tuple[int, float]]]


@dataclass
class GenRequest:
    prompt: str
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    logprobs_topk: int = 0
    adapter: Optional[str] = None
    seed: Optional[int] = None
    stop: Optional[list[str]] = None

    def validate(self) -> None:
        if not isinstance(self.prompt, str):
            raise TypeError(f"prompt must be a str, got {type(self.prompt).__name__}")
        if int(self.max_tokens) < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.logprobs_topk < 0:
            raise ValueError(f"logprobs_topk must be >= 0, got {self.logprobs_topk}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None and any((not isinstance(s, str)) or s == "" for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")


@dataclass
class GenResult:
    text: str
    token_ids: list[int]
    logprobs: list[float]                  # of the sampled tokens
    topk: Optional[TopK]                   # per generated position, or None (logprobs_topk == 0)
    adapter: Optional[str]
    finish_reason: Optional[str] = None    # "stop" (EOS or stop string) or "length"


@dataclass
class GenDelta:
    """New output of one request while it is generated (see "Streaming" in the module docstring)."""
    text: str                              # new text piece ("" while held back)
    token_ids: list[int]                   # the new tokens
    logprobs: list[float]                  # of the new tokens
    t: float                               # time.time() when the engine produced them
    finished: bool = False                 # True on the request's last delta only
    finish_reason: Optional[str] = None    # set when finished, as GenResult.finish_reason
    topk: Optional[TopK] = None            # per new token, or None (logprobs_topk == 0)


OnDelta = Callable[[int, GenDelta], None]


def stream_holdback(stop: Optional[list[str]]) -> int:
    """Characters held back from a running request's text so that no piece is the start of a
    stop string (vLLM's ``stop_buffer_length``)."""
    return max(len(s) for s in stop) - 1 if stop else 0


@dataclass
class ScoreRequest:
    context: str
    continuation_ids: Optional[list[int]] = None
    continuation: Optional[str] = None
    logprobs_topk: int = 0
    adapter: Optional[str] = None

    def validate(self) -> None:
        if not isinstance(self.context, str):
            raise TypeError(f"context must be a str, got {type(self.context).__name__}")
        if (self.continuation_ids is None) == (self.continuation is None):
            raise ValueError("give exactly one of continuation_ids or continuation")
        if self.logprobs_topk < 0:
            raise ValueError(f"logprobs_topk must be >= 0, got {self.logprobs_topk}")


@dataclass
class ScoreResult:
    token_ids: list[int]                   # the continuation tokens
    logprobs: list[float]                  # of those tokens under the context
    topk: Optional[TopK] = None            # per continuation position, or None


@dataclass
class _Prepared:
    """A request turned into token ids (shared by both engines so they agree exactly)."""
    prompt_ids: list[int]
    cont_ids: list[int] = field(default_factory=list)
    max_tokens: int = 0


class Engine(abc.ABC):
    """Generation + scoring + adapter switching; see the module docstring."""

    kind: str = "?"

    def __init__(self, model_path: str, cfg: EngineConfig):
        self.model_path = str(model_path)
        self.cfg = cfg
        self.tokenizer = None  # set by subclasses (a transformers tokenizer)
        self._adapters: dict[str, str] = {}  # name -> adapter folder

    # ---------------------------------------------------------------- API
    @abc.abstractmethod
    def generate(self, requests: list[GenRequest], on_delta: Optional[OnDelta] = None) -> list[GenResult]:
        """Generate; ``on_delta(i, GenDelta)`` (optional) streams each request's new tokens
        as they are made (module docstring, "Streaming")."""

    @abc.abstractmethod
    def score(self, requests: list[ScoreRequest]) -> list[ScoreResult]: ...

    @abc.abstractmethod
    def load_adapter(self, name: str, path: str) -> None:
        """Register (or replace) the adapter ``name`` from a PEFT folder; no restart."""

    @abc.abstractmethod
    def unload_adapter(self, name: str) -> None: ...

    def adapters(self) -> list[str]:
        return list(self._adapters)

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------ helpers
    def _check_adapter(self, name: Optional[str]) -> Optional[str]:
        if name is not None and name not in self._adapters:
            raise KeyError(f"unknown adapter {name!r} (loaded: {sorted(self._adapters)}); "
                           "call load_adapter(name, path) first")
        return name

    @staticmethod
    def _check_name(name: str) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter name must be a non-empty str, got {name!r}")

    @staticmethod
    def _check_adapter_folder(path: str) -> str:
        """A PEFT LoRA folder with safetensors weights (never pickle)."""
        import os
        p = os.path.abspath(os.path.expanduser(str(path)))
        if not os.path.isfile(os.path.join(p, "adapter_config.json")):
            raise ValueError(f"{p}: not a PEFT adapter folder (no adapter_config.json)")
        if not os.path.isfile(os.path.join(p, "adapter_model.safetensors")):
            raise ValueError(f"{p}: no adapter_model.safetensors (only safetensors are loaded)")
        return p

    def _prompt_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def _prepare_gen(self, req: GenRequest) -> _Prepared:
        req.validate()
        self._check_adapter(req.adapter)
        ids = self._prompt_ids(req.prompt)
        room = self.cfg.max_model_len - len(ids)
        if room < 1:
            raise ValueError(f"prompt of {len(ids)} tokens does not fit max_model_len="
                             f"{self.cfg.max_model_len} with room to generate")
        return _Prepared(ids, max_tokens=min(int(req.max_tokens), room))

    def _prepare_score(self, req: ScoreRequest) -> _Prepared:
        req.validate()
        self._check_adapter(req.adapter)
        ctx = self._prompt_ids(req.context)
        if req.continuation_ids is not None:
            cont = [int(t) for t in req.continuation_ids]
        else:
            cont = list(self.tokenizer(req.continuation, add_special_tokens=False)["input_ids"])
        if not ctx:
            raise ValueError("score context tokenizes to nothing (no BOS either): cannot score "
                             "the first continuation token")
        vocab = self._vocab_size()
        bad = [t for t in cont if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"continuation token ids out of range [0, {vocab}): {bad[:5]}")
        if len(ctx) + len(cont) > self.cfg.max_model_len:
            raise ValueError(f"context + continuation = {len(ctx) + len(cont)} tokens exceeds "
                             f"max_model_len={self.cfg.max_model_len}")
        return _Prepared(ctx, cont_ids=cont)

    def _vocab_size(self) -> int:
        return len(self.tokenizer)


def _round_lora_rank(r: int) -> int:
    """vLLM accepts max_lora_rank only from a fixed set; round up to the next one."""
    allowed = (1, 8, 16, 32, 64, 128, 256, 320, 512)
    for a in allowed:
        if r <= a:
            return a
    raise ValueError(f"max_lora_rank {r} is larger than vLLM's maximum {allowed[-1]}")
