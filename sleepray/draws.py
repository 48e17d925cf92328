"""The draws of the learner's sampling loops: ancestral sampling from each step's logits, rows
that stopped padded, and on a GPU "has every row stopped?" read back only now and then."""
from __future__ import annotations

import torch

CHECK_EVERY = 8


def sample_loop(logits: torch.Tensor, step, max_new_tokens: int, temperature: float, stop_ids: list[int],
                pad_id: int, stopped=None, check_every: int | None = None) -> torch.Tensor:
    """The draws of every sampling loop (``sleepray.sampling.decode`` and ``decode_static``,
    ``sleepray.fused_decode.decode_fused``): ``logits`` [B, V] of the first new
    token; ``step(tokens, t)`` feeds draw ``t`` and returns the next logits.

    On a GPU without a ``stopped`` callback, whether every row has stopped is read back only
    every ``CHECK_EVERY`` draws: reading it is a device sync, and without one the host queues
    the next steps while the device runs (the H200 profile: the sync every step doubled the
    step). A stopped row draws only padding, so the rows are the same; at most
    ``CHECK_EVERY - 1`` padding columns more."""
    B, device = logits.shape[0], logits.device
    every = check_every or (CHECK_EVERY if device.type == "cuda" and stopped is None else 1)
    stop = torch.tensor(sorted(set(stop_ids)), device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    toks: list[torch.Tensor] = []
    for t in range(max_new_tokens):
        nxt = torch.multinomial(torch.softmax(logits.float() / temperature, -1), 1)[:, 0]
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        toks.append(nxt)
        done = done | torch.isin(nxt, stop)
        if stopped is not None:
            done = done | torch.tensor([stopped(r) for r in torch.stack(toks, 1).tolist()], device=device)
        if len(toks) == max_new_tokens or (len(toks) % every == 0 and bool(done.all())):
            break
        logits = step(nxt, t)
    return torch.stack(toks, 1) if toks else torch.zeros((B, 0), dtype=torch.long, device=device)


def cache_length(n: int, new_tokens: int, multiple: int = 64) -> int:
    """A fixed-size KV cache's length for ``n`` prompt columns and ``new_tokens`` draws, rounded up
    to ``multiple`` (few shapes: each is one CUDA graph, and the cache is reused across calls)."""
    return -(-(n + new_tokens) // multiple) * multiple


def sample_cached(logits: torch.Tensor, one, again, mask: torch.Tensor, pos: torch.Tensor, n: int,
                  max_new_tokens: int, temperature: float, stop_ids: list[int], pad_id: int, stopped=None,
                  clone: bool = True) -> torch.Tensor:
    """:func:`sample_loop` over a fixed-size KV cache whose first ``n`` columns hold the prompt
    (``sleepray.sampling.decode_static``, ``sleepray.fused_decode.decode_fused``). Draw ``t`` is
    fed at cache column ``n + t``, marked in ``mask`` [B, L], and at each row's next position after
    ``pos`` [B, 1]. ``one(tokens, positions, column, mask)`` -> logits runs the first step,
    ``again`` (the same call with repeated guards skipped, or ``one``) the later ones. ``clone``:
    each step's logits copied out (a CUDA graph's output is overwritten by its next replay)."""
    pos = pos.clone()
    cpos = torch.full((1,), n - 1, dtype=torch.long, device=mask.device)

    def step(nxt, t):
        nonlocal pos, cpos
        mask[:, n + t] = 1
        pos, cpos = pos + 1, cpos + 1   # on the device: a host tensor copied in every step syncs
        out = (again if t else one)(nxt[:, None], pos, cpos, mask)
        return out.clone() if clone else out
    return sample_loop(logits, step, max_new_tokens, temperature, stop_ids, pad_id, stopped)
