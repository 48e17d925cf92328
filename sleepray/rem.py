"""REM: Dreaming (DESIGN.md section 1), in one process.

SEAL-style self-written curriculum, with the paper's three changes, on the expert that
NREM opened (``bank.training``). :func:`run_rem` runs one sleep's REM as five steps:

(a) :func:`_write_and_select` -- per episode, ``m`` dreams sampled from the frozen model
    with the episode in context, one random unused expert and the dream writer on
    (:func:`~sleepray.dreams.write_dreams`; by this process or, through
    :class:`~sleepray.dreams.DreamRollouts`, by the RolloutWorkers); questions the model writes about the episode,
    answered by the teacher with it in context, are the probe targets
    (:func:`~sleepray.rem_probes.teacher_probe_targets`); each dream is scored by its SFT
    gradient on the training expert and the top k plus b random others are kept
    (:func:`~sleepray.dreams.score_dreams`, :func:`~sleepray.dreams.select_indices`).
(b) :func:`_trials_and_restem` -- each kept dream fine-tunes an isolated copy of the
    expert, reward 1 when the probe score improves (:func:`~sleepray.rem_trials.run_trials`);
    ReST-EM trains the :class:`~sleepray.dream_writer.DreamWriter` on the rewarded
    (prompt -> dream) pairs (:func:`~sleepray.dream_writer.restem_update`).
(c) :func:`_guarded_sft` -- SFT of the expert on the rewarded dreams plus replayed older
    dreams, in curriculum order, with the KL anchor (:func:`~sleepray.dream_sft.train_dreams`).
    Like a trial, the whole SFT is kept only if neither the probe loss nor the closed-book
    accuracy on the teacher's answers got worse, nor the accuracy on older episodes' probe
    answers from the buffer (``rem.revert_if_worse``, ``rem.retention_probes``); otherwise
    the expert stays as NREM left it and none of the sleep's dreams enter the buffer.
(d) :func:`_check_retention` -- retention of the whole sleep (NREM and REM share the
    expert): each older episode's learned probe answers are asked again; one more than
    ``rem.retention_tolerance`` below the model before the sleep is rehearsed beside the
    new episode (:func:`repair_forgetting`, ``rem.repair_steps``), and past that the expert
    is scaled down (:func:`~sleepray.retention.shrink_to_retain`, ``rem.retention_scales``).
(e) :func:`_write_outputs` -- ``dreams.parquet`` (every dream, why it was kept, its
    reward), ``probes.parquet`` (the teacher's probe targets, and whether the model gives
    each closed-book as the sleep leaves it: ``learned``), the buffer's new rows and the
    dream writer; :func:`_metrics` is what the sleep records.

Neither an episode's evaluation questions nor their answers (``Episode.probes``) are read
by REM: every probe, trial, revert check, retention check, repair and replayed probe row
comes from the model's own questions and the teacher's answers to them.

The steps call :func:`write_dreams`, :func:`teacher_probe_targets`, :func:`train_dreams`
and :func:`model_question_writer` through this module, so that they can be watched here.
"""
from __future__ import annotations

import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import pyarrow as pa

from sleepray.dream_formats import FORMAT_CUES, dream_prompt
from sleepray.dream_sft import dream_difficulty, sft_made_worse, train_dreams
from sleepray.dream_writer import WRITER_ADAPTER, DreamWriter, restem_update
from sleepray.dreams import sample_text, score_dreams, select, select_indices, write_dreams
from sleepray.prompt_format import format_of
from sleepray.prompts import QuestionWriter, model_question_writer
from sleepray.rem_probes import (ProbeTarget, accuracy_by_episode, older_probe_targets, probe_accuracy,
                                 probe_hits, probe_loss, teacher_probe_targets)
from sleepray.rem_trials import TrialResult, restore, run_trials, snapshot
from sleepray.replay import Dream, ReplayBuffer, probe_dream, probe_row, write_table_atomic
from sleepray.retention import below_floor, shrink_to_retain
from sleepray.world import Episode

log = logging.getLogger(__name__)

__all__ = [
    "DREAMS_COLUMNS", "FORMAT_CUES", "WRITER_ADAPTER", "Dream", "DreamWriter", "ProbeTarget",
    "ReplayBuffer", "TrialResult", "accuracy_by_episode", "below_floor", "dream_difficulty", "dream_prompt",
    "older_probe_targets", "probe_accuracy", "probe_hits", "probe_loss", "repair_forgetting",
    "restem_update", "run_rem", "run_trials", "sample_text", "score_dreams", "select", "select_indices",
    "sft_made_worse", "shrink_to_retain", "teacher_probe_targets", "train_dreams", "write_dreams",
]

