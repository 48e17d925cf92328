"""The phases of one sleep, and the in-process backend that runs NREM and REM.

A phase function takes ``(cfg, storage, record, backend)``, writes its outputs under the
sleep's folder (or the storage's ``adapters/`` / ``bases/``) and returns its metrics;
``sleepray.cycle.run_sleep`` records them. A backend runs the two training phases:

    backend.nrem(cfg, storage, rec, episodes, out_dir) -> metrics   (writes out_dir/bank)
    backend.rem(cfg, storage, rec, episodes, out_dir)  -> metrics   (writes out_dir/bank)
    backend.published(version_dir)                                  (engines load it)
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import torch

from sleepray.cycle import SleepRecord, live_episodes, phase_seed, records, rng_for
from sleepray.memory import MemoryStore

log = logging.getLogger(__name__)

BASES_DIR = "bases"
REPLAY_FILE = Path("replay") / "buffer.parquet"


# ------------------------------------------------------------------ models and banks

def current_base(cfg, storage: Path) -> str:
    """The base model: the latest deep-sleep merge under ``storage/bases``, else ``cfg.model``."""
    from sleepray.models import resolve_model_path
    d = Path(storage) / BASES_DIR
    merged = sorted(p for p in d.iterdir() if (p / "config.json").is_file()) if d.is_dir() else []
    return str(merged[-1]) if merged else resolve_model_path(cfg.model.path)


def bank_from(cfg, storage: Path, folder: Optional[Path]):
    """(bank, tokenizer, base path): the bank saved in ``folder`` (None: fresh) on the current base."""
    from sleepray.experts import ExpertBank
    from sleepray.models import load_model
    base = current_base(cfg, storage)
    model, tok = load_model(base, cfg.model.dtype, cfg.model.device, cfg.model.trust_remote_code)
    bank = ExpertBank.load(model, folder) if folder else ExpertBank(model, cfg.experts)
    return bank, tok, base


def starting_bank_dir(cfg, storage: Path) -> Optional[Path]:
    """The bank a new sleep starts from: the latest version's, unless a deep sleep merged it."""
    from sleepray.sleep import latest_version
    latest = latest_version(storage)
    if latest is None:
        return None
    d = Path(storage) / BASES_DIR
    if d.is_dir() and any(p.name >= latest.name for p in d.iterdir() if (p / "config.json").is_file()):
        return None  # its experts live in the merged base now
    return latest / "bank"


def nrem_prompts(cfg, bank, tok, rec: SleepRecord, episodes: list) -> list:
    from sleepray.prompts import consolidation_prompts, model_question_writer
    rng = rng_for(cfg, rec, "nrem")
    writer = model_question_writer(bank, tok, cfg.nrem.temperature, seed=phase_seed(cfg, rec, "nrem"))
    return [p for ep in episodes for p in consolidation_prompts(ep, cfg.nrem.prompts_per_episode, rng, writer)]


def nrem_anchor(cfg) -> list[str] | None:
    from sleepray.anchor import anchor_texts
    return anchor_texts(cfg) if cfg.nrem.anchor_weight > 0 else None


def rem_anchor(cfg) -> list[str] | None:
    from sleepray.anchor import anchor_texts
    return anchor_texts(cfg) if cfg.rem.anchor_weight > 0 else None


def nrem_replay(cfg, storage: Path, episodes: list) -> list[str]:
    """Texts of the rehearsal buffer's dreams about older episodes (not ``episodes``), for
    NREM's rehearsal; empty unless its weight, ``nrem.anchor_replay`` and ``rem.replay`` are on."""
    from sleepray.anchor import rehearses
    from sleepray.replay import ReplayBuffer
    if not cfg.rem.replay or not rehearses(cfg.nrem):
        return []
    return ReplayBuffer(storage / REPLAY_FILE, cfg.rem.buffer_size).texts([e.episode_id for e in episodes])


def last_bank_dir(rec: SleepRecord) -> Path:
    rem = rec.dir / "rem" / "bank"
    return rem if rec.is_done("rem") and (rem / "bank.json").is_file() else rec.dir / "nrem" / "bank"


def writer_dir(storage: Path, rec: SleepRecord) -> Optional[Path]:
    """The dream writer of the latest earlier sleep that finished REM (ReST-EM carries over)."""
    for r in reversed(records(storage)):
        d = r.dir / "rem" / "dream_writer"
        if r.number < rec.number and r.is_done("rem") and d.is_dir():
            return d
    return None


# ------------------------------------------------------------------------ backend

