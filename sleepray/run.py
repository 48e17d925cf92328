"""`sleepray run`: the main job on the embedded default.

First the model answers questions about the configured world's episodes with each
episode in its context, and closed-book. Then the cycle job runs on a local Ray that this
command starts itself (``jobs.cycle``): the episodes arrive in ``cycle.n_sleeps`` parts;
each part goes into the MemoryStore actor and the Coordinator sleeps (NREM on a Ray
Train learner fed by a vLLM RolloutWorker, REM, publish). Then closed-book again. Every
number printed is computed here.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from sleepray.models import load_from_config
from sleepray.qa import evaluate_probes
from sleepray.stream import episodes_from_config
from sleepray.world import chance_accuracy

log = logging.getLogger(__name__)
WIDTHS = [44, 16, 16, 16, 16]


def _row(cells: list[str]) -> str:
    return "  ".join(c[:w].ljust(w) for c, w in zip(cells, WIDTHS))


def run_default(cfg, episodes: int | None = None, sleep: bool = True, max_questions: int = 8) -> int:
    model, tok, path = load_from_config(cfg)
    log.info("model: %s", path)
    eps = episodes_from_config(cfg.world, episodes)
    before = {ep.episode_id: (evaluate_probes(model, tok, ep.probes, ep.context),
                              evaluate_probes(model, tok, ep.probes, None)) for ep in eps}
    after = {}
    if sleep:
        from jobs.cycle import run_on_ray
        from sleepray.cycle_run import write_results
        from sleepray.sleep import latest_version, load_bank
        storage = Path(cfg.cycle.storage).resolve() / time.strftime("run-%Y%m%d-%H%M%S")
        cfg.cycle.storage = str(storage)
        print(f"awake: {len(eps)} episodes arrive in {cfg.cycle.n_sleeps} parts; "
              f"each goes to the short-term memory ({storage / 'memory'}), then a sleep on a local Ray...")
        result = run_on_ray(cfg)
        write_results(result, storage / "cycle_results.json")
        bank, tok, _ = load_bank(cfg, storage)
        after = {ep.episode_id: evaluate_probes(bank.model, tok, ep.probes, None) for ep in eps}
        for i, st in enumerate(result["sleeps"]):
            last = st.get("last_sleep") or {}
            print(f"sleep {i + 1}: {last.get('version')} over {last.get('episodes')} episodes "
                  f"in {st['wall_seconds']:.0f}s")
        print(f"asleep: consolidated into {latest_version(storage)} (results: {storage / 'cycle_results.json'})")
    totals: dict[str, list[float]] = {"in context": [], "closed book": [], "after sleep": []}
    for ep in eps:
        ic, cb = before[ep.episode_id]
        sl = after.get(ep.episode_id)
        totals["in context"].append(ic.accuracy)
        totals["closed book"].append(cb.accuracy)
        print(f"\nepisode {ep.episode_id}: {len(ep.documents)} documents, {len(ep.probes)} questions")
        print(_row(["question", "truth", "in context", "closed book"] + (["after sleep"] if sl else [])))
        for i, p in enumerate(ep.probes[:max_questions]):
            print(_row([p.question, p.answer, ic.answers[i], cb.answers[i]] + ([sl.answers[i]] if sl else [])))
        line = f"accuracy: in context {ic.accuracy:.2f}, closed book {cb.accuracy:.2f}"
        if sl:
            totals["after sleep"].append(sl.accuracy)
            line += f", closed book after sleep {sl.accuracy:.2f}"
        if ep.facts:
            line += f" (chance {chance_accuracy(ep.probes):.3f})"
        print(line)
    means = {k: sum(v) / len(v) for k, v in totals.items() if v}
    print(f"\nover {len(eps)} episodes: " + ", ".join(f"{k} {v:.2f}" for k, v in means.items()))
    return 0
