"""One sleep against the fair baselines, over seeds, on questions the sleep never saw.

For each seed: a fresh episode of new entities from a dev or a test world
(``sleepray.splits``; tune on dev, report on test); closed-book and in-context accuracy
before; then, each on a fresh expert with the same steps and learning rate:

* ``nrem``: NREM on prompts the model wrote itself (its own questions about the episode,
  with the episode in context, and prefixes of the documents), then ``nrem_rem``: REM on
  the same expert (when ``rem.enabled``), probing with the model's own questions;
* ``sft_raw``: SFT on the episode's documents;
* ``sft_self_qa``: SFT on the same self-written questions NREM prompted with, answered
  by the teacher (the model with the episode in context): the Q/A a sleep trains on.

The evaluation's questions and answers (``Episode.probes``) are read only to score, in
two families reported apart: the phrasings the seed model met in pretraining ("seen")
and evaluation-only phrasings that appear nowhere in pretraining nor in a sleep
("unseen"). Perplexity drift on held-out general text and held-out world documents.
"""
from __future__ import annotations

import logging
import random
import statistics
import tempfile
import time

import torch

from sleepray import general_text
from sleepray.experts import ExpertBank
from sleepray.lm import perplexity, sft
from sleepray.models import load_model, resolve_model_path
from sleepray.nrem import run_nrem
from sleepray.prompt_format import attach, format_of
from sleepray.prompts import consolidation_prompts, model_question_writer
from sleepray.qa import evaluate_probes
from sleepray.splits import world_seed
from sleepray.world import PHRASINGS, World

log = logging.getLogger(__name__)
HELDOUT_WORLD_OFFSET = 50_000  # the drift documents' worlds, in the same split's range
METHODS = ("nrem", "nrem_rem", "sft_raw", "sft_self_qa")


def _world(wc, seed: int) -> World:
    return World(seed, wc.people_per_episode, wc.orgs_per_episode, wc.places_per_episode,
                 wc.phrasings_per_fact)


def _scores(model, tok, ep, heldout, heldout_world) -> dict:
    out = {}
    for ph in PHRASINGS:
        probes = [p for p in ep.probes if p.phrasing == ph]
        if probes:
            out[f"closed_book_{ph}"] = evaluate_probes(model, tok, probes, None).accuracy
            out[f"in_context_{ph}"] = evaluate_probes(model, tok, probes, ep.context).accuracy
    out["closed_book"], out["in_context"] = out["closed_book_seen"], out["in_context_seen"]
    out["perplexity"] = perplexity(model, tok, heldout)
    out["perplexity_world"] = perplexity(model, tok, heldout_world)
    return out


def _after(before: dict, after: dict) -> dict:
    out = dict(after)
    out["drift"] = after["perplexity"] / before["perplexity"] - 1.0
    out["drift_world"] = after["perplexity_world"] / before["perplexity_world"] - 1.0
    for ph in PHRASINGS:
        if f"closed_book_{ph}" in after:  # the sleep's closed book against the model reading the episode
            out[f"closed_over_in_context_{ph}"] = after[f"closed_book_{ph}"] / max(before[f"in_context_{ph}"], 1e-9)
    return out


def _fresh_bank(cfg, path, seed: int):
    model, tok = load_model(path)
    attach(tok, cfg.model)
    torch.manual_seed(seed)  # the fresh expert's initialisation
    bank = ExpertBank(model, cfg.experts)
    bank.open_new_expert()
    return bank, tok


