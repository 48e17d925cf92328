"""Every path under a storage folder (``cycle.storage``), and the one atomic write helper.

    memory/                  MemoryStore: episodes (Parquet segments) + ledger
    sleeps/sNNNN/            one sleep: record.json, nrem/, rem/ (banks, dreams, dream writer)
    replay/buffer.parquet    dreams kept for replay across sleeps
    adapters/vNNNN/          a published version: adapter_model.safetensors + adapter_config.json
                             (all L1 experts as ONE PEFT adapter), bank/ (each expert apart),
                             lineage.json (episodes, config, metrics, parent)
    bases/vNNNN/             a deep sleep's merged base model (ignored once a later rebuild ran)
    ray_train/               Ray Train's run folders (checkpoints of the learner)
    logs/                    run.log (the driver), coordinator.log, learner-*.log; ray/: Ray's session logs
    tensorboard/             TensorBoard event files of every sleep and of the cycle (sleepray.tb)

Nothing else spells a storage path. Whatever is written is written under a temporary
name beside its final one and renamed into place (:func:`atomic_path`): a reader sees
the old file or folder or the new one, never half of one.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Union

PathLike = Union[str, os.PathLike]
LINEAGE = "lineage.json"   # in every version folder: what it was trained on and how


# ------------------------------------------------------------------ atomic writes

def replace_dir(src: Path, dst: Path) -> None:
    """Move folder ``src`` to ``dst``, replacing an existing ``dst`` (renames, no copy)."""
    if dst.exists():
        aside = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex}"
        os.replace(dst, aside)
        os.replace(src, dst)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(src, dst)


@contextmanager
def atomic_path(final: PathLike) -> Iterator[Path]:
    """A temporary sibling of ``final`` to write (a file, or a folder you create); when the
    block ends it is fsynced (a file) and renamed onto ``final``, replacing it. On an error it
    is removed and ``final`` is left as it was."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex}")
    try:
        yield tmp
        if tmp.is_dir():
            replace_dir(tmp, final)
        else:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def write_text(path: PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


def read_lineage(version_dir: PathLike) -> dict:
    """A version folder's ``lineage.json``; {} when it is missing or unreadable."""
    try:
        return json.loads((Path(version_dir) / LINEAGE).read_text())
    except (OSError, ValueError):
        return {}


def save_peft_adapter(model, adapter: str, out: PathLike) -> Path:
    """Adapter ``adapter`` of a PEFT model as ``out/adapter_config.json`` + safetensors,
    swapped in atomically (PEFT nests a non-"default" adapter in a subfolder: moved up)."""
    with atomic_path(out) as tmp:
        model.save_pretrained(str(tmp), selected_adapters=[adapter], safe_serialization=True)
        src = tmp / adapter if adapter != "default" else tmp
        if not (src / "adapter_config.json").is_file():
            raise RuntimeError(f"unexpected PEFT layout in {tmp}: {sorted(os.listdir(tmp))}")
        if src != tmp:
            for f in src.iterdir():
                os.replace(f, tmp / f.name)
            src.rmdir()
        (tmp / "README.md").unlink(missing_ok=True)
    return Path(out)


# ------------------------------------------------------------------------ paths

class Storage:
    """The layout of one storage folder (see the module docstring)."""

    def __init__(self, root: PathLike):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"Storage({str(self.root)!r})"

    @property
    def memory(self) -> Path:
        return self.root / "memory"

    @property
    def sleeps(self) -> Path:
        return self.root / "sleeps"

    def sleep_dir(self, sleep_id: str) -> Path:
        return self.sleeps / sleep_id

    @property
    def adapters(self) -> Path:
        return self.root / "adapters"

    def version_dir(self, version: str) -> Path:
        return self.adapters / version

    @property
    def bases(self) -> Path:
        return self.root / "bases"

    def base_dir(self, version: str) -> Path:
        return self.bases / version

    @property
    def replay(self) -> Path:
        return self.root / "replay" / "buffer.parquet"

    @property
    def ray_train(self) -> Path:
        return self.root / "ray_train"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    def versions(self) -> list[Path]:
        """Published adapter versions (those with a lineage.json), oldest first."""
        d = self.adapters
        if not d.is_dir():
            return []
        return sorted(p for p in d.iterdir() if p.name.startswith("v") and (p / LINEAGE).is_file())

    def latest_version(self) -> Optional[Path]:
        v = self.versions()
        return v[-1] if v else None

    def merged_bases(self) -> list[Path]:
        """Deep-sleep merges (folders with a config.json), oldest first."""
        d = self.bases
        return sorted(p for p in d.iterdir() if (p / "config.json").is_file()) if d.is_dir() else []

    def latest_rebuild(self) -> Optional[str]:
        """The version name of the newest rebuild sleep, published or still running (``sleepray.forget``:
        it starts again from the configured base with fresh experts)."""
        newest = None
        for rec in sorted(self.sleeps.glob("s*/record.json")) if self.sleeps.is_dir() else []:
            try:
                data = json.loads(rec.read_text())
            except (OSError, ValueError):
                continue
            if data.get("rebuild"):
                newest = data.get("version")
        return newest

    def latest_base(self) -> Optional[Path]:
        """The latest deep-sleep merge: the base model of every later sleep (None: the configured one).
        Merges made before the newest rebuild are ignored (they may hold a forgotten memory)."""
        rebuilt = self.latest_rebuild()
        merged = [b for b in self.merged_bases() if rebuilt is None or b.name >= rebuilt]
        return merged[-1] if merged else None

    def starting_bank(self) -> Optional[Path]:
        """The bank a new sleep starts from: the latest version's, unless a deep sleep merged it
        into the base (its experts live in the base weights then), a rebuild is running, or the
        version has no bank (an empty rebuild)."""
        latest = self.latest_version()
        if latest is None or any(b.name >= latest.name for b in self.merged_bases()):
            return None
        rebuilt = self.latest_rebuild()
        if rebuilt is not None and rebuilt > latest.name:
            return None
        bank = latest / "bank"
        return bank if bank.is_dir() else None
