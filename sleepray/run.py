"""`sleepray run`: the main job on the embedded default.

Awake: the episodes of the configured world arrive; the model answers questions about
them with the episodes in its context, and closed-book. Asleep: the episodes go into
the short-term memory and one NREM sleep consolidates them into a fresh expert. Then
the closed-book answers again. Every number printed is computed here.

(The Ray actor system will run the same phases as actors; this runs them in one process.)
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from sleepray.memory import MemoryStore
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
        from sleepray.sleep import load_bank, sleep_nrem
        storage = Path(cfg.cycle.storage) / time.strftime("run-%Y%m%d-%H%M%S")
        MemoryStore(storage / "memory").append(eps)
        print(f"awake: {len(eps)} episodes in short-term memory ({storage / 'memory'}); sleeping (NREM)...")
        version = sleep_nrem(cfg, storage)
        bank, tok, _ = load_bank(cfg, storage)
        after = {ep.episode_id: evaluate_probes(bank.model, tok, ep.probes, None) for ep in eps}
        print(f"asleep: consolidated into {version}")
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
