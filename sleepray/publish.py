"""The last steps of a sleep: publish the new adapter version, and the deep sleep.

A version folder ``adapters/vNNNN`` (adapter + bank + lineage) is written under a
temporary name and renamed into place when complete; the sleep's episodes are marked
consolidated only after that, so a sleep that died between the two is finished without
retraining. A deep sleep merges every expert of the version into the base weights
(``bases/vNNNN``): later sleeps start from that base and a fresh bank.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from sleepray.banks import bank_from, last_bank_dir
from sleepray.memory import MemoryStore
from sleepray.sleep_record import SleepRecord, live_episodes
from sleepray.storage import LINEAGE, Storage, atomic_path, write_json


def write_version(bank, final: Path, lineage: dict) -> Path:
    """Adapter (all on-experts as one PEFT adapter) + bank + lineage, swapped in atomically."""
    with atomic_path(final) as tmp:
        bank.export_combined(tmp)
        bank.save(tmp / "bank", lineage=lineage)
        write_json(tmp / LINEAGE, lineage)
    return final


def publish(cfg, store: Storage, rec: SleepRecord) -> dict:
    """Land ``adapters/vNNNN`` (once), then mark the sleep's live episodes consolidated."""
    final = store.version_dir(rec.version)
    if not (final / LINEAGE).is_file():
        bank, _, base = bank_from(cfg, store, last_bank_dir(rec))
        slot = bank.freeze_current()
        lineage = {
            "version": rec.version, "sleep_id": rec.sleep_id,
            "phase": "+".join(p for p in rec.phases if p in ("nrem", "rem")),
            "parent": rec.data["parent"], "base_model": base, "expert": slot, "experts_on": list(bank.on),
            "episodes": [e.episode_id for e in live_episodes(store, rec)], "trigger": rec.data["trigger"],
            "config": cfg.model_dump(mode="json"),
            "metrics": {"nrem": rec.metrics("nrem"), "rem": rec.metrics("rem")},
            "created_at": time.time(),
        }
        if rec.rebuild:
            lineage.update(rebuild=True, forgotten=rec.data["rebuild"]["forgotten"])
        write_version(bank, final, lineage)
    lineage = json.loads((final / LINEAGE).read_text())
    memory = MemoryStore(store.memory)
    ok = ("short_term", "consolidated") if rec.rebuild else ("short_term",)
    live = [e for e in lineage["episodes"] if memory.status_of(e) in ok]
    marked = memory.mark_consolidated(live, rec.version, adapter_version=rec.version,
                                      rebuild=rec.rebuild) if live else []
    return {"version": rec.version, "marked": len(marked)}


def deep_sleep(cfg, store: Storage, rec: SleepRecord) -> dict:
    """Merge every expert of this sleep's version into the base weights (L2), once."""
    out = store.base_dir(rec.version)
    if not (out / "config.json").is_file():
        bank, tok, _ = bank_from(cfg, store, store.version_dir(rec.version) / "bank")
        merged = bank.deep_sleep()
        with atomic_path(out) as tmp:
            merged.save_pretrained(str(tmp), safe_serialization=True)
            tok.save_pretrained(str(tmp))
    return {"base": str(out)}