def run_seed(cfg, seed: int, split: str = "test", progress: bool = False) -> dict:
    from sleepray.nrem_step import nrem_anchor
    from sleepray.rem_step import rem_anchor
    path = resolve_model_path(cfg.model.path)
    wc = cfg.world
    ws = world_seed(split, seed)
    ep = _world(wc, ws).episode(0)
    heldout = general_text.corpus(general_text.HELDOUT_SEED + seed, 32)
    # documents of other unseen episodes: the kind of text this seed model was trained on
    heldout_world = [d for e in _world(wc, ws + HELDOUT_WORLD_OFFSET).episodes(4) for d in e.documents]
    memory = type(ep)(ep.episode_id, list(ep.documents), [], [])  # what a sleep gets: the documents
    out = {"seed": seed, "world_seed": ws, "split": split, "episode": ep.episode_id,
           "n_probes": {ph: sum(p.phrasing == ph for p in ep.probes) for ph in PHRASINGS}}

    bank, tok = _fresh_bank(cfg, path, seed)
    with bank.teacher_mode():
        out["before"] = before = _scores(bank.model, tok, ep, heldout, heldout_world)
    t0 = time.time()
    written: list[str] = []
    writer = model_question_writer(bank, tok, cfg.nrem.temperature, seed=seed)

    def recording_writer(context: str, k: int) -> list[str]:
        qs = writer(context, k)
        written.extend(qs)
        return qs
    fmt = format_of(tok)
    prompts = consolidation_prompts(memory, cfg.nrem.prompts_per_episode, random.Random(seed), recording_writer,
                                    fmt=fmt)
    by_prompt = {fmt.question(q): q for q in written}  # in the order NREM asked them
    questions = list(dict.fromkeys(by_prompt[p.prompt] for p in prompts if p.kind == "query"))
    out["self_written_questions"] = len(questions)
    res = run_nrem(bank, tok, prompts, cfg.nrem, seed=seed, progress=progress, anchor_texts=nrem_anchor(cfg))
    # scored with the new expert still open (it is on, as the student): REM goes on training it
    out["nrem"] = _after(before, _scores(bank.model, tok, ep, heldout, heldout_world))
    out["nrem"].update(seconds=round(time.time() - t0, 1), train=res.final)
    if cfg.rem.enabled:
        from sleepray.rem import run_rem
        t0 = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            rem = run_rem(bank, tok, [memory], cfg.rem, tmp, rng=random.Random(seed), anchor_texts=rem_anchor(cfg),
                          question_writer=model_question_writer(bank, tok, cfg.nrem.temperature, seed=seed + 1))
        out["nrem_rem"] = _after(before, _scores(bank.model, tok, ep, heldout, heldout_world))
        out["nrem_rem"].update(seconds=round(out["nrem"]["seconds"] + time.time() - t0, 1),
                               rem={k: v for k, v in rem.items() if isinstance(v, (int, float))})
    # the teacher's answers to the questions NREM prompted with: the Q/A the sleep trains on
    from sleepray.rem import teacher_probe_targets
    self_qa = teacher_probe_targets(bank, tok, memory, len(questions), lambda context, k: questions,
                                    cfg.rem.probe_max_new_tokens)
    out["self_qa_pairs"] = len(self_qa)
    del bank

    for name, texts, sft_prompts in (
            ("sft_raw", list(ep.documents), None),
            ("sft_self_qa", [t.text for t in self_qa], [t.prompt for t in self_qa])):
        if not texts:
            log.warning("seed %d: no texts for %s", seed, name)
            continue
        bank, tok = _fresh_bank(cfg, path, seed)
        t0 = time.time()
        sft(bank.trainable_parameters(), bank.model, tok, texts, cfg.nrem.steps, cfg.nrem.lr,
            batch_size=cfg.nrem.batch_size, seed=seed, prompts=sft_prompts)
        bank.freeze_current()
        out[name] = _after(before, _scores(bank.model, tok, ep, heldout, heldout_world))
        out[name]["seconds"] = round(time.time() - t0, 1)
        del bank
    log.info("seed %d (world %d): closed-book seen/unseen %.2f/%.2f -> NREM %.2f/%.2f, NREM+REM %s, "
             "SFT docs %s, SFT self-QA %s (in context %.2f/%.2f)", seed, ws, before["closed_book_seen"],
             before["closed_book_unseen"], out["nrem"]["closed_book_seen"], out["nrem"]["closed_book_unseen"],
             *(f"{out[m]['closed_book_seen']:.2f}/{out[m]['closed_book_unseen']:.2f}" if m in out else "-"
               for m in ("nrem_rem", "sft_raw", "sft_self_qa")),
             before["in_context_seen"], before["in_context_unseen"])
    return out


def _stat(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def summarize(runs: list[dict]) -> dict:
    """Mean and sample standard deviation over seeds of every score."""
    keys = [f"{m}_{ph}" for m in ("closed_book", "in_context", "closed_over_in_context") for ph in PHRASINGS]
    keys += ["drift", "drift_world"]
    out = {"before": {k: _stat([r["before"][k] for r in runs]) for k in
                      [f"{m}_{ph}" for m in ("closed_book", "in_context") for ph in PHRASINGS]
                      + ["perplexity", "perplexity_world"]}}
    for m in METHODS:
        have = [r for r in runs if m in r]
        if have:
            out[m] = {k: _stat([r[m][k] for r in have]) for k in keys if k in have[0][m]}
    return out


def evaluate_nrem(cfg, seeds: list[int], split: str = "test", progress: bool = True) -> dict:
    from sleepray.provenance import provenance
    runs = [run_seed(cfg, s, split, progress) for s in seeds]
    return {"model": cfg.model.path, "split": split, "seeds": seeds,
            "provenance": provenance(seeds, [world_seed(split, s) for s in seeds]),
            "runs": runs, "summary": summarize(runs), "config": cfg.model_dump(mode="json")}


def merge(parts: list[dict]) -> dict:
    """One result from runs over other seeds with the same settings (e.g. one process per seed)."""
    if not parts:
        raise ValueError("nothing to merge")
    first = parts[0]
    for k, p in enumerate(parts[1:], 1):
        for key in ("model", "split", "config"):
            if p[key] != first[key]:
                raise ValueError(f"part {k} differs from part 0 in {key!r}: not the same measurement")
    runs = sorted((r for p in parts for r in p["runs"]), key=lambda r: r["seed"])
    seeds = [r["seed"] for r in runs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"a seed is in two parts: {seeds}")
    from sleepray.provenance import common_revision, provenance
    return {"model": first["model"], "split": first["split"], "seeds": seeds,
            "provenance": provenance(seeds, [r["world_seed"] for r in runs]),
            "provenance_parts": [p["provenance"] for p in parts],
            "measured_revision": common_revision([p["provenance"] for p in parts]),
            "runs": runs, "summary": summarize(runs), "config": first["config"]}

