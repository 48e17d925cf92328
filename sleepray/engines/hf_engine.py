"""The transformers implementation of :class:`~sleepray.engines.base.Engine`.

* Generation is a plain KV-cached decoding loop over a left-padded batch (explicit
  ``position_ids`` so padding does not shift positions). Log-probs are
  ``log_softmax`` of the float32 logits (the model's own distribution; see base.py),
  greedy = argmax when ``temperature == 0``, otherwise sampling from
  ``softmax(logits / T)`` with top-p, one ``torch.Generator`` per request (seeded by
  ``req.seed`` or the engine's RNG). EOS (tokenizer + generation config) and stop
  strings end a row; like vLLM, an EOS token is kept in ``token_ids`` (not in the text)
  and a stop string is cut from the text while the token that completed it is kept;
  an incomplete UTF-8 tail is left out of the text, as vLLM's detokenizer does.
* Scoring is one right-padded forward pass per batch.
* Adapters: the first ``load_adapter`` wraps the base model with
  ``PeftModel.from_pretrained(..., adapter_name=name)``, later ones use
  ``load_adapter``; a batch is grouped by adapter and run with ``set_adapter(name)``
  or inside ``disable_adapter()`` for the base model. A lock serialises calls, since
  switching adapters mutates the model.
* Streaming (``generate(..., on_delta=fn)``, semantics in base.py): the decoding loop
  above calls ``fn`` for every row after each step with that step's token (one token per
  delta), from the calling thread, while it holds the lock. A running row's text is the
  full decode of its tokens (as the final text) minus the stop-string hold-back
  (``max(len(stop)) - 1`` characters, vLLM's rule) minus an incomplete UTF-8 tail; with a
  tokenizer that cleans up tokenization spaces (which may rewrite a trailing space when the
  next token comes) trailing whitespace is held back too. The last delta carries the rest
  of the final text. Requests run per adapter and per ``batch_size`` chunk in turn, so a
  later chunk's first token comes after the earlier chunk's last. Nothing else changes:
  the same batches, generators and steps run with or without streaming. An exception from
  ``on_delta`` propagates (the KV cache is local to the call; nothing needs aborting).
"""
from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections import OrderedDict
from typing import Optional

import torch

from sleepray.config import EngineConfig
from sleepray.engines.base import (Engine, GenDelta, GenRequest, GenResult, OnDelta, ScoreRequest,
                                   ScoreResult, _Prepared, stream_holdback)

log = logging.getLogger(__name__)


def _group(requests: list, key) -> "OrderedDict[Optional[str], list[int]]":
    groups: OrderedDict = OrderedDict()
    for i, r in enumerate(requests):
        groups.setdefault(key(r), []).append(i)
    return groups