# dreams.parquet: the buffer's dream columns, then why each dream was kept and what its trial did
DREAMS_COLUMNS = ["episode_id", "format", "prompt", "text", "score", "trial_reward", "kept", "sleep_id",
                  "selected_by", "trial_metric", "probe_before", "probe_after", "trained"]
DREAMS_SCHEMA = pa.schema([
    ("episode_id", pa.string()), ("format", pa.string()), ("prompt", pa.string()), ("text", pa.string()),
    ("score", pa.float64()), ("trial_reward", pa.int8()), ("kept", pa.bool_()), ("sleep_id", pa.string()),
    ("selected_by", pa.string()), ("trial_metric", pa.string()), ("probe_before", pa.float64()),
    ("probe_after", pa.float64()), ("trained", pa.bool_()),
])
PROBES_SCHEMA = pa.schema([("episode_id", pa.string()), ("question", pa.string()),
                           ("teacher_answer", pa.string()), ("learned", pa.bool_())])


def _mean(values: Sequence) -> Optional[float]:
    return sum(values) / len(values) if values else None


def repair_forgetting(bank, tok, older: list[ProbeTarget], floors: dict[str, float],
                      accuracy: dict[str, float], own: list[ProbeTarget], buffer: ReplayBuffer, rcfg,
                      rng: random.Random, anchor_texts: Optional[list[str]] = None,
                      exclude_episodes: Sequence[str] = ()) -> tuple[dict[str, float], int]:
    """Rehearse what this sleep made the model forget, beside what it learned: up to
    ``rcfg.repair_rounds`` rounds of ``rcfg.repair_steps`` dream-SFT steps on the buffer's rows
    about each older episode below its floor together with this sleep's own probe answers, so
    that the expert has to tell the old facts from the new ones (the same questions about
    different people, in one batch) instead of writing the new over the old. Stops once no
    episode is below its floor; returns (the accuracies by episode, the rounds run)."""
    rounds = 0
    while rounds < rcfg.repair_rounds and (short := below_floor(floors, accuracy)):
        items = [d for d in buffer.dreams() if d.episode_id in short] + [probe_dream(t.episode_id, t.question, t.target) for t in own]
        train_dreams(bank, tok, items, rcfg.model_copy(update={"sft_steps": rcfg.repair_steps}), buffer, rng,
                     exclude_episodes=exclude_episodes, anchor_texts=anchor_texts)
        rounds += 1
        accuracy = accuracy_by_episode(older, probe_hits(bank, tok, older, rcfg.probe_max_new_tokens))
        log.info("REM: repair round %d on %s; older episodes below their floor: %s", rounds, short,
                 below_floor(floors, accuracy) or "none")
    return accuracy, rounds


# ------------------------------------------------------------------ the steps' results

@dataclass
class _Dreamt:
    """(a): every dream, the probe targets, each dream's score and why it was kept (index -> how)."""
    dreams: list[Dream]
    targets: list[ProbeTarget]
    scores: list[float]
    selected_by: dict[int, str]
    seconds_writing: float

    @property
    def kept_idx(self) -> list[int]:
        return sorted(self.selected_by)


@dataclass
class _Tried:
    """(b): the kept dreams' trials (index -> result), the rewarded indices, ReST-EM's losses."""
    trials: dict[int, TrialResult]
    rewarded_idx: list[int]
    restem_losses: list[float]


@dataclass
class _Probed:
    """The probe loss, the accuracy on the teacher's answers (None: not measured) and the
    hits on the older episodes' answers, at one moment of the dream SFT."""
    loss: float
    accuracy: Optional[float]
    older_hits: list[bool]


@dataclass
class _Guarded:
    """(c): the older episodes' probes, the measures before and after the dream SFT, its
    numbers, whether it was reverted, and the dreams it trained (indices)."""
    older: list[ProbeTarget]
    before: _Probed
    after: _Probed
    info: dict
    reverted: bool
    trained: set[int]


@dataclass
class _Retained:
    """(d): the older episodes' accuracy before the sleep, the expert's scale, the final
    accuracy by episode, the worst episode's drop and the repair rounds run."""
    before_sleep: Optional[float]
    scale: float
    final: dict[str, float]
    worst_drop: Optional[float]
    repairs: int


