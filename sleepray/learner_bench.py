"""The learner benchmark: a bare PEFT LoRA loop and the NREM step, side by side in one process.

``python -m jobs.bench learner`` runs it (``jobs/bench_learner.py``). For each model shape and
batch size, on one device:

* **bare**: fwd + bwd + AdamW on a LoRA (rank 8, MLP projections) over B x S random tokens,
  plain PEFT (LoRA weights upcast to float32, the model's own loss) and tuned (LoRA weights in
  the model's dtype, liger-kernel's RMSNorm/RoPE where installed, the LM head and cross
  entropy fused a chunk at a time). Tokens/s and MFU by the 6N count: 6 x (matmul parameters,
  a tied embedding once) x tokens / step time / the device's dense bf16 peak;
* **nrem**: the project's own NREM step (``nrem.NREMTrainer.step``: sampling, teacher and
  student forwards, losses, backward, optimizer) with alpha 1 (GKD alone), with LTI and with
  the anchor, timed phase by phase (synchronised). Loss tokens are the continuation tokens
  the divergence is taken on; ``nrem_tok_s`` counts the whole step, ``nrem_tok_s_nosample``
  the step less its sampling (the teacher pool's one-off draw is spread over ``nrem.steps``);
* **switch**: one ``bank.teacher_mode()`` enter and exit, in ms;
* **loss memory**: peak memory of the fused JSD (forward and backward) on 256 x 64 positions
  over the model's vocabulary;
* **decode**: ms per decode step of the in-process sampler at batch B, against the floor of
  reading every weight once per step from memory (parameter bytes / memory bandwidth).

Models are random-initialised from a transformers config (Qwen3 shapes, the full 151,936
vocabulary) unless a folder is given; sampled ids are kept inside the tokenizer's vocabulary
(logits above it masked while sampling only; every loss is over the full vocabulary).
"""
from __future__ import annotations

import contextlib
import functools
import gc
import random
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

SHAPES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, intermediate_size=128, vocab_size=4096),
    "0.6b": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                 head_dim=128, intermediate_size=3072, vocab_size=151936),
    "1.7b": dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                 head_dim=128, intermediate_size=6144, vocab_size=151936),
}
# dense bf16 peak (FLOP/s) and memory bandwidth (bytes/s) by device name
PEAKS = {"H200": (989e12, 4.8e12), "H100": (989e12, 3.35e12), "A100": (312e12, 2.0e12)}


