"""NREM's forward passes and losses on token rows: student and teacher, fused or plain.

A row is a prompt's token ids followed by a continuation; the losses are taken on the
continuation's positions only. :class:`Scorer` makes them for one NREM run:

* fused (``nrem.fused_loss``): final hidden states at the scored positions, and the LM
  head fused with the loss a chunk at a time (``sleepray.fused_losses``);
* plain: full logits and ``sleepray.losses`` (the reference the fused path is tested
  against, and the fallback for a model whose head ``lm_forward`` cannot split off);
* with ``nrem.reuse_context_kv`` the teacher's rows of one episode share its context:
  its keys and values are computed once per run (the teacher is frozen for the whole
  NREM) and each teacher forward runs on the rows' own tokens after it.
"""
from __future__ import annotations

import contextlib
import logging
import weakref
from collections import defaultdict
from typing import Optional

import torch

from sleepray.compiled_blocks import CompiledBlocks, graph_length, switched_on
from sleepray.fused_losses import _logprob, fused_jsd, fused_token_logprobs
from sleepray.lm_forward import (PrefixKV, UnsupportedModel, _gather, _right_padded, common_prefix, lm_parts,
                                 right_padded_input, span_hidden, to_device)
from sleepray.losses import generalized_jsd
from sleepray.prefix_graph import PrefixGraph

log = logging.getLogger(__name__)


class Scorer:
    def __init__(self, bank, tok, ncfg, contexts: Optional[dict[str, list[str]]] = None, rows: int = 0):
        """``contexts``: episode id -> its teacher prompts (what the shared prefix is found
        from); without it every teacher forward reads the whole prompt. ``rows``: the most rows
        of one teacher pass (the batch), for ``nrem.teacher_graph``."""
        self.bank, self.tok, self.ncfg = bank, tok, ncfg
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.fused = ncfg.fused_loss and self._splits(bank.model)
        self.blocks = compiled_blocks(bank.model, ncfg)
        self.compile_loss = switched_on(ncfg.compile_loss, bank.model)
        self.async_rows = switched_on(ncfg.async_rows, bank.model)
        self._prefix_len: dict[str, int] = {}
        self._kv: dict[str, PrefixKV] = {}
        self._ids: dict[str, list[int]] = {}
        own = 0         # the most tokens a teacher row can have after its episode's shared context
        if contexts and ncfg.reuse_context_kv and self.fused:
            for ep, prompts in contexts.items():
                ids = [self.ids(p) for p in prompts]
                self._prefix_len[ep] = common_prefix(ids)
                own = max(own, max(map(len, ids)) - self._prefix_len[ep] + ncfg.max_new_tokens)
        self.graph = prefix_graph(bank.model, ncfg, rows, max(self._prefix_len.values(), default=0), own)

    def ids(self, text: str) -> list[int]:
        """``tok.encode(text)``, remembered: NREM's prompts come back every step."""
        if text not in self._ids:
            if len(self._ids) > 100_000:
                self._ids.clear()
            self._ids[text] = self.tok.encode(text)
        return self._ids[text]

    @staticmethod
    def _splits(model) -> bool:
        try:
            lm_parts(model)
            return True
        except UnsupportedModel as e:
            log.warning("fused NREM losses off: %s", e)
            return False

    # ------------------------------------------------------------------ states
    def _states(self, model, rows, starts, lens, prefix=None) -> torch.Tensor:
        """[N, H] hidden states (fused) or [N, V] logits (plain) predicting each row's span."""
        compiled = self.blocks is not None and prefix is None
        multiple = 1
        if compiled and self.blocks.graphs:   # few lengths, few graphs; a multiple of itself: that length
            multiple = graph_length(max(map(len, rows)), self.ncfg.block_graph_pad)
        with self.blocks.on() if compiled else contextlib.nullcontext(), self._attention():
            if self.fused:
                return span_hidden(model, rows, starts, lens, self.pad, prefix, multiple, self.async_rows)
            ids, attn = right_padded_input(rows, self.pad, next(model.parameters()).device, multiple, self.async_rows)
            return _gather(model(input_ids=ids, attention_mask=attn).logits, starts, lens, self.async_rows)

    def begin_step(self) -> None:
        """A new optimizer step (the compiled blocks' CUDA graphs, where on, may reuse their memory)."""
        if self.blocks is not None:
            self.blocks.begin_step()

    def _attention(self):
        """The attention kernel ``nrem.attention`` asks for (its backward follows the forward's)."""
        if self.ncfg.attention == "auto":
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel
        return sdpa_kernel([{"cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                             "flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}[self.ncfg.attention]])

    def student(self, prompt_rows: list[list[int]], conts: list[list[int]]) -> torch.Tensor:
        """States predicting ``conts`` after ``prompt_rows`` under the model now (gradient on)."""
        return self._states(self.bank.model, [p + c for p, c in zip(prompt_rows, conts)],
                            [len(p) for p in prompt_rows], [len(c) for c in conts])

    @torch.no_grad()
    def teacher(self, episodes: list[str], prompt_rows: list[list[int]], conts: list[list[int]]) -> torch.Tensor:
        """The same under the model before expansion, the episode's context shared where cached."""
        out: list = [None] * len(conts)
        groups = defaultdict(list)
        for i, ep in enumerate(episodes):
            groups[ep if self._prefix_len.get(ep, 0) > 0 else None].append(i)
        with self.bank.teacher_mode():
            for ep, idx in groups.items():
                p = self._prefix_len.get(ep, 0) if ep is not None else 0
                rows = [prompt_rows[i][p:] + conts[i] for i in idx]
                starts, lens = [len(prompt_rows[i]) - p for i in idx], [len(conts[i]) for i in idx]
                states = self._graphed(ep, prompt_rows[idx[0]][:p], rows, starts, lens) if p else None
                if states is None:
                    prefix = self._context(ep, prompt_rows[idx[0]][:p]) if p else None
                    states = self._states(self.bank.model, rows, starts, lens, prefix)
                for i, part in zip(idx, torch.split(states, [len(conts[i]) for i in idx])):
                    out[i] = part
        return torch.cat(out) if out else torch.zeros(0)

    def _graphed(self, ep: str, prefix: list[int], rows, starts, lens) -> Optional[torch.Tensor]:
        """The teacher's states of ``rows`` after the episode's context from the CUDA graph
        (``nrem.teacher_graph``); None where there is none or the rows do not fit it."""
        if self.graph is None:
            return None
        kv = self._context(ep, prefix)
        if not self.graph.fits(kv, rows):
            return None
        ids, attn = _right_padded(rows, self.pad, self.graph.ids.device, non_blocking=self.async_rows)
        return _gather(self.graph(self.bank.model, kv, ids, attn), starts, lens, self.async_rows)

    def _context(self, ep: str, ids: list[int]) -> PrefixKV:
        if ep not in self._kv:
            with self._attention():
                self._kv[ep] = PrefixKV(self.bank.model, ids)
        return self._kv[ep]

    # ------------------------------------------------------------------ losses
    def jsd(self, s_states: torch.Tensor, t_states: torch.Tensor, beta: float) -> torch.Tensor:
        """Mean over positions of the generalized JSD(beta) between student and teacher."""
        if self.fused:
            return fused_jsd(s_states, t_states, lm_parts(self.bank.model)[1], beta, chunk=self.ncfg.loss_chunk,
                             compiled=self.compile_loss)
        return generalized_jsd(s_states, t_states, beta)

    def token_logprobs(self, states: torch.Tensor, conts: list[list[int]]) -> torch.Tensor:
        """log p of each continuation token, [N] (rows' tokens one after another)."""
        targets = to_device(torch.tensor([t for c in conts for t in c], dtype=torch.long), states.device,
                            self.async_rows)
        if self.fused:
            return fused_token_logprobs(states, targets, lm_parts(self.bank.model)[1], self.ncfg.loss_chunk)
        return _logprob(states, targets)

    def anchor_kl(self, texts: list[str]) -> torch.Tensor:
        """Mean per-token KL(model before expansion || student) on ``texts``."""
        rows = [self.ids(t) for t in texts]
        starts, lens = [1] * len(rows), [len(r) - 1 for r in rows]
        with torch.no_grad(), self.bank.teacher_mode():
            t = self._states(self.bank.model, rows, starts, lens)
        return self.jsd(self._states(self.bank.model, rows, starts, lens), t, 0.0)


