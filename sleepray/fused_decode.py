"""The learner's fastest in-process sampling (``nrem.decode=fused``): Llama-shaped blocks with fused weights.

transformers' decode step, even replayed from a CUDA graph with the experts merged, runs about
20 kernels a block (0.6B at batch 16 on the H200: 2.4-2.7 ms a step against a 0.26 ms
weight-read floor, every kernel near its 3-4 us launch floor). It needs fewer kernels, not
faster ones. For the families whose blocks are Llama's (Llama, Mistral, Qwen2, Qwen3) this
module runs the blocks itself:

* each block's weights are kept in buffers of fixed address, q|k|v and gate|up side by side
  (one matrix product for each triple or pair), rewritten at every sampling call with the
  active experts merged (one ``addmm`` an expert: W + scaling x B A); a frozen projection
  without an expert is copied again only when it changed. They cost one copy of the blocks'
  weights (``nrem.merged_sampling``, not used with this loop, copied the adapted ones only);
* its own KV cache [B, kv heads, L, head dim] a block, and at one query a row a grouped-query
  attention of two small products and a softmax, with no repeated keys;
* on a GPU the whole decode step is one torch.compile graph replayed from a CUDA graph
  (inductor fuses each norm with the residual add before it, q/k norms with RoPE, SiLU with
  the product); on a CPU it runs eager.

The prefill runs the same code, with PyTorch's sdpa for many queries (on a GPU, rows left-padded
to a multiple of 64 tokens and replayed from a CUDA graph a shape too). The rotary embedding,
the embedding, the norms and the output head are the model's own modules (RoPE scaling, tied
weights, LoRA and hooks on the head keep working). In float32 the logits are the model's within
rounding and the draws the same (``tests/test_fused_decode.py``). On the H200 (2668d5c,
``docs/results/bench_learner_h200.json``) a step took 1.78 ms against transformers' graphed
2.71 ms at 0.6B with 16 rows, 2.36 against 3.15 ms at 1.7B.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from sleepray.compiled_blocks import allow_recompiles, decoder_layers, repeat_call
from sleepray.draws import cache_length, sample_cached
from sleepray.fused_lora import lora_variant

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
_PROJ = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


def _base(model) -> nn.Module:
    """The transformers model under a PEFT wrapper (or ``model`` itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def sliding_window(cfg) -> Optional[int]:
    """The window of a model config's sliding-window layers, or None if it has none."""
    on = (cfg.model_type == "mistral" or "sliding_attention" in (getattr(cfg, "layer_types", None) or [])
          or getattr(cfg, "use_sliding_window", False))
    return getattr(cfg, "sliding_window", None) if on else None


def unsupported(model) -> Optional[str]:
    """Why ``model`` cannot decode fused (a sentence), or None if it can."""
    base = _base(model)
    cfg = getattr(base, "config", None)
    if cfg is None:
        return "a model without a transformers config"
    if cfg.model_type not in FAMILIES:
        return f"model type {cfg.model_type!r} (fused decode runs {', '.join(FAMILIES)})"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r} (fused decode runs SiLU-gated MLPs)"
    rotary = getattr(base.get_decoder(), "rotary_emb", None)
    if rotary is None:
        return "a model without a rotary embedding module"
    if getattr(rotary, "rope_type", "default") in ("dynamic", "longrope"):
        return f"RoPE {rotary.rope_type!r} (it rescales with the row's length, which a CUDA graph cannot follow)"
    try:
        blocks = decoder_layers(model)
    except ValueError:
        return "a model without a list of decoder blocks"
    for block in blocks:
        for part, names in _PROJ.items():
            for name in names:
                m = getattr(getattr(block, part, None), name, None)
                if not isinstance(getattr(m, "base_layer", m), nn.Linear):
                    return f"a block without a Linear {part}.{name}"
                why = next(filter(None, (lora_variant(m, a) for a in getattr(m, "lora_A", {}))), None)
                if why:
                    return f"{why} on {part}.{name}"
    emb = model.get_input_embeddings()
    if hasattr(emb, "get_delta_weight") and emb.active_adapters:
        return "LoRA on the input embedding"
    return None