def device_peaks(device: torch.device) -> tuple[Optional[float], Optional[float]]:
    if device.type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device)
    for key, val in PEAKS.items():
        if key in name:
            return val
    return None, None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_bytes(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def build_model(shape: str, device: torch.device, dtype: torch.dtype, tok, attn: str = "sdpa"):
    """A random-initialised Qwen3-shaped causal LM (``SHAPES``), or a local folder / hub id."""
    from transformers import AutoModelForCausalLM, Qwen3Config
    if shape not in SHAPES:
        return AutoModelForCausalLM.from_pretrained(shape, dtype=dtype, attn_implementation=attn).to(device).eval()
    cfg = Qwen3Config(tie_word_embeddings=True, max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-6,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn)
    return model.eval()


def matmul_params(model) -> int:
    """Parameters of the base model (no LoRA), a tied embedding counted once: N of the 6N count."""
    seen, n = set(), 0
    for name, p in model.named_parameters():
        if "lora_" in name or id(p) in seen:
            continue
        seen.add(id(p))
        n += p.numel()
    return n


def param_bytes(model) -> int:
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel() * p.element_size()
    return n


PHASE = "phase:"


def phase_profile(prof, top: int = 6) -> dict:
    """A torch.profiler run over NREM steps, by phase (``Phases`` synchronises at each phase's
    ends, so a kernel belongs to the phase whose host range it starts in): wall ms, device
    kernel ms and launches, the top kernels and the top host ops by self time. A host-bound
    phase has far less kernel time than wall time."""
    events = list(prof.events())
    ranges = [(e.name[len(PHASE):], e.time_range.start, e.time_range.end) for e in events
              if e.name.startswith(PHASE) and e.device_type.name == "CPU"]
    out: dict = {}
    for name, a, b in ranges:
        out.setdefault(name, {"wall_ms": 0.0, "kernel_ms": 0.0, "kernels": 0, "_k": {}, "_h": {}})["wall_ms"] += \
            (b - a) / 1e3
    for e in events:
        if e.name.startswith(PHASE):
            continue
        phase = next((n for n, a, b in ranges if a <= e.time_range.start <= b), None)
        if phase is None:
            continue
        rec = out[phase]
        if e.device_type.name == "CUDA":
            rec["kernel_ms"] += e.device_time / 1e3
            rec["kernels"] += 1
            rec["_k"][e.name[:80]] = rec["_k"].get(e.name[:80], 0.0) + e.device_time / 1e3
        else:
            rec["_h"][e.name[:80]] = rec["_h"].get(e.name[:80], 0.0) + e.self_cpu_time_total / 1e3
    for rec in out.values():
        for key, name in (("_k", "top_kernels_ms"), ("_h", "top_host_ms")):
            rec[name] = dict(sorted(rec.pop(key).items(), key=lambda kv: -kv[1])[:top])
    return out


class Phases:
    """Synchronised wall time per phase name, summed over the calls inside one measurement."""

    def __init__(self, device: torch.device):
        self.device, self.acc = device, {}
        self._depth = 0
        self.only: Optional[set] = None   # phases timed (the rest run as in a real step, unsynchronised)
        self.quiet: set = set()           # phases whose syncs sync_count leaves out

    @contextlib.contextmanager
    def __call__(self, key: str):
        if self._depth or (self.only is not None and key not in self.only):
            yield                  # a phase inside another counts to the outer one only
            return
        if key in self.quiet:
            with _sync_debug(0):
                yield
            return
        self._depth += 1
        sync(self.device)
        t = time.perf_counter()
        try:
            with torch.profiler.record_function(PHASE + key):   # what phase_profile sorts by
                yield
                sync(self.device)
        finally:
            self.acc[key] = self.acc.get(key, 0.0) + time.perf_counter() - t
            self._depth -= 1

    def wrap(self, owner, name: str, key: str) -> Callable[[], None]:
        """Time ``owner.name`` as phase ``key``; returns the undo."""
        orig = getattr(owner, name)

        def timed(*a, **k):
            with self(key):
                return orig(*a, **k)
        setattr(owner, name, timed)
        return lambda: setattr(owner, name, orig)


@contextlib.contextmanager
def _sync_debug(mode: int):
    """``torch.cuda.set_sync_debug_mode(mode)`` inside (1: a warning at every host-device sync)."""
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(prev)


def sync_count(fn) -> dict[str, int]:
    """Host-device syncs while ``fn()`` runs on a GPU (CUDA's sync debug mode), by the Python line
    that asked for them (a :class:`Phases` leaves out those of its ``quiet`` phases)."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with _sync_debug(1):
            fn()
    where: dict[str, int] = {}
    for w in seen:
        if "synchroniz" in str(w.message):
            at = f"{'/'.join(str(w.filename).split('/')[-2:])}:{w.lineno}"
            where[at] = where.get(at, 0) + 1
    return where


# ------------------------------------------------------------------------------ bare loop

def _chunked_ce(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    from torch.utils.checkpoint import checkpoint

    def part(hc, yc):
        return torch.nn.functional.cross_entropy((hc @ weight.t()).float(), yc, reduction="sum")
    total = h.new_zeros((), dtype=torch.float32)
    for i in range(0, h.shape[0], chunk):
        total = total + checkpoint(part, h[i:i + chunk], y[i:i + chunk], use_reentrant=False)
    return total / h.shape[0]


def liger_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import liger_kernel  # noqa: F401
        return True
    except ImportError:
        return False


def apply_liger(model, swiglu: bool = False) -> bool:
    """liger-kernel's fused RMSNorm and RoPE (and SwiGLU MLP) on a Qwen3/Llama model (in place);
    False if not applied."""
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama, apply_liger_kernel_to_qwen3
    except ImportError:
        return False
    fn = {"qwen3": apply_liger_kernel_to_qwen3, "llama": apply_liger_kernel_to_llama}.get(model.config.model_type)
    if fn is None:
        return False
    fn(model=model, cross_entropy=False, fused_linear_cross_entropy=False, rms_norm=True, swiglu=swiglu, rope=True)
    return True


@dataclass
class BareVariant:
    name: str
    lora_bf16: bool     # LoRA weights in the model's dtype (PEFT's default upcasts them to float32)
    liger: bool         # liger RMSNorm + RoPE
    loss: str           # "hf" (the model's loss on full logits) | "chunked" (head + CE a chunk at a time)
    compile: bool = False
    swiglu: bool = False   # liger's SwiGLU MLP (the gate's SiLU and the product in one kernel)
    fused_optimizer: bool = False   # AdamW as PyTorch's fused kernel (one launch for every tensor)
    fused_lora: bool = False        # the adapters added inside the base products (sleepray.fused_lora)
    lce_chunks: int = 1             # liger's fused linear CE: logits a chunk at a time, of this many x B*S*H


BARE_VARIANTS = {
    "peft": BareVariant("peft", False, False, "hf"),
    "tuned": BareVariant("tuned", True, True, "liger"),
    "tuned_chunked": BareVariant("tuned_chunked", True, True, "chunked"),
    "tuned_compile": BareVariant("tuned_compile", True, True, "liger", compile=True),
    "tuned_swiglu": BareVariant("tuned_swiglu", True, True, "liger", swiglu=True),
    "tuned_fused": BareVariant("tuned_fused", True, True, "liger", fused_optimizer=True),
    "tuned_swiglu_fused": BareVariant("tuned_swiglu_fused", True, True, "liger", swiglu=True, fused_optimizer=True),
    "tuned_lora": BareVariant("tuned_lora", True, True, "liger", fused_lora=True),
    "tuned_lora_fused": BareVariant("tuned_lora_fused", True, True, "liger", fused_lora=True, fused_optimizer=True),
    "tuned_lora_ce8": BareVariant("tuned_lora_ce8", True, True, "liger", fused_lora=True, lce_chunks=8),
}


def has_liger_swiglu(model) -> bool:
    """Whether ``model`` runs liger's SwiGLU MLP: its class put in before the model was built, or its
    ``forward`` bound onto an existing MLP (liger's patch of a model instance, which keeps the class
    and renames the module)."""
    return any("LigerSwiGLUMLP" in (type(m).__name__, m._get_name()) for m in model.modules())


def bench_bare(make_model: Callable, variant: BareVariant, B: int, S: int, device, warm: int, iters: int,
               rank: int = 8) -> dict:
    from peft import LoraConfig, get_peft_model
    model = make_model()
    N = matmul_params(model)
    liger = variant.liger and liger_available(device) and apply_liger(model, variant.swiglu)
    # liger patches transformers' classes process-wide: a variant built after tuned_swiglu has its MLP
    # too, so the record says what the model has
    swiglu = has_liger_swiglu(model)
    pm = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, bias="none",
                                          target_modules=["gate_proj", "up_proj", "down_proj"]),
                        autocast_adapter_dtype=not variant.lora_bf16)
    if variant.fused_lora:
        from sleepray.fused_lora import install
        install(pm)
    pm.train()
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, **({"fused": True} if variant.fused_optimizer else {}))
    V = model.config.vocab_size
    g = torch.Generator(device=device).manual_seed(0)
    batches = [torch.randint(0, V, (B, S), device=device, generator=g) for _ in range(2)]
    inner = pm.base_model.model
    backbone = torch.compile(inner.model) if variant.compile else inner.model

    loss_kind = variant.loss if (variant.loss != "liger" or liger_available(device)) else "chunked"
    if loss_kind == "liger":
        from liger_kernel.ops import LigerFusedLinearCrossEntropyFunction

        def lce(weight, h, y):   # liger's module, with its chunks' budget (chunk_mem_const) set
            return LigerFusedLinearCrossEntropyFunction.apply(
                h, weight, y, None, None, -100, 0.0, 0.0, "mean", None, False, None, False, False, False,
                None, None, variant.lce_chunks)[0]

    def loss_fn(ids):
        if loss_kind == "hf":
            return pm(input_ids=ids, labels=ids, use_cache=False).loss
        h = backbone(input_ids=ids, use_cache=False).last_hidden_state[:, :-1].reshape(-1, model.config.hidden_size)
        if loss_kind == "liger":
            return lce(inner.lm_head.weight, h, ids[:, 1:].reshape(-1))
        return _chunked_ce(h, inner.lm_head.weight, ids[:, 1:].reshape(-1))

    times = []
    for i in range(warm + iters):
        if i == warm:
            reset_peak(device)
        sync(device)
        t = time.perf_counter()
        loss = loss_fn(batches[i % 2])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(device)
        if i >= warm:
            times.append(time.perf_counter() - t)
    step = statistics.median(times)
    peak, _ = device_peaks(device)
    tokens = B * S
    out = {"variant": variant.name, "lora_bf16": variant.lora_bf16, "liger": bool(liger), "loss": loss_kind,
           "compile": variant.compile, "swiglu": swiglu, "fused_optimizer": variant.fused_optimizer,
           "fused_lora": variant.fused_lora, "lce_chunks": variant.lce_chunks, "B": B, "S": S, "step_s": step,
           "step_s_all": times, "tok_s": tokens / step,
           "mfu_6n": 6 * N * tokens / step / peak if peak else None, "peak_gib": peak_bytes(device) / 2**30,
           "N": N}
    del pm, model, opt, params, batches, loss
    free(device)
    return out


# ------------------------------------------------------------------------------ NREM step

class _InVocab:
    """While sampling, logits above the tokenizer's vocabulary are -inf (random weights would
    otherwise pick ids the tokenizer cannot decode); losses keep the full vocabulary. One hook,
    installed once and switched by a flag (a compiled decode step is not re-traced per call)."""

    def __init__(self, sampler, model, n: int):
        self.inner, self.on = sampler, {"on": False}
        self.remove = mask_above(model, n, self.on).remove

    def _masked(self, fn, *a):
        self.on["on"] = True
        try:
            return fn(*a)
        finally:
            self.on["on"] = False

    def teacher(self, prompts):
        return self._masked(self.inner.teacher, prompts)

    def student(self, prompts):
        return self._masked(self.inner.student, prompts)

    def complete(self, prompts, prefixes):
        return self._masked(self.inner.complete, prompts, prefixes)


def mask_above(model, n: int, flag: dict | None = None):
    """A forward hook on the output embedding: logits of ids >= ``n`` set to -1e9 (while
    ``flag["on"]``, when given); returns the hook handle."""
    def hook(_m, _i, out):
        if flag is None or flag["on"]:
            out[..., n:] = -1e9
        return out
    return model.get_output_embeddings().register_forward_hook(hook)


_COMPILED = ["nrem.alpha=1.0", "nrem.compile_blocks=true"]                  # decoder blocks compiled
_GRAPHS = _COMPILED + ["nrem.teacher_graph=true"]                           # + the teacher's CUDA graph
_FAST = _GRAPHS + ["nrem.compile_loss=true", "nrem.merged_sampling=true", "nrem.fast_guards=true",
                   "nrem.fused_optimizer=true"]
NREM_MODES = {
    "alpha1": ["nrem.alpha=1.0"],
    "alpha1_compiled": _COMPILED,
    "alpha1_graphs": _GRAPHS,
    "alpha1_fast": _FAST,                  # + compiled loss, merged sampling, repeated calls' guards skipped
    "alpha1_fast_math": _FAST + ["nrem.attention=math"],    # + attention from its math form, compiled in the blocks
    "alpha1_fast_graphs": _FAST + ["nrem.block_graphs=true"],       # + the blocks' passes from CUDA graphs
    "alpha1_fast_math_graphs": _FAST + ["nrem.attention=math", "nrem.block_graphs=true"],
    "alpha1_fast_math_async": _FAST + ["nrem.attention=math", "nrem.async_rows=true"],   # + no sync in the passes
    "alpha1_fast_math_graphs_async": _FAST + ["nrem.attention=math", "nrem.block_graphs=true", "nrem.async_rows=true"],
    "alpha1_ahead4": ["nrem.alpha=1.0", "nrem.sample_ahead=4"],   # four steps' samples from one sampler call
    "alpha1_fast_ahead4": _FAST + ["nrem.sample_ahead=4"],
    "alpha1_fast_graphs_ahead4": _FAST + ["nrem.block_graphs=true", "nrem.sample_ahead=4"],
    "alpha1_fast_math_graphs_ahead4": _FAST + ["nrem.attention=math", "nrem.block_graphs=true",
                                               "nrem.sample_ahead=4"],
    "alpha1_fast_math_async_ahead4": _FAST + ["nrem.attention=math", "nrem.async_rows=true", "nrem.sample_ahead=4"],
    "alpha1_fast_math_graphs_async_ahead4": _FAST + ["nrem.attention=math", "nrem.block_graphs=true",
                                                     "nrem.async_rows=true", "nrem.sample_ahead=4"],
    # the fused decode (nrem.decode=fused) in place of transformers' graphed step
    "alpha1_fused": ["nrem.alpha=1.0", "nrem.decode=fused"],
    "alpha1_fast_math_async_fused": _FAST + ["nrem.attention=math", "nrem.async_rows=true", "nrem.decode=fused"],
    "alpha1_fast_math_graphs_async_fused": _FAST + ["nrem.attention=math", "nrem.block_graphs=true",
                                                    "nrem.async_rows=true", "nrem.decode=fused"],
    "alpha1_fast_math_async_fused_ahead4": _FAST + ["nrem.attention=math", "nrem.async_rows=true",
                                                    "nrem.decode=fused", "nrem.sample_ahead=4"],
    "alpha1_fast_math_graphs_async_fused_ahead4": _FAST + ["nrem.attention=math", "nrem.block_graphs=true",
                                                           "nrem.async_rows=true", "nrem.decode=fused",
                                                           "nrem.sample_ahead=4"],
    "lti": ["nrem.alpha=0.5", "nrem.judge=exact"],
    "anchor": ["nrem.alpha=1.0", "nrem.anchor_weight=1.0", "nrem.anchor_batch=8"],
}


def bench_tokenizer():
    """The tokenizer every benchmark model uses (the shipped ``seed:test`` model's)."""
    from sleepray.models import load_model, resolve_model_path
    return load_model(resolve_model_path("seed:test"))[1]


def bench_nrem(model, tok, mode: str, B: int, new_tokens: int, device, warm: int, iters: int,
               people: int = 4, extra: tuple[str, ...] = (), hooks=None, profile: int = 0) -> dict:
    """The NREM step on ``model`` (wrapped in a fresh expert bank), phase by phase; ``profile``: that
    many more steps under torch.profiler, summed by phase (:func:`phase_profile`).

    ``hooks`` (``nrem.NREMHooks``): this process's rank among ``world`` data-parallel ones (it
    takes ``B // world`` rows a step, gradients all-reduced) and its ``after_step``, timed with
    the step as a runner calls it; the default is one process whose ``after_step`` does nothing."""
    from sleepray import nrem, nrem_forward, nrem_samplers
    from sleepray.anchor import anchor_texts
    from sleepray.config import load_config
    from sleepray.experts import ExpertBank
    from sleepray.prompts import consolidation_prompts
    from sleepray.world import World
    cfg = load_config(None, [f"nrem.batch_size={B}", f"nrem.max_new_tokens={new_tokens}", "experts.rank=8",
                             "experts.lora_alpha=16", f"world.people_per_episode={people}",
                             *NREM_MODES[mode], *extra])
    ncfg = cfg.nrem
    episode = World.from_config(cfg.world).episode(0)
    prompts = consolidation_prompts(episode, ncfg.prompts_per_episode, random.Random(0))
    bank = ExpertBank(model, cfg.experts)
    bank.open_new_expert()
    sampler = _InVocab(nrem_samplers.LocalSampler.for_nrem(bank, tok, ncfg), model, len(tok))
    ph = Phases(device)
    undo = [ph.wrap(nrem_samplers.TeacherPool, "__init__", "teacher_pool"),
            ph.wrap(_InVocab, "teacher", "sampling"), ph.wrap(_InVocab, "complete", "sampling"),
            ph.wrap(nrem_forward.Scorer, "teacher", "teacher_forward"),
            ph.wrap(nrem_forward.Scorer, "student", "student_forward"),
            ph.wrap(nrem_forward.Scorer, "jsd", "loss"), ph.wrap(nrem_forward.Scorer, "token_logprobs", "loss"),
            ph.wrap(nrem_forward.Scorer, "anchor_kl", "anchor"), ph.wrap(nrem, "lti_reward", "reward"),
            ph.wrap(torch.Tensor, "backward", "backward"), ph.wrap(torch.optim.AdamW, "step", "optimizer")]
    try:
        trainer = nrem.NREMTrainer(bank, tok, prompts, ncfg, seed=0, sampler=sampler,
                                   anchor_texts=anchor_texts(cfg) if ncfg.anchor_weight > 0 else None,
                                   hooks=hooks)
        pool_s = ph.acc.get("teacher_pool", 0.0)
        k = ncfg.sample_ahead   # whole groups of k steps; with k > 1 at least two groups of warm-up (shapes)
        warm = warm if k == 1 else max(2 * k, -(-warm // k) * k)
        iters, profile = -(-iters // k) * k, -(-profile // k) * k
        phase_n = k if k > 1 else min(3, iters)         # steps timed phase by phase
        count_n = k if device.type == "cuda" else 0     # steps whose syncs are counted
        total = warm + iters + phase_n + count_n + profile
        if total > ncfg.steps:   # past nrem.steps, sample-ahead draws shorter groups than k
            raise ValueError(f"the benchmark takes {total} NREM steps, more than nrem.steps={ncfg.steps}: "
                             "fewer --warm/--iters/--profile, or a larger nrem.steps override")
        done, last = 0, {}

        def run(n: int, only: Optional[set]) -> tuple[list, list, list]:
            nonlocal done, last
            steps, phases, tokens = [], [], []
            ph.only = only
            for _ in range(n):
                ph.acc = {}
                sync(device)
                t = time.perf_counter()
                rec = trainer.step()
                done += 1
                trainer.hooks.after_step(done, rec, trainer.params, trainer.opt)
                sync(device)
                steps.append(time.perf_counter() - t)
                phases.append(dict(ph.acc))
                tokens.append(rec["loss_tokens"])
                last = rec
            return steps, phases, tokens
        run(warm, None)
        reset_peak(device)
        # timed steps as a real run takes them: only sampling is synchronised and timed (it hands
        # its tokens to the host anyway); a phase's own syncs would keep the host from queueing the
        # next phase's kernels while the GPU runs this one's
        steps, timed_phases, tokens = run(iters, {"sampling"})
        phased, phases, _ = run(phase_n, None)      # then a few steps phase by phase
        syncs, sync_at = None, {}
        if device.type == "cuda":      # a step's syncs outside sampling (it hands its tokens to the host)
            ph.only, ph.quiet = {"sampling"}, {"sampling"}
            for _ in range(count_n):
                for at, n in sync_count(trainer.step).items():
                    sync_at[at] = sync_at.get(at, 0) + n / count_n
            syncs, ph.quiet = sum(sync_at.values()), set()
        ph.only = None
        prof = None
        if profile:
            activities = [torch.profiler.ProfilerActivity.CPU] + \
                ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with torch.profiler.profile(activities=activities) as prof:
                for _ in range(profile):
                    trainer.step()
                sync(device)
    finally:
        sampler.remove()
        for u in undo:
            u()
    # with nrem.sample_ahead k, one step in k samples for all k: the mean over whole groups
    avg = statistics.median if k == 1 else statistics.fmean
    step, toks = avg(steps), avg(tokens)
    per = {name: avg(p.get(name, 0.0) for p in phases) for name in set().union(*phases)}
    sampling = avg(p.get("sampling", 0.0) for p in timed_phases) + pool_s / ncfg.steps
    with torch.no_grad():
        switch_ms = _switch_ms(bank, device)
    out = {"mode": mode, "overrides": list(extra), "B": B, "new_tokens": new_tokens, "sample_ahead": ncfg.sample_ahead,
           "step_s": step + pool_s / ncfg.steps, "step_stat": avg.__name__,
           "step_s_mean": statistics.fmean(steps) + pool_s / ncfg.steps,
           "step_s_all": steps, "rank": trainer.hooks.rank, "world": trainer.hooks.world,
           "rows": trainer.per_rank, "threads": torch.get_num_threads(),
           "loss_tokens": toks, "nrem_tok_s": toks / (step + pool_s / ncfg.steps),
           "nrem_tok_s_nosample": toks / max(1e-9, step + pool_s / ncfg.steps - sampling),
           "sampling_s": sampling, "teacher_pool_s": pool_s, "phases_s": per,
           "step_s_phased": avg(phased) + pool_s / ncfg.steps, "syncs_per_step": syncs, "syncs_at": sync_at,
           "peak_gib": peak_bytes(device) / 2**30, "switch_ms": switch_ms, "divergence": last["divergence"],
           "prompt_tokens": statistics.mean(len(tok.encode(p.teacher_prompt)) for p in prompts)}
    if prof is not None:
        out["profile"] = {"steps": profile, "phases": phase_profile(prof)}
    del trainer, bank, sampler
    free(device)
    return out


def _switch_ms(bank, device, n: int = 50) -> float:
    sync(device)
    t = time.perf_counter()
    for _ in range(n):
        with bank.teacher_mode():
            pass
    sync(device)
    return (time.perf_counter() - t) / n * 1000


def bench_loss_memory(model, device, rows: int = 256, tokens: int = 64, chunk: int = 512) -> dict:
    """Peak memory of the fused JSD's forward and backward on rows x tokens positions."""
    from sleepray.fused_losses import fused_jsd
    from sleepray.lm_forward import Head
    w = model.get_output_embeddings().weight
    H = w.shape[1]
    g = torch.Generator(device=device).manual_seed(0)
    hs = torch.randn(rows * tokens, H, device=device, dtype=w.dtype, generator=g).requires_grad_(True)
    ht = torch.randn(rows * tokens, H, device=device, dtype=w.dtype, generator=g)
    free(device)
    sync(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    reset_peak(device)
    t = time.perf_counter()
    fused_jsd(hs, ht, Head(w.detach()), 0.5, chunk=chunk).backward()
    sync(device)
    out = {"rows": rows, "tokens": tokens, "chunk": chunk, "seconds": time.perf_counter() - t,
           "peak_gib": (peak_bytes(device) - base) / 2**30 if device.type == "cuda" else None,
           "plain_logits_gib": 2 * rows * tokens * w.shape[0] * 4 / 2**30}
    del hs, ht
    free(device)
    return out


DECODE_LOOPS = ("own", "graph", "graph_fast", "fused")
CPU_LOOPS = ("own", "fused")     # "fused" runs eager on a CPU, from CUDA graphs on a GPU


def check_decode_loops(loops, cuda: bool) -> None:
    """A clear ValueError unless ``loops`` are some of :data:`DECODE_LOOPS` that can run here (the
    graphed ones only on a GPU)."""
    if not loops or set(loops) - set(DECODE_LOOPS):
        raise ValueError(f"decode loops must be some of {', '.join(DECODE_LOOPS)}; got {', '.join(loops) or 'none'}")
    if not cuda and not set(loops) & set(CPU_LOOPS):
        raise ValueError("the graphed decode loops need a GPU: ask for 'own' or 'fused' on a CPU")


@torch.no_grad()
def bench_decode(bank, tok, B: int, new_tokens: int, device, prompt_tokens: int = 64, iters: int = 3,
                 loops: tuple[str, ...] = DECODE_LOOPS) -> dict:
    """ms per decode step of the learner's sampling loops on ``bank``'s student (prefill excluded):
    eager ("own"), and on a GPU the CUDA-graph step, alone ("graph") and with the experts merged and
    the repeated steps' guards skipped ("graph_fast": ``nrem.merged_sampling``, ``nrem.fast_guards``);
    the fused blocks ("fused": ``nrem.decode=fused``, from CUDA graphs with ``fast_guards`` on a GPU,
    eager on a CPU); and the weight-read floor. ``loops``: which of them (the graphed ones only on
    a GPU). Each loop other than "own" is checked against it at a near-greedy temperature
    (``<loop>_equal_greedy_frac``: the fraction of 8 draws a row that are the same)."""
    check_decode_loops(loops, device.type == "cuda")
    from sleepray.fused_decode import decode_fused
    from sleepray.merged_sampling import MergedWeights
    from sleepray.sampling import decode, decode_static
    model = bank.model
    V = len(tok)
    g = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(3, V, (B, prompt_tokens), device=device, generator=g)
    attn = torch.ones_like(ids)
    h = mask_above(model, V)
    out = {"B": B}
    graph = functools.partial(decode_static, graphs=True)
    # graph_fast: what NREM's alpha1_fast mode samples with (experts merged, repeated steps' guards skipped)
    fast = functools.partial(decode_static, graphs=True, fast_guards=True)
    fused = functools.partial(decode_fused, graphs=device.type == "cuda", fast_guards=device.type == "cuda")
    every = {"own": (decode, None), "graph": (graph, None), "graph_fast": (fast, MergedWeights(bank)),
             "fused": (fused, None)}
    loops = {k: v for k, v in every.items() if k in loops and (device.type == "cuda" or k in CPU_LOOPS)}
    try:
        for name, (fn, merge) in loops.items():
            def run(n):
                sync(device)
                t = time.perf_counter()
                with merge.on() if merge else contextlib.nullcontext():
                    fn(model, ids, attn, n, 1.0, [], tok.pad_token_id)
                sync(device)
                return time.perf_counter() - t
            t0 = time.perf_counter()
            run(new_tokens)                                   # warm-up (records the graphs)
            out[f"{name}_warmup_s"] = time.perf_counter() - t0
            full = statistics.median(run(new_tokens) for _ in range(iters))
            one = statistics.median(run(1) for _ in range(iters))   # the prefill and a first draw
            out[f"{name}_decode_ms"] = (full - one) / max(1, new_tokens - 1) * 1000
        graphed = [k for k in ("graph", "graph_fast") if k in loops]
        checked = {"graph": graphed[0]} if graphed else {}          # record key -> loop checked
        if "fused" in loops:
            checked["fused"] = "fused"
        if checked:                                           # near-greedy draws vs eager
            torch.manual_seed(0)
            a = decode(model, ids, attn, 8, 1e-4, [], tok.pad_token_id)
            for key, name in checked.items():
                fn, merge = loops[name]
                torch.manual_seed(0)
                with merge.on() if merge else contextlib.nullcontext():
                    b = fn(model, ids, attn, 8, 1e-4, [], tok.pad_token_id)
                out[f"{key}_equal_greedy_frac"] = float((a == b).float().mean())
            if graphed:
                out["graph_equal_loop"] = graphed[0]
    finally:
        h.remove()
    _, bw = device_peaks(device)
    out["decode_ms"] = min(v for k, v in out.items() if k.endswith("_decode_ms"))
    out["decode_floor_ms"] = param_bytes(model) / bw * 1000 if bw else None
    return out
