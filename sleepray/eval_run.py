"""The continual-learning benchmark: methods x seeds over one stream, sleep after each part.

``run_eval(cfg, out)`` cuts the configured stream (``world``: the built-in world or the
user's files) into ``cycle.n_sleeps`` parts. For every method of ``eval.methods`` and
every seed (``eval.seeds`` of them from ``eval.first_seed``; a seed sets ``seed.seed``,
the training randomness, while the world stays the same), the method gets a fresh
storage folder; each part is appended to its MemoryStore, the method sleeps once, and
then every episode of the stream (seen or not) is answered closed-book and, for
reference, with its documents in context. Perplexity on held-out general text and on
held-out world documents is measured after every sleep. Metrics: ``sleepray.eval_metrics``.

Every question has a phrasing (``sleepray.world.Probe.phrasing``): ``"seen"``, a question
template the seed model met in pretraining, or ``"unseen"``, an evaluation-only template
that appears nowhere in pretraining nor in a sleep (the honest generalisation figure).
Scores are reported over all questions and per phrasing family.

Files written under ``out``:

``results.json`` (schema version 2)::

    {"schema_version": 2, "created_at": ISO time, "profile": eval.profile, "wall_seconds": float,
     "provenance": sleepray.provenance.provenance(seeds, world_seeds),
     "config": the full config, "methods": [...], "seeds": [...],
     "episodes": [episode ids, j order], "parts": [[ids of part i] ...], "part_of": [p(j) ...],
     "n_probes": [probes of episode j ...], "phrasings": [phrasing groups in the stream],
     "n_probes_by_phrasing": {phrasing: [probes of that phrasing in episode j ...]},
     "baseline": {"closed_book": [b_j ...], "in_context": [...],
                  "closed_book_by_phrasing": {phrasing: [b_j | null ...]},
                  "in_context_by_phrasing": {phrasing: [...]}, "perplexity": float,
                  "perplexity_world": float, "seconds": float},
     "runs": [{"method", "seed", "R": [[R[i][j]]], "R_mode": "closed_book" | "in_context",
               "R_by_phrasing": {phrasing: [[R[i][j] | null]]},
               "R_in_context": [[...]] | null, "R_in_context_by_phrasing": {phrasing: [[...]]} | null,
               "F1": [[token F1, same mode as R]],
               "perplexity": [after sleep i ...], "perplexity_world": [...],
               "drift": [ppl_i / ppl_base - 1 ...], "drift_world": [...],
               "metrics": {"ACC", "BWT", "FWT", "LA", "forgetting", "ACC_in_context", "F1",
                           "ACC_seen", "ACC_unseen", "LA_seen", "LA_unseen", "BWT_seen",
                           "BWT_unseen", "ACC_in_context_seen", "ACC_in_context_unseen",
                           "drift", "drift_world", "seconds"},
               "seconds": wall seconds of the run, "sleep_seconds": [...], "eval_seconds": [...],
               "sleeps": [what each sleep reported], "config": the run's config (seed.seed set)}],
     "summary": {method: {metric: {"mean", "std", "n"}}}}

``R[i][j]``: exact-match accuracy on episode j after sleep i (i = 0 is the first sleep), over
all of the episode's questions. ``R_by_phrasing[ph]``: the same over its questions of phrasing
``ph`` only (same mode rule as ``R``), null where episode j has none; a phrasing no episode
has is left out. ``R_in_context_by_phrasing``: likewise for ``R_in_context`` (null when
in-context is not measured). ``metrics.<M>_<ph>`` (M = ACC, LA, BWT, ACC_in_context): the
metric of ``sleepray.eval_metrics`` on ``R_by_phrasing[ph]`` (``R_in_context_by_phrasing[ph]``
for ACC_in_context) over the episodes that have such questions; None when there are none
or in-context is not measured. ``metrics.drift``/``drift_world`` are the values after the
last sleep.

``answers.parquet``: one row per answered question: ``method, seed, after_sleep, episode,
part, seen, mode, phrasing, question, gold, prediction, em, f1``; ``after_sleep`` counts
from 1, ``mode`` is the prompt given (``closed_book`` or ``in_context``), ``seen`` whether
the episode had arrived, ``phrasing`` the question's phrasing family; the never-slept
baseline's rows have ``method = "base"``, ``seed`` null and ``after_sleep = 0``.

``plots/*.png`` and ``report.md``: ``sleepray.eval_report``.
"""
from __future__ import annotations

import datetime as _dt
import gc
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Optional

from tqdm.auto import tqdm

from sleepray import eval_metrics as M
from sleepray.world import PHRASINGS

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
DRIFT_WORLD_SEED = 10_900_000  # held-out world documents: never in pretraining nor in a stream
DRIFT_TEXT_SEED_OFFSET = 77
MODES = ("closed_book", "in_context")
ANSWER_COLUMNS = ["method", "seed", "after_sleep", "episode", "part", "seen", "mode", "phrasing", "question",
                  "gold", "prediction", "em", "f1"]
