"""The teacher's pass after an episode's context, replayed from a CUDA graph (``nrem.teacher_graph``).

NREM's teacher reads each row's own ~70 tokens after its episode's context, whose keys and
values are computed once (``lm_forward.PrefixKV``). Eager, that pass is bound by Python and
kernel launches on a GPU. Here one static KV cache holds the context of the episode at hand
for every row (copied in when the episode changes: a pass writes only the positions after
it), and the pass over the rows' own tokens has fixed shapes (``rows`` x ``length``, padded;
the cache as long as the longest context plus ``length``, the mask hiding what a shorter
context leaves), so it is compiled once with CUDA graphs (``torch.compile``
"reduce-overhead", as the learner's decode step) and replayed for every episode.

The teacher is frozen for a whole NREM (its adapters and weights never change while the
graph is used). A batch that does not fit (more rows, longer rows) runs eager.
"""
from __future__ import annotations

import torch

from sleepray.compiled_blocks import compile_once
from sleepray.lm_forward import PrefixKV, _causal, lm_parts


class PrefixGraph:
    """Passes of up to ``rows`` rows of up to ``length`` own tokens after a context of at most
    ``max_prefix`` tokens."""

    def __init__(self, model, rows: int, max_prefix: int, length: int = 128):
        from transformers import StaticCache
        backbone, head = lm_parts(model)
        dev = head.weight.device
        self.rows, self.length, self.max_prefix = int(rows), int(length), int(max_prefix)
        self.total = self.max_prefix + self.length
        self.cache = StaticCache(config=_causal(model).config, max_cache_len=self.total)
        with torch.no_grad():   # lays the cache's tensors out (each episode's context is copied in)
            backbone(input_ids=torch.zeros((self.rows, 1), dtype=torch.long, device=dev),
                     past_key_values=self.cache, use_cache=True, cache_position=torch.zeros(1, dtype=torch.long,
                                                                                             device=dev))
        self.mask = torch.zeros((self.rows, self.total), dtype=torch.long, device=dev)
        self.cpos = torch.zeros(self.length, dtype=torch.long, device=dev)
        self.pos = torch.zeros((self.rows, self.length), dtype=torch.long, device=dev)
        self.ids = torch.zeros((self.rows, self.length), dtype=torch.long, device=dev)
        self._prefix = None
        self.p = 0

    def fits(self, prefix: PrefixKV, rows: list[list[int]]) -> bool:
        return (len(prefix.ids) <= self.max_prefix and len(rows) <= self.rows
                and max(len(r) for r in rows) <= self.length)

    def _load(self, prefix: PrefixKV) -> None:
        p = len(prefix.ids)
        for layer, (k, v) in zip(self.cache.layers, prefix.kv):
            layer.keys[:, :, :p].copy_(k.expand(self.rows, -1, -1, -1))
            layer.values[:, :, :p].copy_(v.expand(self.rows, -1, -1, -1))
        self.mask.zero_()
        self.mask[:, :p] = 1
        self.cpos.copy_(torch.arange(p, p + self.length, device=self.cpos.device))
        self.pos.copy_(self.cpos[None].expand(self.rows, -1))
        self._prefix, self.p = prefix, p

    @torch.no_grad()
    def __call__(self, model, prefix: PrefixKV, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Final hidden states [B, L, H] of right-padded ``ids`` [B, L] (``attn`` their mask) after
        ``prefix``. Valid until the next call (the graph's output buffer)."""
        if self._prefix is not prefix:
            self._load(prefix)
        B, L = ids.shape
        self.ids.zero_()
        self.ids[:B, :L] = ids
        own = self.mask[:, self.p: self.p + self.length]
        own.zero_()                 # padding rows and positions see the context only
        own[:B, :L] = attn
        for layer in self.cache.layers:   # transformers' static layer writes at its own count, not cache_position
            if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor):
                layer.cumulative_length.fill_(self.p)
        h = _graph_pass(model)(self.ids, self.pos, self.cpos, self.mask, self.cache)
        return h[:B, :L]


def _graph_pass(model):
    """The backbone's pass after a static cache, compiled once per model with CUDA graphs."""
    backbone, _ = lm_parts(model)

    def one(input_ids, position_ids, cache_position, attention_mask, cache):
        return backbone(input_ids=input_ids, position_ids=position_ids, cache_position=cache_position,
                        attention_mask=attention_mask, past_key_values=cache, use_cache=True).last_hidden_state
    return compile_once(model, "_sleepray_prefix_pass", one, mode="reduce-overhead", dynamic=False)