# ------------------------------------------------------------------ the steps

def _write_and_select(bank, tok, episodes: list[Episode], rcfg, rng: random.Random,
                      writer: Optional[DreamWriter], question_writer: QuestionWriter, t0: float,
                      rollouts=None) -> _Dreamt:
    """(a) Dreams and probe targets for every episode; each episode's top k plus b random dreams kept."""
    dreams: list[Dream] = []
    targets: list[ProbeTarget] = []
    for ep in episodes:
        dreams += write_dreams(bank, tok, ep, rcfg, rng, writer, rollouts)
        targets += teacher_probe_targets(bank, tok, ep, rcfg.probes_per_episode, question_writer,
                                         rcfg.probe_max_new_tokens)
    seconds_writing = round(time.time() - t0, 2)
    scores = score_dreams(bank, tok, dreams, targets, rcfg.selection)
    selected_by: dict[int, str] = {}
    for ep in episodes:
        idx = [i for i, d in enumerate(dreams) if d.episode_id == ep.episode_id]
        picked = select_indices([scores[i] for i in idx], rcfg.keep_top_k, rcfg.keep_random, rng)
        for rank, j in enumerate(picked):
            selected_by[idx[j]] = "top_k" if rank < rcfg.keep_top_k else "random"
    return _Dreamt(dreams, targets, scores, selected_by, seconds_writing)


def _trials_and_restem(bank, tok, dreamt: _Dreamt, rcfg, writer: Optional[DreamWriter], seed: int) -> _Tried:
    """(b) A trial per kept dream; ReST-EM on the rewarded ones when there is a writer."""
    kept_idx = dreamt.kept_idx
    trials = dict(zip(kept_idx, run_trials(bank, tok, [dreamt.dreams[i] for i in kept_idx], dreamt.targets,
                                           rcfg, seed)))
    rewarded_idx = [i for i in kept_idx if trials[i].reward == 1]
    restem_losses: list[float] = []
    if rcfg.restem and writer is not None:
        restem_losses = restem_update(writer, [dreamt.dreams[i] for i in rewarded_idx], rcfg, seed)
    return _Tried(trials, rewarded_idx, restem_losses)


def _probe(bank, tok, targets: list[ProbeTarget], older: list[ProbeTarget], rcfg) -> _Probed:
    n_tok = rcfg.probe_max_new_tokens
    return _Probed(probe_loss(bank, tok, targets),
                   probe_accuracy(bank, tok, targets, n_tok) if rcfg.revert_if_worse else None,
                   probe_hits(bank, tok, older, n_tok))


def _guarded_sft(bank, tok, episodes: list[Episode], dreamt: _Dreamt, tried: _Tried, rcfg,
                 buffer: Optional[ReplayBuffer], rng: random.Random, seed: int,
                 anchor_texts: Optional[list[str]]) -> _Guarded:
    """(c) The dream SFT on the rewarded dreams, reverted when it left the expert worse: on the
    probes, by their loss or by how many of the teacher's answers it gives closed-book, or on
    what it answered about older episodes."""
    checks = rcfg.revert_if_worse or rcfg.retention_scales or rcfg.repair_steps
    older = older_probe_targets(buffer, episodes, rcfg, seed, format_of(tok)) if checks else []
    before = _probe(bank, tok, dreamt.targets, older, rcfg)
    saved = snapshot(bank.trainable_parameters())
    info = train_dreams(bank, tok, [dreamt.dreams[i] for i in tried.rewarded_idx], rcfg, buffer, rng,
                        exclude_episodes=[e.episode_id for e in episodes], anchor_texts=anchor_texts)
    after = _probe(bank, tok, dreamt.targets, older, rcfg)
    kept = (_mean(before.older_hits), _mean(after.older_hits))
    reverted = bool(rcfg.revert_if_worse and info["sft_steps"]
                    and sft_made_worse((before.loss, after.loss), (before.accuracy, after.accuracy), kept,
                                       rcfg.retention_tolerance))
    if reverted:
        log.info("REM: the dream SFT left the probes worse (loss %.3f -> %.3f, accuracy %.2f -> %.2f, older "
                 "episodes %s -> %s); the expert stays as NREM left it", before.loss, after.loss,
                 before.accuracy, after.accuracy, *kept)
        restore(bank.trainable_parameters(), saved)
    trained = set(tried.rewarded_idx) if info["sft_steps"] and not reverted else set()
    return _Guarded(older, before, after, info, reverted, trained)


