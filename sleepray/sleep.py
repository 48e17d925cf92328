"""One sleep over a storage folder, in one process (the actors run the same phases).

Storage layout (``cycle.storage``):

    memory/                  MemoryStore: episodes (Parquet segments) + ledger
    sleeps/sNNNN/            one sleep: record.json (phase record), nrem/, rem/ (banks, dreams)
    replay/buffer.parquet    dreams kept for replay across sleeps
    bases/vNNNN/             a deep sleep's merged base model
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
import shutil
from pathlib import Path

from sleepray.cycle import run_sleep

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


def load_bank(cfg, storage: str | Path):
    """(bank, tokenizer, base_path) for the latest version, or a fresh bank on the base model."""
    from sleepray.sleep_phases import bank_from, starting_bank_dir
    storage = Path(storage)
    return bank_from(cfg, storage, starting_bank_dir(cfg, storage))


def sleep_nrem(cfg, storage: str | Path | None = None, progress: bool = True) -> Path | None:
    """One NREM-only sleep (``sleepray sleep --phase nrem``); returns the new version folder."""
    return _version_of(run_sleep(cfg, storage, only=["nrem"], progress=progress), cfg, storage)


def sleep_full(cfg, storage: str | Path | None = None, progress: bool = True, trigger: str = "request",
               backend=None) -> Path | None:
    """One whole sleep (NREM, REM if enabled, publish, deep every K); the new version folder."""
    return _version_of(run_sleep(cfg, storage, backend=backend, trigger=trigger, progress=progress),
                       cfg, storage)


def _version_of(rec, cfg, storage) -> Path | None:
    if rec is None:
        return None
    v = adapters_dir(storage or cfg.cycle.storage) / rec.version
    return v if v.is_dir() else None


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