PHRASING_METRICS = tuple(f"{m}_{ph}" for m in ("ACC", "LA", "BWT", "ACC_in_context") for ph in PHRASINGS)
RUN_METRICS = ("ACC", "BWT", "FWT", "LA", "forgetting", "ACC_in_context", "F1", *PHRASING_METRICS, "drift",
               "drift_world", "seconds")


def heldout_texts(cfg) -> tuple[list[str], list[str]]:
    """(general text, world documents) for perplexity drift; neither is ever trained on."""
    from sleepray import general_text
    from sleepray.world import World
    general = general_text.corpus(general_text.HELDOUT_SEED + DRIFT_TEXT_SEED_OFFSET, cfg.eval.drift_texts)
    wc = cfg.world
    world = World(DRIFT_WORLD_SEED, max(1, wc.people_per_episode), wc.orgs_per_episode,
                  wc.places_per_episode, wc.phrasings_per_fact)
    docs = [d for ep in world.episodes(cfg.eval.drift_world_episodes) for d in ep.documents]
    return general, docs


def answer_episode(model, tok, episode, in_context: bool, max_new_tokens: int = 12) -> list[dict]:
    """Greedy answers to every probe of ``episode``: phrasing, question, gold, prediction, em, f1."""
    from sleepray.prompt_format import format_of
    from sleepray.qa import exact_match, generate_answers, token_f1
    if not episode.probes:
        return []
    fmt = format_of(tok)
    prompts = [fmt.question(p.question, episode.context if in_context else None) for p in episode.probes]
    preds = generate_answers(model, tok, prompts, max_new_tokens)
    return [{"phrasing": p.phrasing, "question": p.question, "gold": p.answer, "prediction": a,
             "em": exact_match(a, p.answer), "f1": token_f1(a, p.answer)} for p, a in zip(episode.probes, preds)]


def _mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows) if rows else 0.0


def _em_of(rows: list[dict], phrasing: str) -> Optional[float]:
    """Mean exact match over the rows of one phrasing; None when there are none."""
    xs = [r["em"] for r in rows if r["phrasing"] == phrasing]
    return sum(xs) / len(xs) if xs else None


def phrasing_metrics(R_by: dict, p: list[int], R_ic_by: Optional[dict]) -> dict:
    """``ACC_<ph>``, ``LA_<ph>``, ``BWT_<ph>``, ``ACC_in_context_<ph>`` for every phrasing of
    ``sleepray.world.PHRASINGS``, each over the episodes that have questions of that phrasing
    (None where there are none, or in-context was not measured)."""
    out = {k: None for k in PHRASING_METRICS}
    for ph in PHRASINGS:
        for R, keys in ((R_by.get(ph), ("ACC", "LA", "BWT")), ((R_ic_by or {}).get(ph), ("ACC_in_context",))):
            cols = [j for j in range(len(p)) if R and R[0][j] is not None]
            if not cols:
                continue
            sub, sp = [[row[j] for j in cols] for row in R], [p[j] for j in cols]
            vals = {"ACC": M.acc(sub), "LA": M.learning_accuracy(sub, sp), "BWT": M.bwt(sub, sp),
                    "ACC_in_context": M.acc(sub)}
            out.update({f"{k}_{ph}": vals[k] for k in keys})
    return out


class Stream:
    """The episodes, their parts and the held-out texts: the same for every method and seed."""

    def __init__(self, cfg, episodes: Optional[list] = None):
        from sleepray.cycle import chunks
        from sleepray.stream import evaluation_episodes
        self.episodes = list(episodes if episodes is not None else evaluation_episodes(cfg.world))
        if not self.episodes:
            raise ValueError("the stream has no episodes")
        empty = [e.episode_id for e in self.episodes if not e.probes]
        if empty:
            raise ValueError(f"episodes {empty[:5]} have no question/answer pairs to evaluate")
        bare = [e.episode_id for e in self.episodes if not any(d.strip() for d in e.documents)]
        if bare:
            raise ValueError(f"episodes {bare[:5]} have questions but no document: nothing to learn them from")
        if len({e.episode_id for e in self.episodes}) != len(self.episodes):
            raise ValueError("episode ids repeat in the stream")
        self.parts = chunks(self.episodes, cfg.cycle.n_sleeps)
        self.ids = [e.episode_id for e in self.episodes]
        self.part_of = M.part_of([[e.episode_id for e in p] for p in self.parts], self.ids)
        found = {p.phrasing for e in self.episodes for p in e.probes}
        self.phrasings = [ph for ph in PHRASINGS if ph in found] + sorted(found - set(PHRASINGS))
        self.general, self.world_docs = heldout_texts(cfg)