def _check_retention(bank, tok, episodes: list[Episode], targets: list[ProbeTarget], sft: _Guarded, rcfg,
                     buffer: Optional[ReplayBuffer], rng: random.Random,
                     anchor_texts: Optional[list[str]]) -> _Retained:
    """(d) The whole sleep must not make the model forget, episode by episode, what it answered
    about older episodes before this sleep: what it forgot is rehearsed beside the new
    (rem.repair_steps), and past that the expert is scaled down (rem.retention_scales)."""
    older = sft.older
    out = _Retained(None, 1.0, accuracy_by_episode(older, (sft.before if sft.reverted else sft.after).older_hits),
                    None, 0)
    if not (older and (rcfg.retention_scales or rcfg.repair_steps)):
        return out
    with bank.teacher_mode():  # the model before this sleep
        by_ep = accuracy_by_episode(older, probe_hits(bank, tok, older, rcfg.probe_max_new_tokens))
    out.before_sleep = _mean(list(by_ep.values()))
    floors = {e: a - rcfg.retention_tolerance for e, a in by_ep.items()}
    if rcfg.repair_steps:
        out.final, out.repairs = repair_forgetting(bank, tok, older, floors, out.final, targets, buffer, rcfg, rng,
                                                   anchor_texts, [e.episode_id for e in episodes])
    out.scale, out.final = shrink_to_retain(bank, tok, older, floors, rcfg.retention_scales, out.final,
                                            rcfg.probe_max_new_tokens)
    out.worst_drop = max(by_ep[e] - out.final[e] for e in by_ep)
    return out


def _write_outputs(bank, tok, out_dir: Path, sleep_id: str, dreamt: _Dreamt, tried: _Tried, sft: _Guarded,
                   rcfg, buffer: Optional[ReplayBuffer], writer: Optional[DreamWriter]) -> list[bool]:
    """(e) dreams.parquet, probes.parquet, the buffer's new rows, the dream writer; returns
    whether the model gives each probe target closed-book as the sleep leaves it."""
    learned = probe_hits(bank, tok, dreamt.targets, rcfg.probe_max_new_tokens)
    rows = []
    for i, d in enumerate(dreamt.dreams):
        tr = tried.trials.get(i)
        rows.append({"episode_id": d.episode_id, "format": d.format, "prompt": d.prompt, "text": d.text,
                     "score": dreamt.scores[i], "trial_reward": tr.reward if tr else None,
                     "kept": i in dreamt.selected_by, "sleep_id": sleep_id,
                     "selected_by": dreamt.selected_by.get(i, ""), "trial_metric": rcfg.trial_metric,
                     "probe_before": tr.before if tr else None,
                     "probe_after": tr.after if tr and not math.isnan(tr.after) else None,
                     "trained": i in sft.trained})
    write_table_atomic(pa.Table.from_pylist(rows, schema=DREAMS_SCHEMA), out_dir / "dreams.parquet")
    write_table_atomic(pa.Table.from_pylist(
        [{"episode_id": t.episode_id, "question": t.question, "teacher_answer": t.target, "learned": h}
         for t, h in zip(dreamt.targets, learned)], schema=PROBES_SCHEMA), out_dir / "probes.parquet")
    if buffer is not None:
        keep = [{c: rows[i][c] for c in ("episode_id", "format", "prompt", "text", "score",
                                         "trial_reward", "kept", "sleep_id")} for i in sorted(sft.trained)]
        if rcfg.replay_probes:  # what the model answered with the memory in context, for rehearsal later
            keep += [probe_row(t.episode_id, t.question, t.target, sleep_id, h)
                     for t, h in zip(dreamt.targets, learned)]
        if keep:
            buffer.append(keep)
    if writer is not None:
        writer.save(out_dir / WRITER_ADAPTER)
    return learned