class LocalBackend:
    """NREM and REM in this process, on the learner's own model."""

    def __init__(self, progress: bool = True):
        self.progress = progress

    def nrem(self, cfg, storage: Path, rec: SleepRecord, episodes: list, out: Path) -> dict:
        from sleepray.nrem import run_nrem
        bank, tok, _ = bank_from(cfg, storage, starting_bank_dir(cfg, storage))
        prompts = nrem_prompts(cfg, bank, tok, rec, episodes)
        torch.manual_seed(phase_seed(cfg, rec, "nrem"))  # the fresh expert's initialisation
        slot = bank.open_new_expert()
        log.info("NREM %s: %d episodes, %d prompts, expert %s", rec.sleep_id, len(episodes), len(prompts), slot)
        result = run_nrem(bank, tok, prompts, cfg.nrem, seed=phase_seed(cfg, rec, "nrem"), progress=self.progress,
                          anchor_texts=nrem_anchor(cfg), replay_texts=nrem_replay(cfg, storage, episodes))
        bank.save(out / "bank")
        return {**result.final, "prompts": len(prompts), "expert": slot, "steps": cfg.nrem.steps}

    def rem(self, cfg, storage: Path, rec: SleepRecord, episodes: list, out: Path) -> dict:
        bank, tok, _ = bank_from(cfg, storage, rec.dir / "nrem" / "bank")
        return rem_in_process(cfg, storage, rec, bank, tok, episodes, out)

    def published(self, version_dir: Path) -> None:
        pass


def rem_in_process(cfg, storage: Path, rec: SleepRecord, bank, tok, episodes: list, out: Path) -> dict:
    """REM on the bank's open expert: dreams, selection, trials, ReST-EM, dream SFT, replay."""
    from sleepray.prompts import model_question_writer
    from sleepray.rem import DreamWriter, run_rem
    from sleepray.replay import ReplayBuffer
    torch.manual_seed(phase_seed(cfg, rec, "rem"))  # dream writer and random expert initialisations
    buffer = ReplayBuffer(storage / REPLAY_FILE, cfg.rem.buffer_size) if cfg.rem.replay else None
    if buffer is not None:
        buffer.drop_sleep(rec.sleep_id)  # a REM redone after a crash adds its rows again
    writer = None
    if cfg.rem.restem:
        prev = writer_dir(storage, rec)
        writer = DreamWriter.load(bank, tok, prev) if prev else DreamWriter.from_config(bank, tok, cfg.rem)
    metrics = run_rem(bank, tok, episodes, cfg.rem, out, rng=rng_for(cfg, rec, "rem"), buffer=buffer,
                      writer=writer, sleep_id=rec.sleep_id,
                      question_writer=model_question_writer(bank, tok, cfg.nrem.temperature,
                                                            seed=phase_seed(cfg, rec, "rem")),
                      anchor_texts=rem_anchor(cfg))
    bank.save(out / "bank")
    return metrics


# ------------------------------------------------------------------------- phases

def nrem_phase(cfg, storage: Path, rec: SleepRecord, backend) -> dict:
    episodes = live_episodes(storage, rec)
    if not episodes:
        return {"skipped": "every episode of this sleep was deleted"}
    return backend.nrem(cfg, storage, rec, episodes, rec.dir / "nrem")


def rem_phase(cfg, storage: Path, rec: SleepRecord, backend) -> dict:
    episodes = live_episodes(storage, rec)
    if not episodes or "skipped" in rec.metrics("nrem"):
        return {"skipped": "no live episodes"}
    return backend.rem(cfg, storage, rec, episodes, rec.dir / "rem")


def publish_phase(cfg, storage: Path, rec: SleepRecord, backend) -> dict:
    """Land ``adapters/vNNNN`` (once), then mark the sleep's live episodes consolidated."""
    from sleepray.sleep import adapters_dir, publish_version
    if "skipped" in rec.metrics("nrem"):
        return {"skipped": "nothing was trained"}
    final = adapters_dir(storage) / rec.version
    if not (final / "lineage.json").is_file():
        bank, _, base = bank_from(cfg, storage, last_bank_dir(rec))
        slot = bank.freeze_current()
        lineage = {
            "version": rec.version, "sleep_id": rec.sleep_id, "phase": "+".join(
                p for p in rec.phases if p in ("nrem", "rem")),
            "parent": rec.data["parent"], "base_model": base, "expert": slot, "experts_on": list(bank.on),
            "episodes": [e.episode_id for e in live_episodes(storage, rec)], "trigger": rec.data["trigger"],
            "config": cfg.model_dump(mode="json"),
            "metrics": {"nrem": rec.metrics("nrem"), "rem": rec.metrics("rem")},
            "created_at": time.time(),
        }
        publish_version(bank, storage, rec.version, lineage)
    lineage = json.loads((final / "lineage.json").read_text())
    store = MemoryStore(storage / "memory")
    live = [e for e in lineage["episodes"] if store.status_of(e) == "short_term"]
    marked = store.mark_consolidated(live, rec.version, adapter_version=rec.version) if live else []
    backend.published(final)
    return {"version": rec.version, "marked": len(marked)}


def deep_phase(cfg, storage: Path, rec: SleepRecord, backend) -> dict:
    """Deep sleep: merge every expert of this version into the base weights (L2)."""
    from sleepray.sleep import adapters_dir
    out = Path(storage) / BASES_DIR / rec.version
    if not (out / "config.json").is_file():
        bank, tok, _ = bank_from(cfg, storage, adapters_dir(storage) / rec.version / "bank")
        merged = bank.deep_sleep()
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        os.replace(tmp, out)
    return {"base": str(out)}


PHASES = {"nrem": nrem_phase, "rem": rem_phase, "publish": publish_phase, "deep": deep_phase}
