"""Forward passes that make hidden states only where a loss needs them.

A causal LM is its backbone (embeddings, blocks, final norm) and its head (the output
projection, with the soft-capping or scaling some families add). NREM's losses need the
head's output only at the positions that predict continuation tokens, and the teacher
rereads the same episode context for every row; so here:

* :func:`lm_parts` splits a (PEFT-wrapped) causal LM into ``(backbone, Head)`` and checks
  once per model that ``head(backbone(x))`` equals the model's own logits (a family whose
  head does something else is reported by :class:`UnsupportedModel`, and callers use
  the plain path);
* :func:`span_hidden` runs the backbone on right-padded rows and gathers the final hidden
  states of the positions that predict each row's span of target tokens;
* :class:`PrefixKV` holds the keys and values of a shared token prefix (an episode's
  context in the teacher's prompt) computed once, so rows that start with it run the
  backbone on their own suffix only.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


class UnsupportedModel(RuntimeError):
    """``head(backbone(x))`` does not reproduce this model's logits."""


@dataclass(eq=False)
class Head:
    """The output projection: ``softcap * tanh(scale * (h W^T + b) / softcap)`` (or no cap)."""
    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None
    scale: float = 1.0
    softcap: Optional[float] = None

    def __call__(self, h: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        logits = F.linear(h, self.weight if weight is None else weight, self.bias)
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


_checked: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _causal(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def lm_parts(model) -> tuple[torch.nn.Module, Head]:
    """``(backbone, head)`` of a causal LM (a PEFT model's LoRA layers stay in the backbone).

    Raises :class:`UnsupportedModel` where the split does not reproduce the model's logits
    (checked on a short input the first time a model is seen)."""
    causal = _causal(model)
    cfg = causal.config.get_text_config() if hasattr(causal.config, "get_text_config") else causal.config
    backbone = getattr(causal, getattr(causal, "base_model_prefix", "model"), None)
    lin = causal.get_output_embeddings()
    if backbone is None or lin is None or backbone is causal:
        raise UnsupportedModel(f"{type(causal).__name__}: no backbone/output-embedding split")
    scale = float(getattr(cfg, "logit_scale", None) or 1.0)
    if getattr(cfg, "logits_scaling", None):
        scale /= float(cfg.logits_scaling)
    head = Head(lin.weight, lin.bias, scale, getattr(cfg, "final_logit_softcapping", None))
    if model not in _checked:
        _checked[model] = _reproduces(model, backbone, head)
    if not _checked[model]:
        raise UnsupportedModel(f"{type(causal).__name__}: head(backbone(x)) differs from its logits")
    return backbone, head


@torch.no_grad()
def _reproduces(model, backbone, head) -> bool:
    device = head.weight.device
    ids = torch.arange(3, 11, device=device)[None] % head.weight.shape[0]
    want = model(input_ids=ids).logits.float()
    got = head(backbone(input_ids=ids).last_hidden_state).float()
    return bool(torch.allclose(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()) + 1e-5))


def to_device(t: torch.Tensor, device, non_blocking: bool = False) -> torch.Tensor:
    """Host tensor ``t`` on ``device``. ``non_blocking``: to a GPU through pinned memory, without
    waiting (a plain copy from pageable memory waits for the GPU's stream to drain: the host
    stops launching work until the GPU has caught up)."""
    if non_blocking and torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _padded_host(rows: list[list[int]], pad_id: int, multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    n = -(-max(len(r) for r in rows) // multiple) * multiple
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        attn[i, : len(r)] = 1
    return ids, attn


def _right_padded(rows: list[list[int]], pad_id: int, device, multiple: int = 1,
                  non_blocking: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, n] ids and attention mask of ``rows``, right-padded to ``n``: the longest row's length
    rounded up to a ``multiple``."""
    ids, attn = _padded_host(rows, pad_id, multiple)
    return to_device(ids, device, non_blocking), to_device(attn, device, non_blocking)


def _gather(hidden: torch.Tensor, starts: list[int], lens: list[int], non_blocking: bool = False) -> torch.Tensor:
    """Rows' positions ``start - 1 .. start + len - 2`` (those predicting the span), [sum(lens), H]."""
    rows = torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(lens)]) if lens else \
        torch.zeros(0, dtype=torch.long)
    cols = torch.cat([torch.arange(s - 1, s - 1 + n) for s, n in zip(starts, lens)]) if lens else \
        torch.zeros(0, dtype=torch.long)
    return hidden[to_device(rows, hidden.device, non_blocking), to_device(cols, hidden.device, non_blocking)]


def span_hidden(model, rows: list[list[int]], starts: list[int], lens: list[int], pad_id: int,
                prefix: Optional["PrefixKV"] = None, multiple: int = 1, async_rows: bool = False) -> torch.Tensor:
    """Final hidden states predicting ``row[start : start + len]`` for every row, stacked [N, H].

    ``prefix``: rows continue ``prefix.ids`` (not included in ``rows``); its cached keys and
    values stand in for it, and ``starts`` count from the row's first own token (>= 1).
    ``multiple``: rows right-padded to a multiple of this length (padding after a row changes
    none of its states). ``async_rows``: see :func:`right_padded_input`."""
    if any(s < 1 for s, n in zip(starts, lens) if n):
        raise ValueError("a span must start after the row's first token")
    backbone, head = lm_parts(model)
    device = head.weight.device
    if prefix is None:
        ids, attn = right_padded_input(rows, pad_id, device, multiple, async_rows)
        hidden = backbone(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
    else:
        ids, attn = _right_padded(rows, pad_id, device, multiple, async_rows)
        p = len(prefix.ids)
        pos = torch.arange(p, p + ids.shape[1], device=device)[None].expand(len(rows), -1)
        attn = torch.cat([attn.new_ones((len(rows), p)), attn], 1)
        hidden = backbone(input_ids=ids, attention_mask=attn, position_ids=pos,
                          past_key_values=prefix.for_rows(len(rows)), use_cache=True).last_hidden_state
    return _gather(hidden, starts, lens, async_rows)


def right_padded_input(rows: list[list[int]], pad_id: int, device, multiple: int = 1,
                       async_rows: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Ids and mask of ``rows`` for a causal pass from position 0, right-padded.

    ``async_rows``: the ids copied without waiting (pinned memory), and no mask (None). Under
    causal attention a position sees only those before it, so a row's own positions never see
    the padding after it: the mask changes none of the states the losses read. Passing one
    costs a host-device sync (transformers checks whether it hides anything, reading it back)
    and keeps PyTorch's attention off its causal kernels."""
    if not async_rows:
        return _right_padded(rows, pad_id, device, multiple)
    return to_device(_padded_host(rows, pad_id, multiple)[0], device, non_blocking=True), None


class PrefixKV:
    """Keys and values of ``ids`` under ``model`` as it is now (the caller keeps the model fixed
    while the prefix is used: the teacher is frozen for a whole NREM)."""

    def __init__(self, model, ids: list[int]):
        from transformers import DynamicCache
        backbone, head = lm_parts(model)
        self.ids = list(ids)
        self._config = _causal(model).config
        with torch.no_grad():
            x = torch.tensor([self.ids], dtype=torch.long, device=head.weight.device)
            cache = backbone(input_ids=x, use_cache=True, past_key_values=DynamicCache(config=self._config)
                             ).past_key_values
        self.kv = [(layer.keys, layer.values) for layer in cache.layers]   # per layer [1, heads, len, d]

    def for_rows(self, n: int):
        """A fresh cache holding the prefix for ``n`` rows (the stored one is never written)."""
        from transformers import DynamicCache
        return DynamicCache(ddp_cache_data=[(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1))
                                            for k, v in self.kv], config=self._config)


def common_prefix(rows: list[list[int]]) -> int:
    """Length of the longest token prefix every row shares, leaving each row >= 1 own token."""
    if not rows:
        return 0
    n = min(len(r) for r in rows) - 1
    first = rows[0]
    for r in rows[1:]:
        k = 0
        while k < n and r[k] == first[k]:
            k += 1
        n = k
    return max(0, n)
