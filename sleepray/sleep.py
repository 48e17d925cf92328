"""One sleep over a storage folder, in one process (the actors run the same phases).

Storage layout (``cycle.storage``):

    memory/                  MemoryStore: episodes (Parquet segments) + ledger
    adapters/v0001/          the long-term-memory artifact of sleep 1:
        adapter_model.safetensors, adapter_config.json   all L1 experts as ONE PEFT adapter
        bank/                                           the expert bank (each expert apart)
        lineage.json                                    episodes, config, metrics, parent

A version folder is written under a temporary name and renamed into place when
complete; the episodes are marked consolidated only after that. A sleep that died
after its adapter landed but before the marking is finished without retraining.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from pathlib import Path

from sleepray.memory import MemoryStore
from sleepray.models import load_model, resolve_model_path
from sleepray.prompts import consolidation_prompts

log = logging.getLogger(__name__)


def adapters_dir(storage: str | Path) -> Path:
    return Path(storage) / "adapters"


def versions(storage: str | Path) -> list[Path]:
    """Completed adapter versions, oldest first."""
    d = adapters_dir(storage)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.name.startswith("v") and (p / "lineage.json").is_file())


def latest_version(storage: str | Path) -> Path | None:
    v = versions(storage)
    return v[-1] if v else None


def _finish_pending(storage: Path, store: MemoryStore) -> None:
    """Mark episodes of landed adapter versions that a crash left unmarked."""
    for v in versions(storage):
        lin = json.loads((v / "lineage.json").read_text())
        pending = [e for e in lin["episodes"] if store.status_of(e) == "short_term"]
        if pending:
            log.info("resuming %s: marking %d episodes consolidated", v.name, len(pending))
            store.mark_consolidated(pending, lin["sleep_id"], adapter_version=v.name)


def load_bank(cfg, storage: str | Path):
    """(bank, tokenizer, base_path) for the latest version, or a fresh bank on the base model."""
    from sleepray.experts import ExpertBank
    base_path = resolve_model_path(cfg.model.path)
    model, tok = load_model(base_path, cfg.model.dtype, cfg.model.device, cfg.model.trust_remote_code)
    latest = latest_version(storage)
    bank = ExpertBank.load(model, latest / "bank") if latest else ExpertBank(model, cfg.experts)
    return bank, tok, base_path


def sleep_nrem(cfg, storage: str | Path | None = None, progress: bool = True,
               episode_ids: list[str] | None = None) -> Path | None:
    """Consolidate the short-term memory into a new expert; returns the new version folder."""
    from sleepray.nrem import run_nrem
    storage = Path(storage or cfg.cycle.storage)
    store = MemoryStore(storage / "memory")
    _finish_pending(storage, store)
    episodes = store.export_episodes("short_term")  # answers are never read here
    if episode_ids is not None:
        episodes = [e for e in episodes if e.episode_id in set(episode_ids)]
    if not episodes:
        log.info("short-term memory is empty: nothing to consolidate")
        return None
    bank, tok, base_path = load_bank(cfg, storage)
    prev = latest_version(storage)
    n = int(prev.name[1:]) + 1 if prev else 1
    name = f"v{n:04d}"
    rng = random.Random(cfg.seed.seed + n)
    writer = model_question_writer(bank, tok, cfg.nrem.temperature)
    prompts = [p for ep in episodes
               for p in consolidation_prompts(ep, cfg.nrem.prompts_per_episode, rng, writer)]
    log.info("NREM %s: %d episodes, %d prompts, expert slot %s", name, len(episodes), len(prompts),
             bank.free_slots[0] if bank.free_slots else None)
    t0 = time.time()
    slot = bank.open_new_expert()
    result = run_nrem(bank, tok, prompts, cfg.nrem, seed=cfg.seed.seed + n, progress=progress)
    bank.freeze_current()
    lineage = {
        "version": name, "sleep_id": name, "phase": "nrem", "parent": prev.name if prev else None,
        "base_model": base_path, "expert": slot, "experts_on": list(bank.on),
        "episodes": [e.episode_id for e in episodes], "config": cfg.model_dump(mode="json"),
        "metrics": {**result.final, "seconds": round(time.time() - t0, 1), "prompts": len(prompts)},
        "created_at": time.time(),
    }
    publish_version(bank, storage, name, lineage)
    store.mark_consolidated(lineage["episodes"], name, adapter_version=name)
    log.info("NREM %s done in %.0fs: %s", name, time.time() - t0, result.final)
    return adapters_dir(storage) / name


def model_question_writer(bank, tok, temperature: float = 1.0, max_new_tokens: int = 24):
    """Questions about free text, written by the frozen model with the episode in its context."""
    from sleepray.nrem import sample

    def write(context: str, k: int) -> list[str]:
        with bank.teacher_mode():
            outs = sample(bank.model, tok, [f"{context}\nQ:"] * (2 * k), max_new_tokens, temperature)
        qs = []
        for ids in outs:
            text = tok.decode(ids, skip_special_tokens=True).strip()
            if "?" in text:
                qs.append(text[: text.index("?") + 1])
        return (qs or ["What is this about?"])[:k]
    return write


def publish_version(bank, storage: Path, name: str, lineage: dict) -> Path:
    """Write adapter + bank + lineage under a temporary name, then rename into place."""
    final = adapters_dir(storage) / name
    tmp = adapters_dir(storage) / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    bank.export_combined(tmp / "adapter")
    for f in (tmp / "adapter").iterdir():
        os.replace(f, tmp / f.name)
    (tmp / "adapter").rmdir()
    bank.save(tmp / "bank", lineage=lineage)
    (tmp / "lineage.json").write_text(json.dumps(lineage, indent=2))
    os.replace(tmp, final)
    return final
