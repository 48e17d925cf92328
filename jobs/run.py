"""`sleepray run`: the main job on the embedded default.

First the model answers questions about the configured world's episodes with each
episode in its context, and closed-book. Then the cycle job runs on a local Ray that this
command starts itself (``jobs.cycle``): the episodes arrive in ``cycle.n_sleeps`` parts;
each part goes into the MemoryStore actor and the Coordinator sleeps (NREM on a Ray
Train learner fed by a vLLM RolloutWorker, REM, publish). Then closed-book again. Every
number printed is computed here, over all questions and apart for each phrasing family
(``sleepray.world``: "seen" templates met in pretraining, evaluation-only "unseen" ones).

The console shows one progress line per step of each sleep and warnings; everything else
goes to ``<run>/logs`` (``run.log``: this process; ``ray``: Ray's workers) unless ``verbose``.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from sleepray.console import setup_logging
from sleepray.cycle import accuracy_by_phrasing
from sleepray.models import load_from_config
from sleepray.qa import evaluate_probes
from sleepray.storage import Storage
from sleepray.stream import episodes_from_config
from sleepray.world import chance_accuracy

log = logging.getLogger(__name__)
WIDTHS = [44, 8, 16, 16, 16, 16]
COLUMNS = ("in context", "closed book", "after sleep")


def _row(cells: list[str]) -> str:
    return "  ".join(c[:w].ljust(w) for c, w in zip(cells, WIDTHS))


def _shown(probes: list, k: int) -> list[int]:
    """Indices of up to ``k`` probes to print: seen and unseen phrasings alike, when both exist."""
    groups = [[i for i, p in enumerate(probes) if p.phrasing == ph]
              for ph in dict.fromkeys(p.phrasing for p in probes)]
    out: list[int] = []
    while len(out) < min(k, len(probes)):
        for g in groups:
            if g and len(out) < k:
                out.append(g.pop(0))
    return sorted(out)


def _summary(scores: dict[str, dict[str, list[float]]]) -> str:
    """A table: rows all / each phrasing, columns in context, closed book, after sleep (mean over episodes)."""
    cols = [c for c in COLUMNS if any(scores[g].get(c) for g in scores)]
    lines = ["".join(x.ljust(w) for x, w in zip(["questions"] + cols, [12] + [14] * len(cols)))]
    for g, by in scores.items():
        cells = [f"{sum(by[c]) / len(by[c]):.2f}" if by.get(c) else "-" for c in cols]
        lines.append("".join(x.ljust(w) for x, w in zip([g] + cells, [12] + [14] * len(cols))))
    return "\n".join(lines)


def run_default(cfg, episodes: int | None = None, sleep: bool = True, max_questions: int = 8,
                verbose: bool = False, log_level: str = "INFO") -> int:
    storage = Path(cfg.cycle.storage).resolve() / time.strftime("run-%Y%m%d-%H%M%S")
    run_log = setup_logging(Storage(storage).logs if sleep else None, verbose, log_level)
    model, tok, path = load_from_config(cfg)
    log.info("model: %s", path)
    eps = episodes_from_config(cfg.world, episodes)
    before = {ep.episode_id: (evaluate_probes(model, tok, ep.probes, ep.context),
                              evaluate_probes(model, tok, ep.probes, None)) for ep in eps}
    after = {}
    if sleep:
        from jobs.cycle import run_on_ray
        from sleepray.banks import load_bank
        from sleepray.cycle import write_results
        cfg.cycle.storage = str(storage)
        print(f"awake: {len(eps)} episodes arrive in {cfg.cycle.n_sleeps} parts; "
              f"each goes to the short-term memory ({storage / 'memory'}), then a sleep on a local Ray...")
        print(f"logs: {run_log.parent}/ (run.log, coordinator.log, learner-*.log, ray/: Ray's workers); "
              f"curves: tensorboard --logdir {Storage(storage).tensorboard}", flush=True)
        result = run_on_ray(cfg, verbose=verbose, episodes=eps)
        write_results(result, storage / "cycle_results.json")
        bank, tok, _ = load_bank(cfg, storage)
        after = {ep.episode_id: evaluate_probes(bank.model, tok, ep.probes, None) for ep in eps}
        for i, st in enumerate(result["sleeps"]):
            last = st.get("last_sleep") or {}
            print(f"sleep {i + 1}: {last.get('version')} over {last.get('episodes')} episodes "
                  f"in {st['wall_seconds']:.0f}s")
        print(f"asleep: consolidated into {Storage(storage).latest_version()} (results: {storage / 'cycle_results.json'})")
    scores: dict[str, dict[str, list[float]]] = {"all": {}}  # questions -> column -> per-episode accuracy
    for ep in eps:
        ic, cb = before[ep.episode_id]
        sl = after.get(ep.episode_id)
        results = {"in context": ic, "closed book": cb, **({"after sleep": sl} if sl else {})}
        print(f"\nepisode {ep.episode_id}: {len(ep.documents)} documents, {len(ep.probes)} questions")
        print(_row(["question", "phrasing", "truth", "in context", "closed book"] + (["after sleep"] if sl else [])))
        for i in _shown(ep.probes, max_questions):
            p = ep.probes[i]
            print(_row([p.question, p.phrasing, p.answer, ic.answers[i], cb.answers[i]]
                       + ([sl.answers[i]] if sl else [])))
        line = f"accuracy: in context {ic.accuracy:.2f}, closed book {cb.accuracy:.2f}"
        if sl:
            line += f", closed book after sleep {sl.accuracy:.2f}"
        if ep.facts:
            line += f" (chance {chance_accuracy(ep.probes):.3f})"
        print(line)
        by = {col: accuracy_by_phrasing(ep.probes, r.answers) for col, r in results.items()}
        for col, r in results.items():
            scores["all"].setdefault(col, []).append(r.accuracy)
            for ph, acc in by[col].items():
                scores.setdefault(ph, {}).setdefault(col, []).append(acc)
        if len(by["closed book"]) > 1:  # more than one phrasing family in this episode
            print("by phrasing: " + "; ".join(f"{ph}: " + ", ".join(f"{col} {by[col][ph]:.2f}" for col in results)
                                              for ph in by["closed book"]))
    print(f"\nover {len(eps)} episodes (mean accuracy):\n" + _summary(scores))
    return 0
