"""The dream writer and its ReST-EM update (REM, DESIGN.md section 1).

The dream writer is a separate PEFT LoRA adapter named ``"dream_writer"`` added to
``bank.model`` next to the expert slots. It is not one of the bank's slots, so
``ExpertBank`` never switches it on, never trains it, and never saves, exports or
merges it (``save``/``export_combined``/``deep_sleep`` only name expert slots;
``deep_sleep`` unloads it with the rest). It is saved on its own
(:meth:`DreamWriter.save`, PEFT safetensors) and re-attached to a new bank with
:meth:`DreamWriter.load`.

:func:`restem_update` is ReST-EM's M-step: SFT of the writer on the (prompt -> dream)
pairs whose trials were rewarded, so that dreams get better across sleeps.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from sleepray import lm
from sleepray.replay import Dream
from sleepray.storage import atomic_path, save_peft_adapter

__all__ = ["WRITER_ADAPTER", "DreamWriter", "only_adapters", "restem_update"]

WRITER_ADAPTER = "dream_writer"
WRITER_META = "writer.json"


@contextlib.contextmanager
def only_adapters(bank, names: Sequence[str]):
    """Exactly ``names`` switched on (``ExpertBank.only``: ``teacher_mode`` would leave the random
    expert and the dream writer off); the bank's state, grad flags set inside included, comes
    back on exit."""
    grads = {id(p): p.requires_grad for p in bank.model.parameters()}
    try:
        with bank.only(names):
            yield
    finally:
        for p in bank.model.parameters():
            p.requires_grad_(grads.get(id(p), False))


class DreamWriter:
    """The dream writer: a LoRA adapter ``name`` on ``bank.model``, outside the expert slots.

    It is switched on only while dreams are written and while ReST-EM trains it; the bank
    never activates, trains, saves, exports or merges it (see the module docstring).
    """

    def __init__(self, bank, tok, rank: Optional[int] = None, name: str = WRITER_ADAPTER,
                 _lora_config=None):
        from sleepray.experts import _lora_config as expert_lora_config
        if name in bank.slots:
            raise ValueError(f"{name!r} is an expert slot name")
        if name in bank.model.peft_config:
            raise ValueError(f"bank.model already has an adapter named {name!r}")
        lcfg = _lora_config or expert_lora_config(
            bank.cfg.model_copy(update={"rank": int(rank or bank.cfg.rank)}))
        bank.model.add_adapter(name, lcfg)
        bank.reactivate()  # PEFT marks new adapters trainable: give the bank its own state back
        self.bank, self.tok, self.name = bank, tok, name
        self.updates = 0

    @classmethod
    def from_config(cls, bank, tok, rcfg) -> "DreamWriter":
        return cls(bank, tok, rank=rcfg.writer_rank)

    def parameters(self) -> list[torch.nn.Parameter]:
        return self.bank.slot_parameters(self.name)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.bank.model.named_parameters() if f".{self.name}." in n}

    def save(self, folder: Union[str, os.PathLike]) -> Path:
        """PEFT adapter (safetensors + adapter_config.json) and writer.json in ``folder``, swapped in atomically."""
        with atomic_path(folder) as tmp:
            save_peft_adapter(self.bank.model, self.name, tmp)
            (tmp / WRITER_META).write_text(json.dumps({"name": self.name, "updates": self.updates}, indent=2))
        return Path(folder)

    @classmethod
    def load(cls, bank, tok, folder: Union[str, os.PathLike]) -> "DreamWriter":
        """Attach a writer saved by :meth:`save` to ``bank`` (safetensors only)."""
        from peft import LoraConfig
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        from sleepray.experts import ADAPTER_WEIGHTS, check_adapter_compatible
        folder = Path(folder)
        check_adapter_compatible(bank.model, folder)
        meta = json.loads((folder / WRITER_META).read_text()) if (folder / WRITER_META).is_file() else {}
        writer = cls(bank, tok, name=meta.get("name", WRITER_ADAPTER),
                     _lora_config=LoraConfig.from_pretrained(str(folder)))
        res = set_peft_model_state_dict(bank.model, load_file(str(folder / ADAPTER_WEIGHTS)),
                                        adapter_name=writer.name)
        unexpected = [k for k in getattr(res, "unexpected_keys", []) if "lora_" in k]
        if unexpected:
            raise ValueError(f"{folder}: tensors not in the model: {unexpected[:5]}")
        bank.reactivate()
        writer.updates = int(meta.get("updates", 0))
        return writer


def restem_update(writer: DreamWriter, rewarded: list[Dream], rcfg, seed: int = 0) -> list[float]:
    """ReST-EM M-step: SFT of the writer on (prompt -> dream) for the rewarded dreams (the E-step filter).

    The writer trains on top of the frozen model (on-experts), as it samples; nothing
    else trains. Returns the per-step losses ([] when there is nothing to do).
    """
    rewarded = [d for d in rewarded if d.text.strip()]
    if not rewarded or rcfg.restem_steps <= 0:
        return []
    bank = writer.bank
    params = writer.parameters()
    with only_adapters(bank, list(bank.on) + [writer.name]):
        for p in params:
            p.requires_grad_(True)
        bank.model.eval()
        losses = lm.sft(params, bank.model, writer.tok, [d.prompt + d.text for d in rewarded],
                        rcfg.restem_steps, rcfg.restem_lr, batch_size=min(rcfg.batch_size, len(rewarded)),
                        seed=seed, prompts=[d.prompt for d in rewarded])
        for p in params:
            p.grad = None
    writer.updates += 1
    return losses
