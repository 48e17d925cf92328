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
