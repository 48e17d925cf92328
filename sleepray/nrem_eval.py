"""Measure one NREM against plain SFT on the raw episode, over several seeds.

For each seed: a fresh episode of new entities; closed-book and in-context accuracy
before; then (a) NREM into a fresh expert, then REM on the same expert (when
``rem.enabled``), (b) SFT of a fresh expert on the episode's documents with the same
steps and learning rate; closed-book accuracy and perplexity
drift on held-out general text and on held-out world documents (other unseen episodes)
after each. Answers are used for scoring only.
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
from sleepray.prompts import consolidation_prompts
from sleepray.qa import evaluate_probes
from sleepray.world import World

log = logging.getLogger(__name__)
EVAL_WORLD_SEED = 10_000_500


def _scores(model, tok, ep, heldout, heldout_world) -> dict:
    return {"closed_book": evaluate_probes(model, tok, ep.probes, None).accuracy,
            "in_context": evaluate_probes(model, tok, ep.probes, ep.context).accuracy,
            "perplexity": perplexity(model, tok, heldout),
            "perplexity_world": perplexity(model, tok, heldout_world)}


def _after(before: dict, after: dict) -> dict:
    out = dict(after)
    out["drift"] = after["perplexity"] / before["perplexity"] - 1.0
    out["drift_world"] = after["perplexity_world"] / before["perplexity_world"] - 1.0
    out["closed_book_over_in_context"] = after["closed_book"] / max(before["in_context"], 1e-9)
    return out


def run_seed(cfg, seed: int, progress: bool = False) -> dict:
    path = resolve_model_path(cfg.model.path)
    wc = cfg.world
    ep = World(EVAL_WORLD_SEED + seed, wc.people_per_episode, wc.orgs_per_episode,
               wc.places_per_episode, wc.phrasings_per_fact).episode(0)
    heldout = general_text.corpus(general_text.HELDOUT_SEED + seed, 32)
    # documents of other unseen episodes: the text this seed model was trained on
    heldout_world = [d for e in World(EVAL_WORLD_SEED + 1000 + seed, wc.people_per_episode,
                                      wc.orgs_per_episode, wc.places_per_episode,
                                      wc.phrasings_per_fact).episodes(4) for d in e.documents]
    out = {"seed": seed, "episode": ep.episode_id, "n_probes": len(ep.probes)}

    model, tok = load_model(path)
    out["before"] = before = _scores(model, tok, ep, heldout, heldout_world)
    torch.manual_seed(seed)  # the fresh expert's initialisation
    bank = ExpertBank(model, cfg.experts)
    bank.open_new_expert()
    t0 = time.time()
    prompts = consolidation_prompts(ep, cfg.nrem.prompts_per_episode, random.Random(seed))
    from sleepray.sleep_phases import nrem_anchor, rem_anchor
    res = run_nrem(bank, tok, prompts, cfg.nrem, seed=seed, progress=progress, anchor_texts=nrem_anchor(cfg))
    # scored with the new expert still open (it is on, as the student): REM goes on training it
    out["nrem"] = _after(before, _scores(bank.model, tok, ep, heldout, heldout_world))
    out["nrem"].update(seconds=round(time.time() - t0, 1), train=res.final)
    if cfg.rem.enabled:
        from sleepray.rem import run_rem
        t0 = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            rem = run_rem(bank, tok, [ep], cfg.rem, tmp, rng=random.Random(seed), anchor_texts=rem_anchor(cfg))
        out["nrem_rem"] = _after(before, _scores(bank.model, tok, ep, heldout, heldout_world))
        out["nrem_rem"].update(seconds=round(out["nrem"]["seconds"] + time.time() - t0, 1),
                               rem={k: v for k, v in rem.items() if isinstance(v, (int, float))})
    bank.freeze_current()

    model, tok = load_model(path)
    torch.manual_seed(seed)
    bank = ExpertBank(model, cfg.experts)
    bank.open_new_expert()
    t0 = time.time()
    sft(bank.trainable_parameters(), bank.model, tok, ep.documents, cfg.nrem.steps, cfg.nrem.lr,
        batch_size=cfg.nrem.batch_size, seed=seed)
    bank.freeze_current()
    out["sft_raw"] = _after(before, _scores(bank.model, tok, ep, heldout, heldout_world))
    out["sft_raw"]["seconds"] = round(time.time() - t0, 1)
    log.info("seed %d: closed-book %.2f -> NREM %.2f / NREM+REM %s / SFT %.2f (in-context %.2f)", seed,
             before["closed_book"], out["nrem"]["closed_book"],
             f"{out['nrem_rem']['closed_book']:.2f}" if "nrem_rem" in out else "-",
             out["sft_raw"]["closed_book"], before["in_context"])
    return out


def summarize(runs: list[dict]) -> dict:
    def stat(method, key):
        xs = [r[method][key] for r in runs]
        return {"mean": statistics.fmean(xs), "std": statistics.pstdev(xs) if len(xs) > 1 else 0.0}
    keys = ["closed_book", "in_context", "drift", "drift_world", "closed_book_over_in_context"]
    return {"before": {k: stat("before", k) for k in ["closed_book", "in_context", "perplexity",
                                                      "perplexity_world"]},
            **{m: {k: stat(m, k) for k in keys} for m in ("nrem", "nrem_rem", "sft_raw") if m in runs[0]}}


def evaluate_nrem(cfg, seeds: list[int], progress: bool = True) -> dict:
    runs = [run_seed(cfg, s, progress) for s in seeds]
    return {"model": cfg.model.path, "seeds": seeds, "runs": runs, "summary": summarize(runs),
            "config": cfg.model_dump(mode="json")}
