"""Ancestral sampling with a transformers model: one place for NREM, LTI and REM."""
from __future__ import annotations

import contextlib
import functools
import weakref
from typing import Sequence

import torch

from sleepray.compiled_blocks import compile_once, repeat_call
from sleepray.draws import cache_length, sample_cached, sample_loop
from sleepray.fused_decode import decode_fused
from sleepray.prompt_format import stop_token_ids


def _seeded(device: torch.device, seed: int | None):
    """Seed sampling without touching the global RNG state (no-op when ``seed`` is None)."""
    if seed is None:
        return contextlib.nullcontext()
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []

    @contextlib.contextmanager
    def ctx():
        with torch.random.fork_rng(devices=devices):
            torch.default_generator.manual_seed(seed)
            if device.type == "cuda":
                torch.cuda.manual_seed(seed)
            yield
    return ctx()


@torch.no_grad()
def sample_ids(model, tok, prompts: list[str], max_new_tokens: int, temperature: float,
               prefix_ids: list[list[int]] | None = None, stop: Sequence[str] = ("\n",),
               seed: int | None = None, loop: str = "own", fast_guards: bool = False) -> list[list[int]]:
    """Sampled continuations (token ids) of ``prompts`` (+ optional forced ``prefix_ids``).

    Left-padded batch, plain ancestral sampling (no top-k/top-p). Each continuation ends
    before EOS/padding, or just after the first of the ``stop`` strings (its tokens kept).
    ``loop``: "own" (:func:`decode`: one forward per token, logits of the last position
    only, no per-step processors), "static" / "graph" (:func:`decode_static`: a static KV
    cache; "graph" replays each decode step from a CUDA graph), "fused" (Llama-shaped blocks
    run with fused weights, CUDA graphs on a GPU: ``sleepray.fused_decode``) or "generate"
    (transformers' ``generate``, the reference: with the same seed "own", "static" and
    "fused" draw the same tokens).
    ``fast_guards``: the graphed decode steps after the first skip the guards that do not tell
    compiled graphs apart (``sleepray.compiled_blocks.repeat_call``).
    """
    stop_ids, stop_texts = stop_token_ids(tok, stop)
    rows = [tok.encode(p) + (prefix_ids[i] if prefix_ids else []) for i, p in enumerate(prompts)]
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), tok.pad_token_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, n - len(r):] = torch.tensor(r)
        attn[i, n - len(r):] = 1
    device = next(model.parameters()).device
    with _seeded(device, seed):
        if loop in ("own", "static", "graph", "fused"):
            if loop == "fused":
                fn = functools.partial(decode_fused, graphs=device.type == "cuda", fast_guards=fast_guards)
            else:
                fn = decode if loop == "own" else functools.partial(decode_static, graphs=loop == "graph",
                                                                    fast_guards=fast_guards)
            out = fn(model, ids.to(device), attn.to(device), max_new_tokens, temperature,
                     [tok.eos_token_id, *stop_ids], tok.pad_token_id,
                     (lambda row: any(s in tok.decode(row[-8:]) for s in stop_texts)) if stop_texts else None)
        elif loop == "generate":
            eos = [tok.eos_token_id, *stop_ids] if stop_ids else tok.eos_token_id
            extra = {"stop_strings": stop_texts, "tokenizer": tok} if stop_texts else {}
            out = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                                 top_k=0, top_p=1.0, pad_token_id=tok.pad_token_id, eos_token_id=eos,
                                 **extra)[:, n:]
        else:
            raise ValueError(f"unknown sampling loop {loop!r}")
    return [_cut(tok, row, stop_ids, stop_texts) for row in out.tolist()]


def decode(model, ids: torch.Tensor, attn: torch.Tensor, max_new_tokens: int, temperature: float,
           stop_ids: list[int], pad_id: int, stopped=None) -> torch.Tensor:
    """[B, <= max_new_tokens] tokens sampled after left-padded ``ids``; a row that drew a
    ``stop_ids`` token (or for which ``stopped(row_tokens)`` is true) gets ``pad_id`` after it,
    and the loop ends when every row has stopped. The draws are ``generate``'s: softmax of
    logits / temperature in float32, one ``torch.multinomial`` per step."""
    B = ids.shape[0]
    pos = (attn.cumsum(-1) - 1).clamp_min(0)
    first, inverse = _distinct_rows(ids, attn)   # equal rows (k samples of a prompt) are read once
    out = model(input_ids=ids[first], attention_mask=attn[first], position_ids=pos[first], use_cache=True,
                logits_to_keep=1)
    cache, logits = out.past_key_values, out.logits[:, -1]
    if len(first) < B:
        cache.reorder_cache(inverse)
        logits = logits[inverse]
    pos = pos[:, -1:]

    def step(nxt, t):
        nonlocal attn, pos
        attn = torch.cat([attn, attn.new_ones((B, 1))], 1)
        pos = pos + 1
        return model(input_ids=nxt[:, None], attention_mask=attn, position_ids=pos, past_key_values=cache,
                     use_cache=True).logits[:, -1]
    return sample_loop(logits, step, max_new_tokens, temperature, stop_ids, pad_id, stopped)