def compiled_blocks(model, ncfg) -> Optional[CompiledBlocks]:
    """The model's compiled decoder blocks when ``nrem.compile_blocks`` asks (auto: on a GPU); one
    set per model and backend, so that its graphs are compiled once."""
    if not switched_on(ncfg.compile_blocks, model):
        return None
    fast = switched_on(ncfg.fast_guards, model)
    graphs = switched_on(ncfg.block_graphs, model) and ncfg.compile_backend == "inductor"
    blocks = _BLOCKS.get(model)
    if blocks is None or (blocks.backend, blocks.fast_guards, blocks.graphs) != (ncfg.compile_backend, fast, graphs):
        blocks = _BLOCKS[model] = CompiledBlocks(model, ncfg.compile_backend, fast, graphs)
    return blocks


_BLOCKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def prefix_graph(model, ncfg, rows: int, max_prefix: int, own: int = 0) -> Optional[PrefixGraph]:
    """The teacher's CUDA-graph pass after the episodes' contexts when ``nrem.teacher_graph``
    asks (auto: on a GPU), for passes of up to ``rows`` rows after up to ``max_prefix`` tokens.
    Its rows are as long as the run's can be (``own``: a prompt's tokens after the shared context
    plus the continuation's; rounded up to a multiple of 16), and at most
    ``nrem.teacher_graph_tokens``: every padded position costs as much as a real one."""
    if rows < 1 or max_prefix < 1 or not switched_on(ncfg.teacher_graph, model):
        return None
    length = min(ncfg.teacher_graph_tokens, -(-own // 16) * 16) if own > 0 else ncfg.teacher_graph_tokens
    return PrefixGraph(model, rows, max_prefix, length)


def padded(flat: torch.Tensor, lens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """[N] values of rows of ``lens`` -> [B, max len] (0 padded) and the mask."""
    L = max(lens) if lens else 0
    out = flat.new_zeros((len(lens), L))
    mask = torch.zeros((len(lens), L), dtype=torch.bool, device=flat.device)
    for i, part in enumerate(torch.split(flat, lens)):
        out[i, : len(part)] = part
        mask[i, : len(part)] = True
    return out, mask
