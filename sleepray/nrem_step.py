"""NREM as a step of a sleep: its inputs, and the one trainer every backend runs.

The in-process backend calls :func:`nrem_step` with the default hooks; the Ray Train
learner (``actors/learner.py``) calls it on every worker with hooks for its rank, the
gradient all-reduce, checkpoints and draft adapters. It writes ``sleeps/sNNNN/nrem/bank``
and ``nrem/metrics.json`` (rank 0).
"""
from __future__ import annotations

import logging
import os
import tempfile
from contextlib import AbstractContextManager
from typing import Callable, Optional

import torch

from sleepray import nrem, prompts, tb   # called through their modules (the leak guard wraps them)
from sleepray.anchor import anchor_texts, rehearses
from sleepray.banks import bank_from
from sleepray.nrem_samplers import AdapterRef, EngineSampler
from sleepray.prompt_format import format_of
from sleepray.replay import ReplayBuffer
from sleepray.sleep_record import SleepRecord, live_episodes, phase_seed, rng_for
from sleepray.storage import Storage, write_json
from sleepray.train_state import load_train_state, save_train_state

log = logging.getLogger(__name__)


def nrem_prompts(cfg, bank, tok, rec: SleepRecord, episodes: list) -> list:
    """Self-written questions and document prefixes for each episode (``sleepray.prompts``)."""
    rng = rng_for(cfg, rec, "nrem")
    writer = prompts.model_question_writer(bank, tok, cfg.nrem.temperature, seed=phase_seed(cfg, rec, "nrem"))
    return [p for ep in episodes
            for p in prompts.consolidation_prompts(ep, cfg.nrem.prompts_per_episode, rng, writer, fmt=format_of(tok))]


def nrem_anchor(cfg) -> list[str] | None:
    return anchor_texts(cfg) if cfg.nrem.anchor_weight > 0 else None


def nrem_replay(cfg, store: Storage, episodes: list) -> list[str]:
    """Texts of the rehearsal buffer's dreams about older episodes (not ``episodes``), for
    NREM's rehearsal; empty unless its weight, ``nrem.anchor_replay`` and ``rem.replay`` are on."""
    if not cfg.rem.replay or not rehearses(cfg.nrem):
        return []
    return ReplayBuffer(store.replay, cfg.rem.buffer_size).texts([e.episode_id for e in episodes])


def nrem_step(cfg, store: Storage, rec: SleepRecord, hooks: nrem.NREMHooks | None = None,
              progress: bool = True) -> dict:
    """Open a fresh expert on the starting bank and train it on the sleep's live episodes."""
    hooks = StepRecorder(hooks or nrem.NREMHooks(), store, rec)
    out = rec.dir / "nrem"
    bank, tok, _ = bank_from(cfg, store, store.starting_bank())
    episodes = live_episodes(store, rec)
    prompts = hooks.broadcast(nrem_prompts(cfg, bank, tok, rec, episodes) if hooks.rank == 0 else None)
    seed = phase_seed(cfg, rec, "nrem")
    torch.manual_seed(seed)  # the fresh expert's initialisation: the same on every rank
    slot = bank.open_new_expert()
    log.info("NREM %s: %d episodes, %d prompts, expert %s", rec.sleep_id, len(episodes), len(prompts), slot)
    result = nrem.run_nrem(bank, tok, prompts, cfg.nrem, seed=seed, progress=progress and hooks.rank == 0,
                           anchor_texts=nrem_anchor(cfg), replay_texts=nrem_replay(cfg, store, episodes),
                           hooks=hooks)
    hooks.close()
    metrics = {**result.final, "step": cfg.nrem.steps, "steps": cfg.nrem.steps, "prompts": len(prompts),
               "expert": slot, "resumed_from": result.start, "learner_workers": hooks.world, **hooks.summary()}
    if hooks.rank == 0:
        bank.save(out / "bank")
        write_json(out / "metrics.json", metrics)
    return metrics


