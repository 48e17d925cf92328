"""The full loop over an episode stream: wake (episodes arrive), sleep, measure; repeat.

The stream is cut into ``cycle.n_sleeps`` chunks. While awake, a chunk's episodes go
into the MemoryStore; then the Coordinator sleeps (on request, or by itself once the
short-term memory reaches ``cycle.capacity_tokens`` with ``trigger="pressure"``). After
every sleep the model answers every episode seen so far, closed-book: row i of the
accuracy matrix R[i, j]. ``run_cycle`` takes the memory, the coordinator and the
evaluator as plain callables, so it runs the same with Ray actors or in one process.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable, Optional

from tqdm.auto import tqdm

from sleepray.banks import load_bank
from sleepray.qa import evaluate_probes, exact_match
from sleepray.storage import Storage
from sleepray.tb import CycleCurves

log = logging.getLogger(__name__)


def chunks(items: list, n: int) -> list[list]:
    """``items`` cut into ``n`` nearly equal, non-empty, ordered chunks (fewer if too few items)."""
    n = max(1, min(n, len(items)))
    k, r = divmod(len(items), n)
    out, i = [], 0
    for c in range(n):
        size = k + (1 if c < r else 0)
        out.append(items[i: i + size])
        i += size
    return out


def accuracy_by_phrasing(probes: list, answers: list[str]) -> dict[str, float]:
    """{phrasing: exact-match accuracy} of ``answers`` (aligned with ``probes``), per phrasing family."""
    em: dict[str, list[float]] = {}
    for p, a in zip(probes, answers):
        em.setdefault(p.phrasing, []).append(exact_match(a, p.answer))
    return {ph: sum(xs) / len(xs) for ph, xs in em.items()}


def evaluate(cfg, storage: str | Path, episodes: list, in_context: bool = False) -> dict:
    """Closed-book accuracy (and in-context, if asked) of the latest version on each episode.

    ``closed_book``/``in_context``: {episode: accuracy over all its questions};
    ``closed_book_by_phrasing``: {phrasing: {episode: accuracy over its questions of that
    phrasing}} (``sleepray.world.Probe.phrasing``: "seen" or the evaluation-only "unseen").
    """
    bank, tok, _ = load_bank(cfg, storage)
    v = Storage(storage).latest_version()
    out = {"version": v.name if v else None, "closed_book": {}, "in_context": {}, "closed_book_by_phrasing": {}}
    for ep in episodes:
        cb = evaluate_probes(bank.model, tok, ep.probes, None)
        out["closed_book"][ep.episode_id] = cb.accuracy
        for ph, a in accuracy_by_phrasing(ep.probes, cb.answers).items():
            out["closed_book_by_phrasing"].setdefault(ph, {})[ep.episode_id] = a
        if in_context:
            with bank.teacher_mode():
                out["in_context"][ep.episode_id] = evaluate_probes(bank.model, tok, ep.probes, ep.context).accuracy
    return out


def run_cycle(cfg, episodes: list, append: Callable[[list], dict], sleep: Callable[[str], dict],
              evaluate_fn: Callable[[list, bool], dict], trigger: str = "request",
              progress: bool = True, on_sleep: Optional[Callable[[int, dict, dict], None]] = None) -> dict:
    """Wake/sleep over ``episodes``; returns R, the per-sleep statuses and timings.

    The accuracies before and after every sleep also go to TensorBoard
    (``<storage>/tensorboard/cycle``, ``sleepray.tb.CycleCurves``); ``on_sleep(i, status,
    evaluation)`` is called after sleep ``i`` (0-based) is measured."""
    parts = chunks(episodes, cfg.cycle.n_sleeps)
    curves = CycleCurves(Storage(cfg.cycle.storage))
    base = evaluate_fn(episodes, True)
    curves.after(0, base)
    seen: list = []
    rows, sleeps = [], []
    bar = tqdm(parts, desc="cycle", unit="sleep", disable=not progress)
    for i, part in enumerate(bar):
        receipt = append(part)
        seen += part
        log.info("wake %d: %d episodes acknowledged (%s)", i + 1, len(part), receipt.get("segment"))
        t0 = time.time()
        status = sleep(trigger)
        if status.get("error"):
            raise RuntimeError(f"sleep {i + 1} failed: {status['error']}")
        sleeps.append({**status, "wall_seconds": round(time.time() - t0, 1)})
        ev = evaluate_fn(seen, False)
        rows.append([ev["closed_book"].get(e.episode_id) for e in episodes])
        acc = sum(ev["closed_book"].values()) / len(ev["closed_book"])
        bar.set_postfix(version=ev["version"], closed_book=f"{acc:.2f}")
        curves.after(i + 1, ev, sleeps[-1]["wall_seconds"])
        if on_sleep is not None:
            on_sleep(i, sleeps[-1], ev)
    curves.close()
    return {"episodes": [e.episode_id for e in episodes], "parts": [[e.episode_id for e in p] for p in parts],
            "before": base, "R": rows, "sleeps": sleeps}


def write_results(result: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str))
    return path
