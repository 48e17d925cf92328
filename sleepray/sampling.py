"""Ancestral sampling with a transformers model: one place for NREM, LTI and REM."""
from __future__ import annotations

import contextlib

import torch


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
               prefix_ids: list[list[int]] | None = None, stop_at_newline: bool = True,
               seed: int | None = None) -> list[list[int]]:
    """Sampled continuations (token ids) of ``prompts`` (+ optional forced ``prefix_ids``).

    Left-padded batch, plain ancestral sampling (no top-k/top-p). Each continuation ends
    before EOS/padding, or just after the first newline when ``stop_at_newline``.
    """
    newline = tok.encode("\n", add_special_tokens=False)[-1]
    rows = [tok.encode(p) + (prefix_ids[i] if prefix_ids else []) for i, p in enumerate(prompts)]
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), tok.pad_token_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, n - len(r):] = torch.tensor(r)
        attn[i, n - len(r):] = 1
    device = next(model.parameters()).device
    eos = [tok.eos_token_id, newline] if stop_at_newline else tok.eos_token_id
    with _seeded(device, seed):
        out = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device),
                             max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                             top_k=0, top_p=1.0, pad_token_id=tok.pad_token_id, eos_token_id=eos)
    res = []
    for row in out[:, n:].tolist():
        cut = []
        for t in row:
            if t in (tok.pad_token_id, tok.eos_token_id):
                break
            cut.append(t)
            if stop_at_newline and t == newline:
                break
        res.append(cut)
    return res