class StepRecorder:
    """``hooks``, and on rank 0 after every step: ``nrem/progress.json`` (the step and its
    metrics: what a driver draws NREM's progress line from) and the step's metrics as
    TensorBoard scalars (``sleepray.tb.NREMCurves``). Everything else is ``hooks``'."""

    def __init__(self, hooks: nrem.NREMHooks, store: Storage, rec: SleepRecord):
        self.hooks, self.out = hooks, rec.dir / "nrem"
        self.curves = tb.NREMCurves(store, rec.sleep_id) if hooks.rank == 0 else None

    def __getattr__(self, name):
        return getattr(self.hooks, name)

    def after_step(self, done: int, metrics: dict, params: list, opt) -> None:
        self.hooks.after_step(done, metrics, params, opt)   # reported (and checkpointed) first:
        if self.curves is not None:                         # progress never runs ahead of it
            write_json(self.out / "progress.json", {"step": done, "pid": os.getpid(), **metrics})
            self.curves.step(done, metrics)

    def close(self) -> None:
        if self.curves is not None:
            self.curves.close()


class LearnerHooks(nrem.NREMHooks):
    """The hooks of a learner run beside generation engines (the Ray Train learner's).

    With ``ray.sampling`` on the rollouts, samples come from ``pool.generate`` with the
    teacher (``teacher``: the latest version, None: the base) and the student as LoRA adapters:
    the student is a draft adapter that rank 0 exports and ``pool.publish``-es every
    ``ray.publish_every`` steps; on the learner, from its own decode loop. Every
    ``ray.checkpoint_every`` steps rank 0 saves the expert and optimizer (safetensors) and
    hands the folder to ``report(metrics, folder)``; every rank reports every step. A run
    restarts from ``checkpoint()`` (a context giving the last reported folder, or None).
    """

    def __init__(self, cfg, rec: SleepRecord, rank: int, world: int, pool, teacher: Optional[dict],
                 report: Callable[[dict, Optional[str]], None],
                 checkpoint: Callable[[], AbstractContextManager]):
        super().__init__(rank, world)
        self.cfg, self.rec, self.pool, self.teacher = cfg, rec, pool, teacher
        self.report, self.checkpoint = report, checkpoint
        self.out = rec.dir / "nrem"

    def resume(self, params: list, opt) -> int:
        with self.checkpoint() as folder:
            step = load_train_state(folder, params, opt)["step"] if folder else 0
        if step:
            log.info("NREM %s rank %d: resumed from the checkpoint at step %d", self.rec.sleep_id, self.rank, step)
        return step

    @property
    def on_rollouts(self) -> bool:
        """Whether NREM samples on the RolloutWorkers (``ray.sampling``)."""
        return self.cfg.ray.samples_on_rollouts

    def make_sampler(self, bank, tok, ncfg, start: int):
        self.bank, self.sampler = bank, None
        if not self.on_rollouts:
            return None               # the learner's own loop (nrem.LocalSampler)
        self.sampler = EngineSampler(self.pool.generate, tok, ncfg.max_new_tokens, ncfg.temperature,
                                     AdapterRef(**self.teacher) if self.teacher else AdapterRef(None),
                                     self.draft(start),
                                     seed=phase_seed(self.cfg, self.rec, "nrem") * 1000 + 100 * self.rank + start)
        return self.sampler

    def draft(self, step: int) -> AdapterRef:
        """The student after ``step`` steps as an adapter every engine has loaded."""
        name = f"{self.rec.sleep_id}-d{step:05d}"
        path = self.out / "drafts" / name
        if self.rank == 0:
            if not (path / "adapter_config.json").is_file():
                self.bank.export_combined(path, overwrite=True)
            self.pool.publish(name, str(path))
        if self.world > 1:
            torch.distributed.barrier()
        return AdapterRef(name, str(path))

    def after_step(self, done: int, metrics: dict, params: list, opt) -> None:
        ray_cfg, steps = self.cfg.ray, self.cfg.nrem.steps
        with tempfile.TemporaryDirectory() as tmp:
            folder = None
            if self.rank == 0 and (done % ray_cfg.checkpoint_every == 0 or done == steps):
                folder = str(save_train_state(tmp, params, opt, {"step": done, "sleep_id": self.rec.sleep_id}))
            self.report({**metrics, "step": done}, folder)
        if self.sampler is not None and done % ray_cfg.publish_every == 0 and done < steps:
            self.sampler.student_ref = self.draft(done)

    def summary(self) -> dict:
        return {"rollout_workers": len(self.pool.workers),
                "nrem_sampling": "rollouts" if self.on_rollouts else "learner",
                # the poll interval this worker's Ray Train run got (ray.train_poll_seconds)
                "ray_train_poll_s": float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 2.0))}