def auto_loop(model, on_gpu: bool) -> str:
    """``nrem.decode=auto``: on a GPU, "fused" where the family allows it and no sliding window
    could cut a row, else "graph"; on a CPU "own". (Eager on a CPU the fused loop is 1.4x faster a
    decode step on ``seed:small`` but the default sleep only a few percent, within that machine's
    spread, and it costs a copy of the blocks' weights: ask for it with ``nrem.decode=fused``.)"""
    if on_gpu and unsupported(model) is None and sliding_window(_base(model).config) is None:
        return "fused"
    return "graph" if on_gpu else "own"


def _norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """The model's RMSNorm ``norm`` as transformers' Llama/Qwen compute it: in float32, then the
    weight in the input's dtype (read from the module at each call)."""
    xf = x.float()
    return norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + _eps(norm))).to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on [B, T, heads, D] with cos/sin [B, T, D] (transformers' rotate_half form)."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


def _plain_lora(m, adapter: str, dst: torch.Tensor) -> bool:
    """Whether ``adapter`` on LoRA layer ``m`` merges by one ``addmm`` into ``dst`` (else PEFT's
    ``get_delta_weight``: fan-in/fan-out layouts, adapters in another dtype)."""
    return m.lora_A[adapter].weight.dtype == dst.dtype and not getattr(m, "fan_in_fan_out", False)


def _eps(norm: nn.Module) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


class FusedWeights:
    """One copy of every block's weights with the active experts merged, q|k|v and gate|up
    concatenated; :meth:`refresh` rewrites them in place (the buffers keep their addresses).
    Also holds the KV caches and, on a GPU, the compiled step. Made by :func:`fused_weights`."""

    def __init__(self, model):
        why = unsupported(model)
        if why:
            raise ValueError(f"nrem.decode=fused cannot run {why}; use 'graph' or 'own'")
        base = _base(model)
        cfg = base.config
        self.model, self.blocks = model, list(decoder_layers(model))
        self.decoder = base.get_decoder()
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        attn0 = self.blocks[0].self_attn
        self.head_dim = getattr(attn0, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scaling = float(getattr(attn0, "scaling", self.head_dim ** -0.5))
        self.window = sliding_window(cfg)
        self.layers = [self._alloc(b) for b in self.blocks]
        self.device = self.layers[0]["qkv_w"].device
        self._copied: dict = {}   # (block, projection) -> (data pointer, version) of a frozen weight copied alone
        self.caches: dict = {}    # (batch, length) -> (keys, values), one [B, kv heads, L, head dim] a block
        self.step = None          # the compiled forward (GPU)
        for layer in self.layers:
            for t in layer.values():
                if isinstance(t, torch.Tensor) and t.is_cuda:
                    torch._dynamo.mark_static_address(t)

    @staticmethod
    def _linears(block) -> dict[str, nn.Module]:
        return {name: getattr(getattr(block, part), name) for part, names in _PROJ.items() for name in names}

    def _alloc(self, block) -> dict:
        lin = self._linears(block)
        base = {k: getattr(m, "base_layer", m) for k, m in lin.items()}
        w = base["q_proj"].weight

        def cat(names):
            rows = sum(base[n].out_features for n in names)
            bias = any(base[n].bias is not None for n in names)
            return (torch.empty(rows, base[names[0]].in_features, dtype=w.dtype, device=w.device),
                    torch.zeros(rows, dtype=w.dtype, device=w.device) if bias else None)
        qkv_w, qkv_b = cat(("q_proj", "k_proj", "v_proj"))
        gu_w, gu_b = cat(("gate_proj", "up_proj"))
        o_w, o_b = cat(("o_proj",))
        d_w, d_b = cat(("down_proj",))
        return dict(qkv_w=qkv_w, qkv_b=qkv_b, o_w=o_w, o_b=o_b, gu_w=gu_w, gu_b=gu_b, d_w=d_w, d_b=d_b,
                    split=(base["q_proj"].out_features, base["k_proj"].out_features, base["v_proj"].out_features))

    @torch.no_grad()
    def refresh(self) -> None:
        """Each buffer := the weights the model acts with now (base plus its active experts).

        A projection with experts is written by one ``addmm`` an expert (W + scaling x B A, what
        PEFT's merge gives a Linear; PEFT's ``get_delta_weight`` for other layouts). One without
        is copied, except a frozen weight with the same data pointer and version as at its last
        copy (the base under the experts). A weight that trains is copied every call: PyTorch's
        fused AdamW writes it without moving its version."""
        for i, (block, layer) in enumerate(zip(self.blocks, self.layers)):
            lin = self._linears(block)
            for key, names in (("qkv", ("q_proj", "k_proj", "v_proj")), ("gu", ("gate_proj", "up_proj")),
                               ("o", ("o_proj",)), ("d", ("down_proj",))):
                row = 0
                for name in names:
                    m = lin[name]
                    base = getattr(m, "base_layer", m)
                    n = base.out_features
                    self._write(m, base, layer[f"{key}_w"][row:row + n], (i, name))
                    if layer[f"{key}_b"] is not None and base.bias is not None:
                        layer[f"{key}_b"][row:row + n].copy_(base.bias)
                    row += n

    def _write(self, m, base: nn.Linear, dst: torch.Tensor, where) -> None:
        w = base.weight
        experts = [a for a in m.active_adapters if a in m.lora_A] \
            if hasattr(m, "lora_A") and not m.disable_adapters and not m.merged else []
        if not experts:
            seen = None if w.requires_grad else (w.data_ptr(), w._version)
            if seen is None or self._copied.get(where) != seen:
                dst.copy_(w)
                self._copied[where] = seen
            return
        self._copied.pop(where, None)
        for k, a in enumerate(experts):
            why = lora_variant(m, a)
            if why:
                raise ValueError(f"nrem.decode=fused cannot merge {why} (expert {a!r}); use 'graph' or 'own'")
            A, B = m.lora_A[a].weight, m.lora_B[a].weight
            if _plain_lora(m, a, dst):
                if k == 0:
                    torch.addmm(w, B, A, alpha=m.scaling[a], out=dst)
                else:
                    dst.addmm_(B, A, alpha=m.scaling[a])
            else:
                if k == 0:
                    dst.copy_(w)
                dst.add_(m.get_delta_weight(a).to(dst.dtype))

    def cache(self, B: int, L: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Zeroed-once KV caches for ``B`` rows of ``L`` tokens, reused across calls of that shape."""
        if (B, L) not in self.caches:
            if len(self.caches) >= 8:
                self.caches.clear()
            w = self.layers[0]["qkv_w"]
            shape = (B, self.kv_heads, L, self.head_dim)
            made = tuple([torch.zeros(shape, dtype=w.dtype, device=w.device) for _ in self.layers] for _ in range(2))
            for t in made[0] + made[1]:
                if t.is_cuda:
                    torch._dynamo.mark_static_address(t)
            self.caches[(B, L)] = made
        return self.caches[(B, L)]

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, cpos: torch.Tensor, keep: torch.Tensor,
                kc: list[torch.Tensor], vc: list[torch.Tensor]) -> torch.Tensor:
        """Logits [B, V] after the last of ``ids`` [B, T] (positions ``pos`` [B, T]); writes each
        block's keys and values at cache columns ``cpos`` [T]; ``keep`` [B, L]: the cache columns
        a row may attend to (its own tokens, up to the newest)."""
        B, T = ids.shape
        H, Hk, D = self.heads, self.kv_heads, self.head_dim
        x = self.model.get_input_embeddings()(ids)
        cos, sin = self.decoder.rotary_emb(x, pos)
        for i, (blk, p) in enumerate(zip(self.blocks, self.layers)):
            attn = blk.self_attn
            q, k, v = F.linear(_norm(x, blk.input_layernorm), p["qkv_w"], p["qkv_b"]).split(p["split"], -1)
            q, k, v = q.view(B, T, H, D), k.view(B, T, Hk, D), v.view(B, T, Hk, D)
            if getattr(attn, "q_norm", None) is not None:
                q, k = _norm(q, attn.q_norm), _norm(k, attn.k_norm)
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            kc[i].index_copy_(2, cpos, k.transpose(1, 2))
            vc[i].index_copy_(2, cpos, v.transpose(1, 2))
            a = self._attend(q, kc[i], vc[i], keep, cpos)
            x = x + F.linear(a, p["o_w"], p["o_b"])
            g, u = F.linear(_norm(x, blk.post_attention_layernorm), p["gu_w"], p["gu_b"]).chunk(2, -1)
            x = x + F.linear(F.silu(g) * u, p["d_w"], p["d_b"])
        return self.model.get_output_embeddings()(_norm(x[:, -1:], self.decoder.norm))[:, -1]

    def _attend(self, q, k, v, keep, cpos) -> torch.Tensor:
        """[B, T, H * D]: queries ``q`` [B, T, H, D] over cache ``k``/``v`` [B, Hk, L, D]."""
        B, T, H, D = q.shape
        Hk, L = k.shape[1], k.shape[2]
        if T == 1:   # one query a row: heads grouped by their key head, no repeated keys
            s = torch.matmul(q.view(B, Hk, H // Hk, D), k.transpose(-1, -2)) * self.scaling
            s = s.float().masked_fill(~keep[:, None, None, :], float("-inf"))
            o = torch.matmul(torch.softmax(s, -1).to(v.dtype), v)
            return o.reshape(B, 1, H * D)
        # many queries (the prefill): causal over the row's own columns; a padding query sees itself
        col = torch.arange(L, device=q.device)
        mask = (keep[:, None, :] & (col[None, None, :] <= cpos[None, :, None])) | (col == cpos[:, None])[None]
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.repeat_interleave(H // Hk, 1),
                                           v.repeat_interleave(H // Hk, 1), attn_mask=mask[:, None],
                                           scale=self.scaling)
        return o.transpose(1, 2).reshape(B, T, H * D)


def fused_weights(model) -> FusedWeights:
    """``model``'s fused weights, made once and kept on the model itself (not refreshed here). Made
    anew when the model moved to another device. Looked up in the model's own ``__dict__``: a
    PEFT wrapper would otherwise find the weights of the model it wraps."""
    fw = model.__dict__.get("_sleepray_fused")
    if fw is None or fw.device != next(model.parameters()).device:
        fw = FusedWeights(model)
        object.__setattr__(model, "_sleepray_fused", fw)
    return fw


def decode_fused(model, ids: torch.Tensor, attn: torch.Tensor, max_new_tokens: int, temperature: float,
                 stop_ids: list[int], pad_id: int, stopped=None, graphs: bool = False,
                 fast_guards: bool = False) -> torch.Tensor:
    """:func:`sleepray.sampling.decode` through :class:`FusedWeights` (refreshed first: the experts
    active now are merged); a cache of length rounded up to 64 a shape, reused across calls.
    ``graphs``: the prefill (rows left-padded to a multiple of 64) and each decode step replayed
    from CUDA graphs; ``fast_guards``: the repeated decode steps skip the guards that do not tell
    graphs apart. Draws as ``decode``."""
    fw = fused_weights(model)
    if fw.window and ids.shape[1] + max_new_tokens > fw.window:   # it attends to the whole row
        raise ValueError(f"nrem.decode=fused: {ids.shape[1] + max_new_tokens} tokens a row exceed the model's "
                         f"sliding window ({fw.window}); use 'graph' or 'own'")
    fw.refresh()
    if graphs:   # rows left-padded to a multiple of 64: few prefill shapes, each one CUDA graph
        extra = -ids.shape[1] % 64
        ids, attn = F.pad(ids, (extra, 0), value=pad_id), F.pad(attn, (extra, 0))
    B, n = ids.shape
    kc, vc = fw.cache(B, cache_length(n, max_new_tokens))
    keep = torch.zeros((B, kc[0].shape[2]), dtype=torch.bool, device=ids.device)
    keep[:, :n] = attn.bool()
    pos = (attn.cumsum(-1) - 1).clamp_min(0)
    if graphs:
        torch.compiler.cudagraph_mark_step_begin()
        if fw.step is None:
            allow_recompiles(64)   # prefill and decode shapes of every batch the learner samples
            fw.step = torch.compile(fw.forward, mode="reduce-overhead", dynamic=False, fullgraph=True)
        one = fw.step
    else:
        one = fw.forward
    logits = one(ids, pos, torch.arange(n, device=ids.device), keep, kc, vc)
    logits = logits.clone() if graphs else logits
    again = repeat_call(one) if graphs and fast_guards else one
    return sample_cached(logits, lambda *a: one(*a, kc, vc), lambda *a: again(*a, kc, vc), keep, pos[:, -1:], n,
                         max_new_tokens, temperature, stop_ids, pad_id, stopped, clone=graphs)
