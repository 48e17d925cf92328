"""Ancestral sampling with a transformers model: one place for NREM, LTI and REM."""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch

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
               seed: int | None = None) -> list[list[int]]:
    """Sampled continuations (token ids) of ``prompts`` (+ optional forced ``prefix_ids``).

    Left-padded batch, plain ancestral sampling (no top-k/top-p). Each continuation ends
    before EOS/padding, or just after the first of the ``stop`` strings (its tokens kept).
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
    eos = [tok.eos_token_id, *stop_ids] if stop_ids else tok.eos_token_id
    extra = {"stop_strings": stop_texts, "tokenizer": tok} if stop_texts else {}
    with _seeded(device, seed):
        out = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device),
                             max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                             top_k=0, top_p=1.0, pad_token_id=tok.pad_token_id, eos_token_id=eos, **extra)
    return [_cut(tok, row, stop_ids, stop_texts) for row in out[:, n:].tolist()]


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