class _Measure:
    """Answers and perplexities of one method run, cached while its weights do not change."""

    def __init__(self, cfg, stream: Stream, method: str, seed, rows: list):
        self.cfg, self.stream, self.method, self.seed, self.rows = cfg, stream, method, seed, rows
        self.cache: dict = {}

    def answers(self, version, model, tok, j: int, mode: str, after: int) -> list[dict]:
        key = (version, j, mode)
        if key not in self.cache:
            self.cache[key] = answer_episode(model, tok, self.stream.episodes[j], mode == "in_context",
                                             self.cfg.eval.answer_max_new_tokens)
        out = self.cache[key]
        seen = self.stream.part_of[j] < after
        for r in out:
            self.rows.append({"method": self.method, "seed": self.seed, "after_sleep": after,
                              "episode": self.stream.ids[j], "part": self.stream.part_of[j] + 1,
                              "seen": seen, "mode": mode, **r})
        return out

    def perplexity(self, version, model, tok) -> tuple[float, float]:
        from sleepray.lm import perplexity
        key = (version, "ppl")
        if key not in self.cache:
            self.cache[key] = (perplexity(model, tok, self.stream.general),
                               perplexity(model, tok, self.stream.world_docs))
        return self.cache[key]


def measure_baseline(cfg, stream: Stream, rows: list) -> dict:
    """The never-slept base model: b_j closed-book, in-context, perplexities."""
    from sleepray.models import load_from_config
    t0 = time.time()
    model, tok, _ = load_from_config(cfg, progress=False)
    meas = _Measure(cfg, stream, "base", None, rows)
    out = {"closed_book": [], "in_context": []}
    by = {mode: {ph: [] for ph in stream.phrasings} for mode in MODES}
    for j in range(len(stream.episodes)):
        for mode in MODES:
            rows_j = meas.answers(0, model, tok, j, mode, 0)
            out[mode].append(_mean(rows_j, "em"))
            for ph in stream.phrasings:
                by[mode][ph].append(_em_of(rows_j, ph))
    out["closed_book_by_phrasing"], out["in_context_by_phrasing"] = by["closed_book"], by["in_context"]
    out["perplexity"], out["perplexity_world"] = meas.perplexity(0, model, tok)
    out["seconds"] = round(time.time() - t0, 2)
    return out


def run_method(cfg, stream: Stream, name: str, seed: int, storage: Path, baseline: dict, rows: list,
               bar=None) -> dict:
    """One method on one seed over the whole stream; returns its run record."""
    from sleepray.eval_methods import make
    if storage.exists():
        shutil.rmtree(storage)
    t0 = time.time()
    m = make(name, cfg, storage, seed)
    meas = _Measure(cfg, stream, name, seed, rows)
    E = len(stream.episodes)
    want_ic = cfg.eval.in_context or m.measured_in_context
    R, F1, R_ic, ppl, ppl_w = [], [], [], [], []
    R_by = {ph: [] for ph in stream.phrasings}
    R_ic_by = {ph: [] for ph in stream.phrasings}
    sleeps, sleep_s, eval_s = [], [], []
    try:
        for i, part in enumerate(stream.parts):
            m.append(part)
            ts = time.time()
            sleeps.append(m.sleep(i))
            sleep_s.append(round(time.time() - ts, 2))
            te = time.time()
            model, tok = m.model()
            row, f1row, icrow = [], [], []
            by_row = {ph: [] for ph in stream.phrasings}
            ic_by_row = {ph: [] for ph in stream.phrasings}
            for j in range(E):
                cb = meas.answers(m.version, model, tok, j, "closed_book", i + 1)
                ic = meas.answers(m.version, model, tok, j, "in_context", i + 1) if want_ic else None
                use = ic if (m.measured_in_context and stream.part_of[j] <= i) else cb
                row.append(_mean(use, "em"))
                f1row.append(_mean(use, "f1"))
                for ph in stream.phrasings:
                    by_row[ph].append(_em_of(use, ph))
                if ic is not None:
                    icrow.append(_mean(ic, "em"))
                    for ph in stream.phrasings:
                        ic_by_row[ph].append(_em_of(ic, ph))
            R.append(row)
            F1.append(f1row)
            R_ic.append(icrow)
            for ph in stream.phrasings:
                R_by[ph].append(by_row[ph])
                R_ic_by[ph].append(ic_by_row[ph])
            g, w = meas.perplexity(m.version, model, tok)
            ppl.append(g)
            ppl_w.append(w)
            eval_s.append(round(time.time() - te, 2))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(method=name, seed=seed, acc=f"{sum(row) / E:.2f}")
    finally:
        m.close()
        del m
        gc.collect()
        if not cfg.eval.keep_runs:
            shutil.rmtree(storage, ignore_errors=True)
    seconds = round(time.time() - t0, 2)
    drift = [x / baseline["perplexity"] - 1.0 for x in ppl]
    drift_w = [x / baseline["perplexity_world"] - 1.0 for x in ppl_w]
    metrics = M.metrics(R, stream.part_of, baseline["closed_book"])
    metrics.update(ACC_in_context=M.acc(R_ic) if want_ic else None, F1=M.acc(F1),
                   **phrasing_metrics(R_by, stream.part_of, R_ic_by if want_ic else None),
                   drift=drift[-1], drift_world=drift_w[-1], seconds=seconds)
    run_cfg = cfg.model_copy(deep=True)
    run_cfg.seed.seed = seed
    return {"method": name, "seed": seed, "R": R,
            "R_mode": "in_context" if name == "in_context" else "closed_book", "R_by_phrasing": R_by,
            "R_in_context": R_ic if want_ic else None, "R_in_context_by_phrasing": R_ic_by if want_ic else None,
            "F1": F1, "perplexity": ppl, "perplexity_world": ppl_w,
            "drift": drift, "drift_world": drift_w, "metrics": metrics, "seconds": seconds,
            "sleep_seconds": sleep_s, "eval_seconds": eval_s, "sleeps": sleeps,
            "config": run_cfg.model_dump(mode="json")}