def _metrics(dreamt: _Dreamt, tried: _Tried, sft: _Guarded, retained: _Retained, learned: list[bool],
             buffer: Optional[ReplayBuffer], t0: float) -> dict:
    n_kept, n_rewarded, scores, losses = len(dreamt.selected_by), len(tried.rewarded_idx), dreamt.scores, \
        tried.restem_losses
    return {
        "enabled": True, "dreams": len(dreamt.dreams), "kept": n_kept, "rewarded": n_rewarded,
        "reward_rate": n_rewarded / n_kept if n_kept else 0.0,
        "mean_score": sum(scores) / len(scores) if scores else float("nan"),
        "probe_targets": len(dreamt.targets), "probe_loss_before": sft.before.loss,
        "probe_loss_after": sft.after.loss, "probe_accuracy_before": sft.before.accuracy,
        "probe_accuracy_after": sft.after.accuracy, "sft_reverted": sft.reverted,
        "retention_probes": len(sft.older), "retention_accuracy_before": _mean(sft.before.older_hits),
        "retention_accuracy_after": _mean(sft.after.older_hits),
        "retention_accuracy_before_sleep": retained.before_sleep, "expert_scale": retained.scale,
        "retention_accuracy_final": _mean(list(retained.final.values())),
        "retention_worst_episode_drop": retained.worst_drop, "repair_rounds": retained.repairs,
        "probe_accuracy_final": _mean(learned),
        "restem_steps": len(losses), "restem_loss_last": losses[-1] if losses else float("nan"),
        **{k: v for k, v in sft.info.items() if k != "difficulty_order"},
        "buffer_size": len(buffer) if buffer is not None else 0,
        "seconds_writing": dreamt.seconds_writing, "seconds": round(time.time() - t0, 2),
    }


# ------------------------------------------------------------------ one REM phase

def run_rem(bank, tok, episodes: list[Episode], rcfg, out_dir: Union[str, os.PathLike],
            rng: Optional[random.Random] = None, buffer: Optional[ReplayBuffer] = None,
            writer: Optional[DreamWriter] = None, sleep_id: Optional[str] = None,
            question_writer: Optional[QuestionWriter] = None,
            anchor_texts: Optional[list[str]] = None,
            on_stage: Optional[Callable[[str, dict], None]] = None, rollouts=None) -> dict:
    """REM for one sleep on the bank's open expert; writes ``out_dir/dreams.parquet`` and
    ``out_dir/probes.parquet`` (and ``out_dir/dream_writer/`` when a writer is given).
    ``on_stage(name, counts)`` is called after each stage: dreams, trials, sft, retention, outputs.
    ``rollouts``: a ``dreams.DreamRollouts`` to sample the dreams on generation engines.

    Returns metrics: dream/kept/rewarded counts, reward rate, closed-book probe loss vs
    the teacher's answers before and after the dream SFT, replay and SFT numbers, seconds.
    """
    if not rcfg.enabled:
        return {"enabled": False}
    if bank.training is None:
        raise RuntimeError("open a new expert (bank.open_new_expert()) before REM")
    if not episodes:
        raise ValueError("REM needs at least one episode")
    t0 = time.time()
    rng = rng or random.Random(0)
    out_dir = Path(out_dir)
    sleep_id = sleep_id or out_dir.name
    seed = rng.randrange(2**31)
    if question_writer is None:  # the frozen model writes the probe questions itself
        question_writer = model_question_writer(bank, tok, seed=seed)

    stage = on_stage or (lambda name, counts: None)
    dreamt = _write_and_select(bank, tok, episodes, rcfg, rng, writer, question_writer, t0, rollouts)
    stage("dreams", {"dreams": len(dreamt.dreams), "kept": len(dreamt.selected_by)})
    tried = _trials_and_restem(bank, tok, dreamt, rcfg, writer, seed)
    stage("trials", {"dreams": len(dreamt.dreams), "kept": len(dreamt.selected_by),
                     "rewarded": len(tried.rewarded_idx)})
    sft = _guarded_sft(bank, tok, episodes, dreamt, tried, rcfg, buffer, rng, seed, anchor_texts)
    stage("sft", {"rewarded": len(tried.rewarded_idx), "reverted": sft.reverted})
    retained = _check_retention(bank, tok, episodes, dreamt.targets, sft, rcfg, buffer, rng, anchor_texts)
    stage("retention", {"repairs": retained.repairs})
    learned = _write_outputs(bank, tok, out_dir, sleep_id, dreamt, tried, sft, rcfg, buffer, writer)
    stage("outputs", {"learned": sum(learned)})
    return {**_metrics(dreamt, tried, sft, retained, learned, buffer, t0),
            "dreams_from": "rollouts" if rollouts is not None else "learner",
            "dream_adapters": len(rollouts.published) if rollouts is not None else 0}