class HFEngine(Engine):
    kind = "transformers"

    def __init__(self, model_path: str, cfg: EngineConfig, seed: int = 0, dtype: str = "auto",
                 device: str = "auto", batch_size: int = 32):
        super().__init__(model_path, cfg)
        from sleepray.models import load_model

        self.base, self.tokenizer = load_model(self.model_path, dtype, device)
        self._peft = None            # a PeftModel once an adapter is loaded
        self.device = next(self.base.parameters()).device
        self.batch_size = int(batch_size)
        self._rng = random.Random(seed)
        self._lock = threading.RLock()
        eos: set[int] = set()
        if self.tokenizer.eos_token_id is not None:
            eos.add(int(self.tokenizer.eos_token_id))
        gc_eos = getattr(getattr(self.base, "generation_config", None), "eos_token_id", None)
        if gc_eos is not None:
            eos.update(int(t) for t in (gc_eos if isinstance(gc_eos, (list, tuple)) else [gc_eos]))
        self._eos = eos
        self._pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._closed = False
        self._streaming = False   # True while a streamed batch decodes

    # --------------------------------------------------------------- model
    @property
    def model(self):
        return self._peft if self._peft is not None else self.base

    def _vocab_size(self) -> int:
        return int(self.base.get_output_embeddings().weight.shape[0])

    @contextlib.contextmanager
    def _use(self, adapter: Optional[str]):
        if self._peft is None:
            yield self.base
        elif adapter is None:
            with self._peft.disable_adapter():
                yield self._peft
        else:
            self._peft.set_adapter(adapter, inference_mode=True)
            yield self._peft

    def _check_open(self):
        if self._closed:
            raise RuntimeError("engine is closed")
        if self._streaming:  # the lock is held, so this is the streaming thread itself
            raise RuntimeError("an on_delta callback must not call the engine")

    # ------------------------------------------------------------ adapters
    def load_adapter(self, name: str, path: str) -> None:
        from sleepray.experts import check_adapter_compatible

        self._check_name(name)
        p = self._check_adapter_folder(path)
        with self._lock:
            self._check_open()
            check_adapter_compatible(self.base, p)
            if name in self._adapters:
                self.unload_adapter(name)
            if self._peft is None:
                from peft import PeftModel
                self._peft = PeftModel.from_pretrained(self.base, p, adapter_name=name,
                                                       is_trainable=False)
            else:
                self._peft.load_adapter(p, adapter_name=name, is_trainable=False)
            self._peft.eval()
            self._adapters[name] = p

    def unload_adapter(self, name: str) -> None:
        with self._lock:
            if self._streaming:
                raise RuntimeError("an on_delta callback must not call the engine")
            self._check_adapter(name)
            del self._adapters[name]
            if not self._adapters:
                # drop the LoRA layers altogether: back to the plain base model
                self.base = self._peft.unload()
                self._peft = None
            else:
                self._peft.delete_adapter(name)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._peft = None
            self.base = None
            self._adapters.clear()

    # ------------------------------------------------------------ generate
    @torch.no_grad()
    def generate(self, requests: list[GenRequest], on_delta: Optional[OnDelta] = None) -> list[GenResult]:
        prepared = [self._prepare_gen(r) for r in requests]
        if on_delta is None:
            return self._grouped(requests, prepared, self._gen_batch)
        return self._grouped(requests, prepared, lambda m, rs, ps, where: self._gen_streamed(
            m, rs, ps, lambda j, d: on_delta(where[j], d)), with_index=True)

    def _gen_streamed(self, model, reqs, preps, on_delta: OnDelta) -> list[GenResult]:
        self._streaming = True  # an on_delta calling the engine would switch adapters mid-batch
        try:
            return self._gen_batch(model, reqs, preps, on_delta=on_delta)
        finally:
            self._streaming = False

    def _grouped(self, requests: list, prepared: list[_Prepared], batch_fn, with_index: bool = False) -> list:
        """Run ``batch_fn(model, reqs, preps)`` per adapter group and batch, in request order
        (``with_index``: ``batch_fn(model, reqs, preps, indices)``, the chunk's request indices)."""
        out: list = [None] * len(requests)
        with self._lock:
            self._check_open()
            for adapter, idx in _group(requests, lambda r: r.adapter).items():
                with self._use(adapter) as model:
                    for s in range(0, len(idx), self.batch_size):
                        chunk = idx[s: s + self.batch_size]
                        args = (model, [requests[i] for i in chunk], [prepared[i] for i in chunk])
                        res = batch_fn(*args, chunk) if with_index else batch_fn(*args)
                        for i, r in zip(chunk, res):
                            out[i] = r
        return out

    def _decode(self, ids: list[int]) -> str:
        """Like vLLM's incremental detokenizer: an incomplete UTF-8 sequence at the end
        (byte-level BPE) is held back rather than shown as U+FFFD."""
        return self.tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd")

    def _sample(self, logits: torch.Tensor, req: GenRequest, gen: torch.Generator) -> int:
        probs = torch.softmax(logits.float() / req.temperature, -1).cpu()
        if req.top_p < 1.0:
            sp, si = probs.sort(descending=True)
            drop = (sp.cumsum(0) - sp) >= req.top_p  # keep the smallest prefix reaching top_p
            sp[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, si, sp)
        return int(torch.multinomial(probs, 1, generator=gen))

    def _stream_text(self, text: str, stop: Optional[list[str]]) -> str:
        """The part of a running row's decoded text that may be sent (module docstring)."""
        hold = stream_holdback(stop)
        if hold:
            text = text[:-hold] if len(text) > hold else ""
        if getattr(self.tokenizer, "clean_up_tokenization_spaces", False):
            text = text.rstrip()
        return text

    def _gen_batch(self, model, reqs: list[GenRequest], preps: list[_Prepared],
                   on_delta: Optional[OnDelta] = None) -> list[GenResult]:
        B = len(reqs)
        L = max(len(p.prompt_ids) for p in preps)
        input_ids = torch.full((B, L), self._pad, dtype=torch.long)
        attn = torch.zeros((B, L), dtype=torch.long)
        for i, p in enumerate(preps):
            n = len(p.prompt_ids)
            input_ids[i, L - n:] = torch.tensor(p.prompt_ids, dtype=torch.long)
            attn[i, L - n:] = 1
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        input_ids, attn, pos = input_ids.to(self.device), attn.to(self.device), pos.to(self.device)
        o = model(input_ids=input_ids, attention_mask=attn, position_ids=pos, use_cache=True)
        past, logits = o.past_key_values, o.logits[:, -1, :].float()

        gens = [torch.Generator().manual_seed(r.seed if r.seed is not None else self._rng.randrange(2**63))
                if r.temperature > 0 else None for r in reqs]
        kmax = max(r.logprobs_topk for r in reqs)
        toks: list[list[int]] = [[] for _ in range(B)]
        lps: list[list[float]] = [[] for _ in range(B)]
        tks: list[list] = [[] for _ in range(B)]
        texts: list[Optional[str]] = [None] * B
        finish: list[Optional[str]] = [None] * B
        steps = max(p.max_tokens for p in preps)
        sent = [""] * B   # streamed text so far, per row
        for step in range(steps):
            logp = torch.log_softmax(logits, -1)
            if kmax:
                tv, ti = logp.topk(min(kmax, logp.shape[-1]), -1)
                tv, ti = tv.cpu().tolist(), ti.cpu().tolist()
            greedy = logits.argmax(-1).cpu().tolist()
            nxt = []
            for i, (r, p) in enumerate(zip(reqs, preps)):
                if finish[i] is not None:
                    nxt.append(self._pad)
                    continue
                t = greedy[i] if r.temperature == 0 else self._sample(logits[i], r, gens[i])
                toks[i].append(t)
                lps[i].append(float(logp[i, t]))
                if r.logprobs_topk:
                    k = r.logprobs_topk
                    tks[i].append(list(zip(ti[i][:k], tv[i][:k])))
                if t in self._eos:
                    finish[i] = "stop"
                text = None
                if finish[i] is None and (r.stop or on_delta is not None):
                    text = self._decode(toks[i])
                if finish[i] is None and r.stop:
                    hits = [text.find(s) for s in r.stop if s in text]
                    if hits:
                        texts[i], finish[i] = text[:min(hits)], "stop"
                if finish[i] is None and len(toks[i]) >= p.max_tokens:
                    finish[i] = "length"
                nxt.append(t)
                if on_delta is not None:
                    if finish[i] is not None:
                        now = texts[i] if texts[i] is not None else (
                            text if text is not None else self._decode(toks[i]))
                    else:
                        now = self._stream_text(text, r.stop)
                    piece = ""
                    if now.startswith(sent[i]):
                        piece, sent[i] = now[len(sent[i]):], now
                    else:  # the tokenizer rewrote text already sent: cannot be taken back
                        log.warning("streamed text of a request diverged from its decode: %r -> %r",
                                    sent[i], now)
                    on_delta(i, GenDelta(
                        text=piece, token_ids=[t], logprobs=[lps[i][-1]], t=time.time(),
                        finished=finish[i] is not None, finish_reason=finish[i],
                        topk=[tks[i][-1]] if r.logprobs_topk else None))
            if all(f is not None for f in finish):
                break
            attn = torch.cat([attn, torch.ones((B, 1), dtype=attn.dtype, device=self.device)], 1)
            pos = pos[:, -1:] + 1
            o = model(input_ids=torch.tensor(nxt, device=self.device)[:, None], attention_mask=attn,
                      position_ids=pos, past_key_values=past, use_cache=True)
            past, logits = o.past_key_values, o.logits[:, -1, :].float()

        results = []
        for i, r in enumerate(reqs):
            text = texts[i] if texts[i] is not None else self._decode(toks[i])
            results.append(GenResult(text=text, token_ids=toks[i], logprobs=lps[i],
                                     topk=tks[i] if r.logprobs_topk else None, adapter=r.adapter,
                                     finish_reason=finish[i]))
        return results

    # --------------------------------------------------------------- score
    @torch.no_grad()
    def score(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        return self._grouped(requests, [self._prepare_score(r) for r in requests], self._score_batch)

    def _score_batch(self, model, reqs: list[ScoreRequest], preps: list[_Prepared]) -> list[ScoreResult]:
        seqs = [p.prompt_ids + p.cont_ids for p in preps]
        L = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), L), self._pad, dtype=torch.long)
        attn = torch.zeros_like(input_ids)
        for i, s in enumerate(seqs):  # right padding: causal attention never sees the pads
            input_ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
            attn[i, :len(s)] = 1
        logits = model(input_ids=input_ids.to(self.device), attention_mask=attn.to(self.device)).logits
        results = []
        for i, (r, p) in enumerate(zip(reqs, preps)):
            n, m = len(p.prompt_ids), len(p.cont_ids)
            if m == 0:
                results.append(ScoreResult([], [], [] if r.logprobs_topk else None))
                continue
            logp = torch.log_softmax(logits[i, n - 1: n - 1 + m].float(), -1)
            cont = torch.tensor(p.cont_ids, device=logp.device)
            lp = logp.gather(1, cont[:, None])[:, 0].cpu().tolist()
            topk = None
            if r.logprobs_topk:
                tv, ti = logp.topk(min(r.logprobs_topk, logp.shape[-1]), -1)
                topk = [list(zip(a, b)) for a, b in zip(ti.cpu().tolist(), tv.cpu().tolist())]
            results.append(ScoreResult(list(p.cont_ids), lp, topk))
        return results