_STATIC: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # model -> {(batch, length): cache}


def _static_cache(model, B: int, L: int):
    """A StaticCache for ``model`` at this shape, reused across calls (a CUDA graph keeps its addresses)."""
    from transformers import StaticCache
    caches = _STATIC.setdefault(model, {})
    if (B, L) not in caches:
        if len(caches) >= 8:
            caches.clear()
        caches[(B, L)] = StaticCache(config=model.config, max_cache_len=L)
    cache = caches[(B, L)]
    cache.reset()
    return cache


def _graph_step(model):
    """The decode step of ``model``, compiled once per model with CUDA graphs ("reduce-overhead"):
    each step is replayed from a recorded graph instead of launching every kernel from Python."""
    def one(input_ids, position_ids, cache_position, attention_mask, cache):
        return model(input_ids=input_ids, position_ids=position_ids, cache_position=cache_position,
                     attention_mask=attention_mask, past_key_values=cache, use_cache=True).logits[:, -1]
    return compile_once(model, "_sleepray_decode_step", one, mode="reduce-overhead", dynamic=False)


def decode_static(model, ids: torch.Tensor, attn: torch.Tensor, max_new_tokens: int, temperature: float,
                  stop_ids: list[int], pad_id: int, stopped=None, graphs: bool = False,
                  fast_guards: bool = False) -> torch.Tensor:
    """:func:`decode` over a static KV cache (length rounded up to 64, reused across calls of the
    same shape) and a fixed-size attention mask, so that every decode step has the same shapes
    and addresses; ``graphs``: each step replayed from a CUDA graph (``torch.compile``
    "reduce-overhead"; the first calls of a shape record it). Draws as :func:`decode`."""
    B, n = ids.shape
    L = cache_length(n, max_new_tokens)
    if graphs:   # a new run of PyTorch's CUDA graph trees (after a training pass's graphs, nrem.block_graphs,
        torch.compiler.cudagraph_mark_step_begin()   # its steps would otherwise never leave their warm-up)
    cache = _static_cache(model, B, L)
    mask = attn.new_zeros((B, L))
    mask[:, :n] = attn
    pos = (attn.cumsum(-1) - 1).clamp_min(0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                   cache_position=torch.arange(n, device=ids.device), logits_to_keep=1).logits[:, -1]
    one = _graph_step(model) if graphs else (
        lambda i, p, c, m, kv: model(input_ids=i, position_ids=p, cache_position=c, attention_mask=m,
                                     past_key_values=kv, use_cache=True).logits[:, -1])
    again = repeat_call(one) if graphs and fast_guards else one   # steps after the first repeat it
    return sample_cached(logits, lambda *a: one(*a, cache), lambda *a: again(*a, cache), mask, pos[:, -1:], n,
                         max_new_tokens, temperature, stop_ids, pad_id, stopped)


def _distinct_rows(ids: torch.Tensor, attn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of each distinct row's first occurrence, and every row's index among them."""
    seen: dict = {}
    inverse = [seen.setdefault((tuple(r), tuple(a)), len(seen)) for r, a in zip(ids.tolist(), attn.tolist())]
    first = [0] * len(seen)
    for i in reversed(range(len(inverse))):
        first[inverse[i]] = i
    return (torch.tensor(first, dtype=torch.long, device=ids.device),
            torch.tensor(inverse, dtype=torch.long, device=ids.device))


def _cut(tok, row: list[int], stop_ids: list[int], stop_texts: list[str]) -> list[int]:
    """``row`` before EOS/padding, or through the token that completes a stop string."""
    cut: list[int] = []
    for t in row:
        if t in (tok.pad_token_id, tok.eos_token_id):
            break
        cut.append(t)
        if t in stop_ids or (stop_texts and any(s in tok.decode(cut[-8:]) for s in stop_texts)):
            break
    return cut