def seeds_of(cfg) -> list[int]:
    return [cfg.eval.first_seed + k for k in range(cfg.eval.seeds)]


def run_eval(cfg, out: str | Path, progress: bool = True, episodes: Optional[list] = None) -> dict:
    """Run every method on every seed; write results.json and answers.parquet under ``out``."""
    import torch
    threads = torch.get_num_threads()
    if cfg.eval.num_threads:
        torch.set_num_threads(cfg.eval.num_threads)
    try:
        return _run_eval(cfg, out, progress, episodes)
    finally:
        torch.set_num_threads(threads)


def _run_eval(cfg, out, progress: bool, episodes: Optional[list]) -> dict:
    from sleepray.eval_methods import check_methods
    from sleepray.provenance import provenance
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    methods = check_methods(list(cfg.eval.methods))
    if progress:  # one bar for the whole run: not one per model load
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    seeds = seeds_of(cfg)
    t0 = time.time()
    stream = Stream(cfg, episodes)
    rows: list[dict] = []
    baseline = measure_baseline(cfg, stream, rows)
    runs = []
    bar = tqdm(total=len(methods) * len(seeds) * len(stream.parts), desc="eval", unit="sleep",
               disable=not progress)
    try:
        for name in methods:
            for seed in seeds:
                runs.append(run_method(cfg, stream, name, seed, out / "runs" / name / f"seed{seed}",
                                       baseline, rows, bar))
                log.info("%s seed %d: ACC %.3f in %.0fs", name, seed, runs[-1]["metrics"]["ACC"],
                         runs[-1]["seconds"])
    finally:
        bar.close()
    if not cfg.eval.keep_runs:
        shutil.rmtree(out / "runs", ignore_errors=True)
    results = {
        "schema_version": SCHEMA_VERSION,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "profile": cfg.eval.profile, "wall_seconds": round(time.time() - t0, 2),
        "provenance": provenance(seeds=seeds, world_seeds=[cfg.world.seed] if cfg.world.source == "builtin" else []),
        "config": cfg.model_dump(mode="json"), "methods": methods, "seeds": seeds,
        "episodes": stream.ids, "parts": [[e.episode_id for e in p] for p in stream.parts],
        "part_of": stream.part_of, "n_probes": [len(e.probes) for e in stream.episodes],
        "phrasings": stream.phrasings,
        "n_probes_by_phrasing": {ph: [sum(p.phrasing == ph for p in e.probes) for e in stream.episodes]
                                 for ph in stream.phrasings},
        "baseline": baseline, "runs": runs,
        "summary": {m: M.summarize([r for r in runs if r["method"] == m], RUN_METRICS) for m in methods},
    }
    write_answers(rows, out / "answers.parquet")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


def write_answers(rows: list[dict], path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    schema = pa.schema([("method", pa.string()), ("seed", pa.int64()), ("after_sleep", pa.int32()),
                        ("episode", pa.string()), ("part", pa.int32()), ("seen", pa.bool_()),
                        ("mode", pa.string()), ("phrasing", pa.string()), ("question", pa.string()),
                        ("gold", pa.string()),
                        ("prediction", pa.string()), ("em", pa.float64()), ("f1", pa.float64())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def run_and_report(cfg, out: str | Path, progress: bool = True, episodes: Optional[list] = None) -> dict:
    """``run_eval``, then the plots and report.md (``sleepray.eval_report``)."""
    from sleepray.eval_report import write_report
    results = run_eval(cfg, out, progress, episodes)
    write_report(results, out)
    return results
