"""The methods the evaluation compares, one class each, on the same stream and seeds.

Every method gets its own storage folder with a MemoryStore. The evaluation loop
appends each part of the stream to it (its documents: questions and answers are
evaluation data and never enter a store), then calls :meth:`Method.sleep`: the method
reads the short-term episodes back (``MemoryStore.export_episodes("short_term")``:
documents only), trains, and marks them consolidated. :meth:`Method.model` gives the model to measure.

| name | what one sleep does |
|---|---|
| ``no_sleep`` | nothing: the base model, closed-book |
| ``in_context`` | nothing; measured with each seen episode's own documents in its context (oracle retrieval, unbounded context: the upper reference) |
| ``sft`` | a fresh expert, plain SFT (next-token loss) on the raw documents of the part |
| ``sft_self_qa`` | a fresh expert, SFT on the same kind of self-written Q/A a sleep trains on: questions the model writes with the episode in context, answered by it with the episode in context |
| ``seal`` | a fresh expert, SFT on self-edits: dreams the model writes with the episode in context (``eval.seal_formats``, default ``rem.formats``), every one used: no selection, no trials, no ReST-EM, no replay, no random expert, no NREM |
| ``distill_no_expansion`` | on-policy distillation (NREM's GKD divergence, no Learning to Imitate) into ALL weights of the model, no expert: the teacher is a frozen copy of the model as it was before this sleep, with the episode in context |
| ``no_expansion`` | the Sleep ablation without expansion: NREM as configured (GKD + Learning to Imitate) into all weights; REM is not run (dreaming needs expert slots: the random expert, isolated trials of the new expert, the dream writer) |
| ``sleep`` | the method: ``sleepray.sleep.run_sleep`` with the in-process ``LocalBackend`` (NREM -> REM -> publish, deep sleep every K) |
| ``sleep_no_rem`` | ``sleep`` with ``rem.enabled=false`` |
| ``sleep_no_lti`` | ``sleep`` with ``nrem.use_lti=false`` |
| ``sleep_no_replay`` | ``sleep`` with ``rem.replay=false`` |

``sft``, ``sft_self_qa`` and ``seal`` train ``eval.baseline_steps`` steps (default ``nrem.steps``) at
``eval.baseline_lr`` (default ``nrem.lr``), batch ``nrem.batch_size``: the budget of the
NREM-vs-SFT comparison in ``sleepray.nrem_eval``. The whole-model methods train at
``eval.full_model_lr`` (all weights move, so a LoRA learning rate is too large).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import random
from pathlib import Path
from typing import Optional

import torch

from sleepray.memory import MemoryStore
from sleepray.prompt_format import format_of
from sleepray.storage import Storage

log = logging.getLogger(__name__)


def _sleep_seed(seed: int, i: int, salt: int = 0) -> int:
    return 7919 * seed + 104_729 * (i + 1) + salt


class Method:
    """One method on one seed; subclasses override :meth:`_train` and maybe :meth:`model`."""

    name = ""
    trains = True
    measured_in_context = False  # R uses the episode in context for seen episodes

    def __init__(self, cfg, storage: Path, seed: int):
        self.cfg, self.storage, self.seed = cfg, Path(storage), seed
        self.store = MemoryStore(Storage(self.storage).memory)
        self.version = 0  # bumped whenever the weights change

    def append(self, episodes: list) -> None:
        self.store.append(episodes)

    def sleep(self, i: int) -> dict:
        """Consolidate the short-term memory (sleep ``i``, 0-based); returns what it did."""
        torch.manual_seed(_sleep_seed(self.seed, i))  # a fresh expert's initialisation
        info = self._train(i)
        if self.trains:
            self.version += 1
        return info

    def _train(self, i: int) -> dict:
        return {}

    def short_term(self) -> list:
        """The episodes to consolidate, as training code sees them: no answers, no facts."""
        return self.store.export_episodes("short_term")

    def consolidate(self, episodes: list, i: int) -> None:
        ids = [e.episode_id for e in episodes]
        if ids:
            self.store.mark_consolidated(ids, f"eval-s{i + 1:04d}", adapter_version=f"eval-v{i + 1:04d}")

    def model(self):
        """(model, tokenizer) to measure, as the method stands now."""
        raise NotImplementedError

    def close(self) -> None:
        pass


# ------------------------------------------------------------------ no training

class _BaseModel(Method):
    trains = False

    def __init__(self, cfg, storage, seed):
        super().__init__(cfg, storage, seed)
        from sleepray.models import load_from_config
        self._model, self._tok, _ = load_from_config(self.cfg, progress=False)

    def model(self):
        return self._model, self._tok


class NoSleep(_BaseModel):
    name = "no_sleep"


class InContext(_BaseModel):
    name = "in_context"
    measured_in_context = True


# ------------------------------------------------------------------ fresh expert per sleep

class _ExpertMethod(Method):
    """A bank of experts on the base model; each sleep opens, trains and freezes one."""

    def __init__(self, cfg, storage, seed):
        super().__init__(cfg, storage, seed)
        from sleepray.experts import ExpertBank
        from sleepray.models import load_from_config
        model, self.tok, _ = load_from_config(self.cfg, progress=False)
        self.bank = ExpertBank(model, self.cfg.experts)

    def _open(self) -> str:
        from sleepray.experts import ExpertBank
        if not self.bank.free_slots:  # every slot on: merge them into the base (a deep sleep)
            self.bank = ExpertBank(self.bank.deep_sleep(), self.cfg.experts)
        return self.bank.open_new_expert()

    @property
    def steps(self) -> int:
        return self.cfg.eval.baseline_steps or self.cfg.nrem.steps

    @property
    def lr(self) -> float:
        return self.cfg.eval.baseline_lr or self.cfg.nrem.lr

    def model(self):
        return self.bank.model, self.tok


class SFT(_ExpertMethod):
    name = "sft"

    def _train(self, i: int) -> dict:
        from sleepray.lm import sft
        eps = self.short_term()
        texts = [d for ep in eps for d in ep.documents]
        slot = self._open()
        self.bank.model.eval()
        losses = sft(self.bank.trainable_parameters(), self.bank.model, self.tok, texts, self.steps,
                     self.lr, batch_size=self.cfg.nrem.batch_size, seed=_sleep_seed(self.seed, i, 1))
        self.bank.freeze_current()
        self.consolidate(eps, i)
        return {"expert": slot, "texts": len(texts), "steps": self.steps,
                "loss_first": losses[0], "loss_last": losses[-1]}


class SFTSelfQA(_ExpertMethod):
    """SFT on the same self-written Q/A a sleep trains on: the model writes questions about each
    episode with it in context (as NREM's query prompts: ``nrem.prompts_per_episode / 2`` of
    them), answers them greedily with the episode in context (the teacher's answers), and a
    fresh expert is fine-tuned on ``Q: question / A: answer`` (loss on the answer)."""
    name = "sft_self_qa"

    def _train(self, i: int) -> dict:
        from sleepray.lm import sft
        from sleepray.prompts import model_question_writer
        from sleepray.rem import teacher_probe_targets
        eps = self.short_term()
        n = max(1, round(self.cfg.nrem.prompts_per_episode / 2))
        writer = model_question_writer(self.bank, self.tok, self.cfg.nrem.temperature,
                                       seed=_sleep_seed(self.seed, i, 6))
        pairs = [t for ep in eps for t in teacher_probe_targets(self.bank, self.tok, ep, n, writer,
                                                                self.cfg.rem.probe_max_new_tokens)]
        slot = self._open()
        info = {"expert": slot, "pairs": len(pairs), "steps": 0}
        if pairs:
            self.bank.model.eval()
            losses = sft(self.bank.trainable_parameters(), self.bank.model, self.tok, [t.text for t in pairs],
                         self.steps, self.lr, batch_size=self.cfg.nrem.batch_size,
                         seed=_sleep_seed(self.seed, i, 7), prompts=[t.prompt for t in pairs])
            info.update(steps=self.steps, loss_first=losses[0], loss_last=losses[-1])
        self.bank.freeze_current()
        self.consolidate(eps, i)
        return info


class SEAL(_ExpertMethod):
    name = "seal"

    def _train(self, i: int) -> dict:
        from sleepray.rem import train_dreams, write_dreams
        eps = self.short_term()
        ev = self.cfg.eval
        rcfg = self.cfg.rem.model_copy(update={
            "formats": list(ev.seal_formats or self.cfg.rem.formats),
            "dreams_per_episode": ev.seal_dreams_per_episode or self.cfg.rem.dreams_per_episode,
            "random_expert": False, "replay": False, "curriculum": "random",
            "sft_steps": self.steps, "sft_lr": self.lr, "batch_size": self.cfg.nrem.batch_size})
        rng = random.Random(_sleep_seed(self.seed, i, 2))
        slot = self._open()
        dreams = [d for ep in eps for d in write_dreams(self.bank, self.tok, ep, rcfg, rng, writer=None)]
        info = train_dreams(self.bank, self.tok, dreams, rcfg, buffer=None, rng=rng)
        self.bank.freeze_current()
        self.consolidate(eps, i)
        info.pop("difficulty_order", None)
        return {"expert": slot, "dreams": len(dreams), **info}


# ------------------------------------------------------------------ whole model, no expert

class WholeModel:
    """The bank interface NREM uses (``model``, ``training``, ``trainable_parameters``,
    ``teacher_mode``, ``on``) over a plain model whose every weight trains.

    The teacher is a frozen copy of the model taken by :meth:`snapshot` (the model before
    this sleep): inside ``teacher_mode()``, ``model`` is that copy. (The copy doubles the
    weights' memory: fine for the seed models, a cost to know about for large ones.)
    """

    training = "whole_model"
    on: tuple = ()  # no frozen experts

    def __init__(self, model):
        self.student = model
        self.teacher = copy.deepcopy(model).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self._teacher_on = False

    @property
    def model(self):
        return self.teacher if self._teacher_on else self.student

    def snapshot(self) -> None:
        self.teacher.load_state_dict(self.student.state_dict())

    def trainable_parameters(self) -> list:
        params = list(self.student.parameters())
        for p in params:
            p.requires_grad_(True)
        return params

    def freeze(self) -> None:
        for p in self.student.parameters():
            p.requires_grad_(False)
            p.grad = None

    @contextlib.contextmanager
    def teacher_mode(self):
        prev, self._teacher_on = self._teacher_on, True
        try:
            yield
        finally:
            self._teacher_on = prev


class _WholeModelNREM(Method):
    use_lti: Optional[bool] = None  # None: as configured

    def __init__(self, cfg, storage, seed):
        super().__init__(cfg, storage, seed)
        from sleepray.models import load_from_config
        model, self.tok, _ = load_from_config(self.cfg, progress=False)
        self.bank = WholeModel(model)

    def _train(self, i: int) -> dict:
        from sleepray.nrem import run_nrem
        from sleepray.prompts import consolidation_prompts, model_question_writer
        from sleepray.nrem_step import nrem_anchor
        eps = self.short_term()
        ncfg = self.cfg.nrem.model_copy(update={
            "lr": self.cfg.eval.full_model_lr,
            "use_lti": self.cfg.nrem.use_lti if self.use_lti is None else self.use_lti})
        self.bank.snapshot()
        rng = random.Random(_sleep_seed(self.seed, i, 3))
        writer = model_question_writer(self.bank, self.tok, ncfg.temperature, seed=_sleep_seed(self.seed, i, 5))
        prompts = [p for ep in eps for p in consolidation_prompts(ep, ncfg.prompts_per_episode, rng, writer,
                                                                     fmt=format_of(self.tok))]
        result = run_nrem(self.bank, self.tok, prompts, ncfg, seed=_sleep_seed(self.seed, i, 4),
                          progress=False, anchor_texts=nrem_anchor(self.cfg))
        self.bank.freeze()
        self.consolidate(eps, i)
        return {"prompts": len(prompts), "steps": ncfg.steps, "use_lti": ncfg.use_lti, **result.final}

    def model(self):
        return self.bank.student, self.tok


class DistillNoExpansion(_WholeModelNREM):
    name = "distill_no_expansion"
    use_lti = False


class NoExpansion(_WholeModelNREM):
    name = "no_expansion"


# ------------------------------------------------------------------ the method itself

class Sleep(Method):
    """``sleepray.sleep.run_sleep`` over this method's storage, with the in-process backend."""

    name = "sleep"
    overrides: dict = {}

    def __init__(self, cfg, storage, seed):
        cfg = cfg.model_copy(deep=True)
        for dotted, value in self.overrides.items():
            section, key = dotted.split(".")
            setattr(getattr(cfg, section), key, value)
        cfg.cycle.storage = str(storage)
        super().__init__(cfg, storage, seed)
        self._loaded = None  # (version, model, tok)

    def _train(self, i: int) -> dict:
        from sleepray.sleep import LocalBackend, run_sleep
        rec = run_sleep(self.cfg, self.storage, backend=LocalBackend(progress=False), progress=False)
        if rec is None:
            return {"skipped": "short-term memory was empty"}
        return {"version": rec.version, "phases": rec.phases,
                **{f"{ph}_{k}": v for ph in rec.phases for k, v in rec.metrics(ph).items()
                   if isinstance(v, (int, float, str)) and k != "finished_at"}}

    def model(self):
        if self._loaded is None or self._loaded[0] != self.version:
            from sleepray.banks import load_bank
            bank, tok, _ = load_bank(self.cfg, self.storage)
            self._loaded = (self.version, bank.model, tok)
        return self._loaded[1], self._loaded[2]


class SleepNoREM(Sleep):
    name = "sleep_no_rem"
    overrides = {"rem.enabled": False}


class SleepNoLTI(Sleep):
    name = "sleep_no_lti"
    overrides = {"nrem.use_lti": False}


class SleepNoReplay(Sleep):
    name = "sleep_no_replay"
    overrides = {"rem.replay": False}


METHODS: dict[str, type[Method]] = {m.name: m for m in (
    NoSleep, InContext, SFT, SFTSelfQA, SEAL, DistillNoExpansion, NoExpansion, Sleep, SleepNoREM, SleepNoLTI,
    SleepNoReplay)}


def check_methods(names: list[str]) -> list[str]:
    """``names`` if every one is known; else a ``ValueError`` naming ``eval.methods``."""
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"eval.methods: unknown method(s) {unknown} (choose from {sorted(METHODS)})")
    if not names:
        raise ValueError("eval.methods is empty")
    if len(set(names)) != len(names):
        raise ValueError(f"eval.methods: a method is named twice in {names}")
    return list(names)


def make(name: str, cfg, storage: Path, seed: int) -> Method:
    """The method ``name`` on ``seed`` (``cfg.seed.seed`` is set to it) over ``storage``."""
    cfg = cfg.model_copy(deep=True)
    cfg.seed.seed = seed
    return METHODS[check_methods([name])[0]](cfg, storage, seed)
