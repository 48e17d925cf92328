"""Plain language-model utilities: perplexity, and SFT of the open expert on texts."""
from __future__ import annotations

import math
import random

import torch
from tqdm.auto import tqdm


def _batch(tok, texts: list[str], device, prompts: list[str] | None = None):
    """Right-padded ids and a loss mask (prompt tokens, if given, are not scored)."""
    rows, masks = [], []
    for i, t in enumerate(texts):
        ids = tok.encode(t)
        n_prompt = len(tok.encode(prompts[i])) if prompts else 1
        rows.append(ids)
        masks.append([0] * n_prompt + [1] * (len(ids) - n_prompt))
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), tok.pad_token_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    mask = torch.zeros_like(ids, dtype=torch.float)
    for i, (r, m) in enumerate(zip(rows, masks)):
        ids[i, : len(r)] = torch.tensor(r)
        attn[i, : len(r)] = 1
        mask[i, : len(m)] = torch.tensor(m, dtype=torch.float)
    return ids.to(device), attn.to(device), mask.to(device)


def token_nll(model, tok, texts: list[str], prompts: list[str] | None = None):
    """Per-sequence summed NLL and token counts (grad flows if enabled)."""
    device = next(model.parameters()).device
    ids, attn, mask = _batch(tok, texts, device, prompts)
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    m = mask[:, 1:]
    return (nll * m).sum(1), m.sum(1)


@torch.no_grad()
def perplexity(model, tok, texts: list[str], batch_size: int = 16) -> float:
    total, count = 0.0, 0.0
    for i in range(0, len(texts), batch_size):
        nll, n = token_nll(model, tok, texts[i: i + batch_size])
        total += nll.sum().item()
        count += n.sum().item()
    return math.exp(total / max(count, 1.0))


def sft(params, model, tok, texts: list[str], steps: int, lr: float, batch_size: int = 8,
        seed: int = 0, prompts: list[str] | None = None, progress: bool = False,
        desc: str = "SFT") -> list[float]:
    """Supervised fine-tuning of ``params`` on ``texts`` (loss on the part after ``prompts``)."""
    if not texts:
        raise ValueError("SFT needs at least one text")
    rng = random.Random(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    for _ in tqdm(range(steps), desc=desc, disable=not progress):
        idx = [rng.randrange(len(texts)) for _ in range(batch_size)]
        nll, n = token_nll(model, tok, [texts[i] for i in idx], [prompts[i] for i in idx] if prompts else None)
        loss = nll.sum() / n.sum().clamp_min(1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
    return losses
