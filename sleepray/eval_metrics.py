"""Continual-learning metrics from an accuracy matrix (pure functions, no models).

Notation. The stream's ``E`` episodes arrive in ``T`` parts; after part ``i`` arrives
(``i = 0 .. T-1``) the method sleeps once, then every episode is measured. ``R[i][j]``
is the accuracy on episode ``j`` after sleep ``i`` (closed-book unless the method says
otherwise). ``p(j)`` is the sleep after which episode ``j`` was first trained (the index
of its part). ``b[j]`` is the baseline: the closed-book accuracy on episode ``j`` of the
model that never slept (the base model). Following Lopez-Paz & Ranzato (2017, "Gradient
Episodic Memory for Continual Learning"), with episodes in the role of tasks and the
mean taken over episodes (so parts of unequal size weigh by their episodes):

* ``ACC  = mean_j R[T-1][j]``: final accuracy over every episode.
* ``BWT  = mean_{j: p(j) < T-1} (R[T-1][j] - R[p(j)][j])``: backward transfer; negative
  is forgetting. ``None`` when no episode arrived before the last part (``T = 1``).
* ``FWT  = mean_{j: p(j) >= 1} (R[p(j)-1][j] - b[j])``: forward transfer, the closed-book
  accuracy on an episode the sleep before it arrives, over the never-slept baseline.
  ``None`` when every episode is in the first part.
* ``LA   = mean_j R[p(j)][j]``: learning accuracy, right after the episode's own sleep.
* ``forgetting = mean_{j: p(j) < T-1} (max_{p(j) <= l < T-1} R[l][j] - R[T-1][j])``:
  Chaudhry et al. (2018); >= 0, the drop from the best earlier value.

``summarize`` gives mean, sample standard deviation (``n - 1``; 0 for one value) and
count of each metric over seeds; ``None`` values are skipped.
"""
from __future__ import annotations

import math
import statistics
from typing import Optional, Sequence

Matrix = Sequence[Sequence[float]]

METRICS = ("ACC", "BWT", "FWT", "LA", "forgetting")


def part_of(parts: Sequence[Sequence[str]], episodes: Sequence[str]) -> list[int]:
    """``p(j)`` for each episode: the index of the part that holds it."""
    where = {e: i for i, part in enumerate(parts) for e in part}
    missing = [e for e in episodes if e not in where]
    if missing:
        raise ValueError(f"episodes {missing[:5]} are in no part")
    return [where[e] for e in episodes]


def _check(R: Matrix, p: Sequence[int], b: Optional[Sequence[float]] = None) -> tuple[int, int]:
    T = len(R)
    if T == 0:
        raise ValueError("R has no rows")
    E = len(R[0])
    if any(len(row) != E for row in R):
        raise ValueError("R is ragged: every row needs one value per episode")
    if len(p) != E:
        raise ValueError(f"{len(p)} part indices for {E} episodes")
    if any(not 0 <= x < T for x in p):
        raise ValueError(f"part indices must lie in [0, {T}) (one sleep per part)")
    if b is not None and len(b) != E:
        raise ValueError(f"{len(b)} baseline values for {E} episodes")
    for row in R:
        for v in row:
            if v is None or (isinstance(v, float) and math.isnan(v)):
                raise ValueError("R has a missing value")
    return T, E


def _mean(xs: list[float]) -> Optional[float]:
    return sum(xs) / len(xs) if xs else None


def acc(R: Matrix) -> float:
    return _mean(list(R[-1]))


def bwt(R: Matrix, p: Sequence[int]) -> Optional[float]:
    T, E = _check(R, p)
    return _mean([R[T - 1][j] - R[p[j]][j] for j in range(E) if p[j] < T - 1])


def fwt(R: Matrix, p: Sequence[int], b: Sequence[float]) -> Optional[float]:
    T, E = _check(R, p, b)
    return _mean([R[p[j] - 1][j] - b[j] for j in range(E) if p[j] >= 1])


def learning_accuracy(R: Matrix, p: Sequence[int]) -> float:
    T, E = _check(R, p)
    return _mean([R[p[j]][j] for j in range(E)])


def forgetting(R: Matrix, p: Sequence[int]) -> Optional[float]:
    T, E = _check(R, p)
    return _mean([max(R[l][j] for l in range(p[j], T - 1)) - R[T - 1][j]
                  for j in range(E) if p[j] < T - 1])


def metrics(R: Matrix, p: Sequence[int], b: Sequence[float]) -> dict:
    """Every metric of the module docstring for one matrix."""
    _check(R, p, b)
    return {"ACC": acc(R), "BWT": bwt(R, p), "FWT": fwt(R, p, b), "LA": learning_accuracy(R, p),
            "forgetting": forgetting(R, p)}


def mean_rows(R: Matrix) -> list[float]:
    """Accuracy over every episode after each sleep (the mean of each row)."""
    return [sum(row) / len(row) for row in R]


def seen_mean_rows(R: Matrix, p: Sequence[int]) -> list[float]:
    """Accuracy over the episodes seen so far, after each sleep."""
    T, E = _check(R, p)
    return [_mean([R[i][j] for j in range(E) if p[j] <= i]) for i in range(T)]


def mean_matrix(Rs: Sequence[Matrix]) -> list[list[float]]:
    """Element-wise mean of several same-shaped matrices (one per seed)."""
    if not Rs:
        raise ValueError("no matrices")
    T, E = len(Rs[0]), len(Rs[0][0])
    if any(len(R) != T or any(len(r) != E for r in R) for R in Rs):
        raise ValueError("matrices differ in shape")
    return [[sum(R[i][j] for R in Rs) / len(Rs) for j in range(E)] for i in range(T)]


def spread(values: Sequence[Optional[float]]) -> dict:
    """{"mean", "std", "n"} over the non-None values (sample std, 0.0 for one value)."""
    xs = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not xs:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "n": len(xs)}


def summarize(runs: Sequence[dict], keys: Sequence[str]) -> dict:
    """{key: spread} over ``run["metrics"][key]`` of several runs (seeds)."""
    return {k: spread([r["metrics"].get(k) for r in runs]) for k in keys}
