"""REM as a step of a sleep: dreams, selection, trials, ReST-EM, dream SFT and replay on
the expert NREM trained (``sleepray.rem.run_rem``). Writes ``sleeps/sNNNN/rem/`` (bank,
dreams, dream writer) and ``rem/metrics.json``; the in-process backend and the Ray Train
learner both run :func:`rem_step`."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch

from sleepray import rem
from sleepray.anchor import anchor_texts
from sleepray.banks import bank_from
from sleepray.dreams import DreamRollouts
from sleepray.replay import ReplayBuffer
from sleepray.sleep_record import SleepRecord, live_episodes, phase_seed, records, rng_for
from sleepray.storage import Storage, write_json


def rem_anchor(cfg) -> list[str] | None:
    return anchor_texts(cfg) if cfg.rem.anchor_weight > 0 else None


def writer_dir(store: Storage, rec: SleepRecord) -> Optional[Path]:
    """The dream writer of the latest earlier sleep that finished REM (ReST-EM carries over), not
    across a rebuild (``sleepray.forget``: it may have learnt from a forgotten memory)."""
    if rec.rebuild:
        return None
    for r in reversed(records(store)):
        if r.number >= rec.number:
            continue
        d = r.dir / "rem" / "dream_writer"
        if r.is_done("rem") and d.is_dir():
            return d
        if r.rebuild:
            return None
    return None


def stage_writer(out: Path):
    """``run_rem``'s ``on_stage``: ``rem/progress.json`` says the stage done and its counts
    (what a driver draws REM's progress line from, ``sleepray.console.SleepBars``)."""
    done = [0]

    def stage(name: str, counts: dict) -> None:
        done[0] += 1
        write_json(out / "progress.json", {"stage": name, "done": done[0], "time": time.time(), **counts})
    return stage


def rem_step(cfg, store: Storage, rec: SleepRecord, pool=None) -> dict:
    """REM on the expert NREM left open, over the sleep's live episodes. ``pool``: generation
    engines (a ``RolloutPool``) that write the dreams when ``ray.sampling`` puts them there."""
    out = rec.dir / "rem"
    bank, tok, _ = bank_from(cfg, store, rec.dir / "nrem" / "bank")
    torch.manual_seed(phase_seed(cfg, rec, "rem"))  # dream writer and random expert initialisations
    buffer = ReplayBuffer(store.replay, cfg.rem.buffer_size) if cfg.rem.replay else None
    if buffer is not None:
        buffer.drop_sleep(rec.sleep_id)  # a REM redone after a crash adds its rows again
    writer = None
    if cfg.rem.restem:
        prev = writer_dir(store, rec)
        writer = rem.DreamWriter.load(bank, tok, prev) if prev else rem.DreamWriter.from_config(bank, tok, cfg.rem)
    metrics = rem.run_rem(bank, tok, live_episodes(store, rec), cfg.rem, out, rng=rng_for(cfg, rec, "rem"),
                          buffer=buffer, writer=writer, sleep_id=rec.sleep_id,
                          question_writer=rem.model_question_writer(bank, tok, cfg.nrem.temperature,
                                                                    seed=phase_seed(cfg, rec, "rem")),
                          anchor_texts=rem_anchor(cfg), on_stage=stage_writer(out),
                          rollouts=DreamRollouts(pool.generate, out / "dream_adapters", f"{rec.sleep_id}-dream")
                          if pool is not None and cfg.ray.samples_on_rollouts else None)
    bank.save(out / "bank")
    write_json(out / "metrics.json", metrics)
    return metrics
