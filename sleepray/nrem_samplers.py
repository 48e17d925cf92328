"""Where NREM's samples come from: the learner's own model, or generation engines.

A sampler gives three kinds of sequences, with no gradient through sampling:

* ``teacher(prompts)``: from the frozen model before expansion WITH the episode in context;
* ``student(prompts)``: from the expanded model (new expert on) WITHOUT it;
* ``complete(prompts, prefixes)``: the student completing forced prefixes (Learning to
  Imitate), with the log-probs of the sampled tokens under the policy that sampled them
  (the "old" policy of the clipped importance ratio), or None when that is the current model.

``LocalSampler`` samples with the learner's model itself (one process). ``EngineSampler``
asks an engine-like ``generate(list[GenRequest]) -> list[GenResult]`` -- a local vLLM /
transformers engine or a pool of Ray RolloutWorkers -- with the teacher and the student
as LoRA adapter versions: the student's version is the learner's latest published draft,
so its samples are at most ``publish_every`` steps old, and LTI corrects for that with
the rollout's own log-probs.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

from sleepray.engines.base import GenRequest
from sleepray.prompt_format import format_of

Samples = list[list[int]]


def _nonempty(ids: list[int], newline: int) -> list[int]:
    return ids or [newline]


class LocalSampler:
    def __init__(self, bank, tok, max_new_tokens: int, temperature: float, decode: str = "auto",
                 merged: bool = False, fast_guards: bool = False):
        """``decode``: ``nrem.decode`` ("fused": ``sleepray.fused_decode``, refused here with a
        ValueError for a model it cannot run; auto: on a GPU fused where it can, else CUDA graphs;
        the eager loop on a CPU). ``merged``: sample with the active experts merged into the
        weights (``nrem.merged_sampling``, ``sleepray.merged_sampling``); the fused loop merges
        by itself and ignores it. ``fast_guards``: ``nrem.fast_guards`` for the decode steps."""
        from sleepray.fused_decode import auto_loop, fused_weights
        from sleepray.merged_sampling import MergedWeights
        self.bank, self.tok = bank, tok
        on_gpu = next(bank.model.parameters()).device.type == "cuda"
        self.loop = auto_loop(bank.model, on_gpu) if decode == "auto" else decode
        if self.loop == "fused":
            fused_weights(bank.model)
        self.merged = MergedWeights(bank) if merged and self.loop != "fused" else None
        self.fast_guards = fast_guards
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.newline = tok.encode("\n", add_special_tokens=False)[-1]
        self.stop = format_of(tok).stop

    def _sample(self, prompts, prefixes=None) -> Samples:
        from sleepray.sampling import sample_ids
        with self.merged.on() if self.merged else contextlib.nullcontext():
            return [_nonempty(ids, self.newline) for ids in sample_ids(
                self.bank.model, self.tok, prompts, self.max_new_tokens, self.temperature, prefixes, self.stop,
                loop=self.loop, fast_guards=self.fast_guards)]

    @classmethod
    def for_nrem(cls, bank, tok, ncfg) -> "LocalSampler":
        """The sampler of ``NREMConfig`` ``ncfg`` on ``bank``'s model."""
        from sleepray.compiled_blocks import switched_on
        return cls(bank, tok, ncfg.max_new_tokens, ncfg.temperature, ncfg.decode,
                   merged=switched_on(ncfg.merged_sampling, bank.model),
                   fast_guards=switched_on(ncfg.fast_guards, bank.model))

    def teacher(self, prompts: list[str]) -> Samples:
        with self.bank.teacher_mode():
            return self._sample(prompts)

    def student(self, prompts: list[str]) -> Samples:
        return self._sample(prompts)

    def complete(self, prompts: list[str], prefixes: Samples) -> tuple[Samples, Optional[list]]:
        return self._sample(prompts, prefixes), None


@dataclass
class AdapterRef:
    """A LoRA version the engines can load by itself: ``name`` (None = base) and folder."""
    name: Optional[str]
    path: Optional[str] = None


class EngineSampler:
    def __init__(self, generate: Callable[[list[GenRequest], dict], list], tok, max_new_tokens: int,
                 temperature: float, teacher: AdapterRef, student: AdapterRef, seed: int = 0):
        self.generate, self.tok = generate, tok
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.teacher_ref, self.student_ref = teacher, student
        self.newline = tok.encode("\n", add_special_tokens=False)[-1]
        self.stop = list(format_of(tok).stop)
        self._seed = seed

    def _adapters(self, ref: AdapterRef) -> dict:
        return {ref.name: ref.path} if ref.name else {}

    def _run(self, prompts: list[str], ref: AdapterRef):
        reqs = []
        for p in prompts:
            self._seed += 1
            reqs.append(GenRequest(prompt=p, max_tokens=self.max_new_tokens, temperature=self.temperature,
                                   adapter=ref.name, seed=self._seed, stop=self.stop))
        return self.generate(reqs, self._adapters(ref))

    def _ids(self, res) -> list[int]:
        return _nonempty(list(res.token_ids), self.newline)

    def teacher(self, prompts: list[str]) -> Samples:
        return [self._ids(r) for r in self._run(prompts, self.teacher_ref)]

    def student(self, prompts: list[str]) -> Samples:
        return [self._ids(r) for r in self._run(prompts, self.student_ref)]

    def complete(self, prompts: list[str], prefixes: Samples):
        full = [p + self.tok.decode(pre) if pre else p for p, pre in zip(prompts, prefixes)]
        outs = self._run(full, self.student_ref)
        ids = [self._ids(r) for r in outs]
        return ids, [list(r.logprobs) if r.token_ids else None for r in outs]


class TeacherPool:
    """``sampler`` with the teacher's samples drawn ahead: ``k`` per prompt for all of NREM's
    prompts in one batched pass (the teacher is the frozen model before expansion with a fixed
    context, so its distribution does not change during NREM), then each ``teacher`` call
    draws from them at random. ``student`` and ``complete`` go to ``sampler``."""

    def __init__(self, sampler, teacher_prompts: list[str], k: int, rng, batch: int = 256):
        self.inner, self.rng = sampler, rng
        distinct = list(dict.fromkeys(teacher_prompts))
        todo = [p for p in distinct for _ in range(k)]
        drawn: list = []
        for i in range(0, len(todo), batch):
            drawn += sampler.teacher(todo[i: i + batch])
        self.pool = {p: drawn[j * k: (j + 1) * k] for j, p in enumerate(distinct)}

    def teacher(self, prompts: list[str]) -> Samples:
        return [list(self.rng.choice(self.pool[p])) if p in self.pool else self.inner.teacher([p])[0]
                for p in prompts]

    def student(self, prompts: list[str]) -> Samples:
        return self.inner.student(prompts)

    def complete(self, prompts: list[str], prefixes: Samples):
        return self.inner.complete(prompts, prefixes)
