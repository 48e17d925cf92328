"""Which model and expert bank a step of a sleep (or an evaluation) starts from."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from sleepray.experts import ExpertBank
from sleepray import models
from sleepray.prompt_format import attach
from sleepray.sleep_record import SleepRecord
from sleepray.storage import PathLike, Storage


def current_base(cfg, store: Storage) -> str:
    """The base model: the latest deep-sleep merge of ``store``, else ``cfg.model``."""
    merged = store.latest_base()
    return str(merged) if merged else models.resolve_model_path(cfg.model.path)


def bank_from(cfg, store: Storage, folder: Optional[Path]):
    """(bank, tokenizer, base path): the bank saved in ``folder`` (None: fresh) on the current base."""
    base = current_base(cfg, store)
    model, tok = models.load_model(base, cfg.model.dtype, cfg.model.device, cfg.model.trust_remote_code)
    attach(tok, cfg.model)
    bank = ExpertBank.load(model, folder) if folder else ExpertBank(model, cfg.experts)
    return bank, tok, base


def load_bank(cfg, storage: PathLike):
    """(bank, tokenizer, base path) of the latest version, or a fresh bank on the base model."""
    store = Storage(storage)
    return bank_from(cfg, store, store.starting_bank())


def last_bank_dir(rec: SleepRecord) -> Path:
    """The bank a sleep ends with: REM's when REM finished, else NREM's."""
    rem = rec.dir / "rem" / "bank"
    return rem if rec.is_done("rem") and (rem / "bank.json").is_file() else rec.dir / "nrem" / "bank"
