"""TensorBoard event files of a run, under ``<storage>/tensorboard/`` (``tensorboard --logdir runs/``).

    tensorboard/sNNNN/   nrem/<metric> at every NREM step of sleep sNNNN (divergence, reward,
                         loss, anchor terms: what ``nrem_loss`` records), written by rank 0 of
                         the learner as it trains (in this process or in a Ray Train worker)
    tensorboard/sleeps/  <step>/<metric> once per sleep, step = the sleep's number: NREM's final
                         metrics, REM's (dreams, rewards, probe accuracies, ...), publish, seconds
    tensorboard/cycle/   accuracy/closed_book (and per phrasing) after every sleep of the cycle,
                         step = sleeps so far (0: before any sleep, with accuracy/in_context)

Resumes: a learner restarted from a checkpoint reopens its sleep's curve with
``purge_step`` = its first step, so TensorBoard hides what the failed attempt wrote past the
checkpoint; a cycle that runs again over the same storage hides the previous attempt's
accuracies the same way. A step of a sleep is written once, when its record says it is done.
"""
from __future__ import annotations

import math
from numbers import Number
from typing import Optional

from sleepray.storage import Storage


def scalars(metrics: dict, prefix: str = "") -> dict[str, float]:
    """The numeric entries of ``metrics`` (bools as 0/1; None, text and NaN left out), nested dicts flattened."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out.update(scalars(v, f"{prefix}{k}/"))
        elif isinstance(v, Number) and not (isinstance(v, float) and math.isnan(v)):
            out[f"{prefix}{k}"] = float(v)
    return out


def _writer(logdir, purge_step: Optional[int] = None):
    from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when writing
    return SummaryWriter(str(logdir), purge_step=purge_step, flush_secs=10)


class NREMCurves:
    """One sleep's per-step NREM scalars (``tensorboard/sNNNN``, tags ``nrem/<metric>``).

    Opened at the first step written, with ``purge_step`` = that step: a learner that
    resumed at step k+1 hides the steps > k an earlier attempt wrote."""

    def __init__(self, store: Storage, sleep_id: str):
        self.dir = store.tensorboard / sleep_id
        self.w = None

    def step(self, step: int, metrics: dict) -> None:
        if self.w is None:
            self.w = _writer(self.dir, purge_step=step)
        for k, v in scalars(metrics).items():
            self.w.add_scalar(f"nrem/{k}", v, step)
        self.w.flush()

    def close(self) -> None:
        if self.w is not None:
            self.w.close()
            self.w = None


def sleep_step(store: Storage, number: int, step: str, metrics: dict) -> None:
    """A finished step of sleep ``number`` (``nrem``, ``rem``, ``publish``, ``deep``): its metrics."""
    values = scalars({k: v for k, v in metrics.items() if k not in ("finished_at", "step", "steps")})
    if not values:
        return
    with _writer(store.tensorboard / "sleeps") as w:
        for k, v in values.items():
            w.add_scalar(f"{step}/{k}", v, number)


class CycleCurves:
    """Closed-book accuracy over the episodes seen so far, after every sleep of a cycle
    (``tensorboard/cycle``); ``ev`` is ``sleepray.cycle.evaluate``'s result."""

    def __init__(self, store: Storage):
        self.w = _writer(store.tensorboard / "cycle", purge_step=0)

    @staticmethod
    def _mean(by_episode: dict) -> Optional[float]:
        vals = [v for v in by_episode.values() if v is not None]
        return sum(vals) / len(vals) if vals else None

    def after(self, sleeps: int, ev: dict, wall_seconds: Optional[float] = None) -> None:
        """Accuracies after ``sleeps`` sleeps (0: before any, in context too when measured)."""
        values = {"accuracy/closed_book": self._mean(ev.get("closed_book", {})),
                  "accuracy/in_context": self._mean(ev.get("in_context", {})),
                  **{f"accuracy/closed_book_{ph}": self._mean(by)
                     for ph, by in ev.get("closed_book_by_phrasing", {}).items()},
                  "sleep/wall_seconds": wall_seconds}
        for tag, v in values.items():
            if v is not None:
                self.w.add_scalar(tag, v, sleeps)
        self.w.flush()

    def close(self) -> None:
        self.w.close()
