"""L1 memory: low-rank experts on the MLP blocks, as PEFT LoRA adapters.

An :class:`ExpertBank` wraps a base causal LM (L2) into a ``peft.PeftModel`` that
holds ``max_slots`` pre-allocated LoRA adapters ``expert_0 .. expert_{n-1}`` on the
MLP projections. A slot is

* **free**      -- not active (masked), freshly initialised (LoRA B = 0);
* **on**        -- active and frozen (consolidated in an earlier sleep);
* **training**  -- active and the ONLY trainable tensors of the whole model.

Several on-experts are served as ONE adapter by concatenation (PEFT's weighted
adapter "cat": an exact sum), and a deep sleep merges them into the base weights.

PEFT quirks handled here (peft 0.21):

* ``save_pretrained`` writes an adapter whose name is not ``"default"`` into a
  *subfolder* named after the adapter (``out/<name>/adapter_config.json``); the
  top-level folder only gets a README. :meth:`ExpertBank.export_combined` saves through
  :func:`sleepray.storage.save_peft_adapter`, which moves the files up so
  ``out/adapter_config.json`` is at the top level.
* ``add_weighted_adapter(..., combination_type="cat")`` folds each expert's
  scaling (``lora_alpha / r``) and weight into the A rows and sets the new adapter's
  ``r = lora_alpha = sum of ranks`` (scaling 1), so the result is the exact sum.
  With ONE adapter it silently switches to "linear" (sqrt(scaling) on A and B; exact
  up to float rounding). Adapters with ``use_rslora`` would break this (scaling
  alpha/sqrt(r)); the bank never uses rslora, and the check after export verifies.
* ``set_adapter`` / ``add_adapter`` / ``inject_adapter`` mark active adapters
  trainable, so after every PEFT call the bank re-applies its own activation and
  ``requires_grad`` state (:meth:`ExpertBank.reactivate`; code outside the bank that
  calls PEFT on ``bank.model`` calls it too).
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Union

import torch
from torch import nn

from sleepray.config import ExpertConfig
from sleepray.checksum import file_sha256
from sleepray.storage import save_peft_adapter

SLOT_PREFIX = "expert_"
BANK_FILE = "bank.json"
EXPERTS_DIR = "experts"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BANK_FORMAT = 1

__all__ = [
    "ExpertBank",
    "check_adapter_compatible",
    "mlp_projection_names",
    "resolve_target_modules",
    "slot_name",
    "target_modules_for_path",
]

AUTO_TARGETS = "auto"
# a linear layer is an MLP projection when one of its parent modules has one of these names
_MLP_PARENTS = {"mlp", "feed_forward", "ffn", "block_sparse_moe"}
_ROUTERS = {"gate", "router"}  # MoE routers sit under the MLP too; they are not projections


def mlp_projection_names(model: nn.Module) -> list[str]:
    """The names of the MLP projection linear layers in ``model`` (sorted), e.g.
    ['down_proj', 'gate_proj', 'up_proj'] (Llama, Qwen, Gemma, Mistral) or
    ['down_proj', 'gate_up_proj'] (Phi-3)."""
    names = set()
    for name, mod in model.named_modules():
        if name.endswith(".base_layer") or ".lora_" in name:
            continue
        parts = name.split(".")
        if len(parts) < 2 or not _MLP_PARENTS & set(parts[:-1]):
            continue
        target = mod.get_base_layer() if hasattr(mod, "get_base_layer") else mod
        if isinstance(target, nn.Linear) or type(target).__name__ == "Conv1D":
            names.add(parts[-1])
    return sorted(names - _ROUTERS)


def resolve_target_modules(targets: Iterable[str], model: nn.Module) -> list[str]:
    """``experts.target_modules`` for ``model``: 'auto' becomes :func:`mlp_projection_names`;
    other names are kept as given."""
    targets = list(targets)
    if AUTO_TARGETS not in targets:
        return targets
    found = mlp_projection_names(model)
    if not found:
        raise ValueError(f"experts.target_modules=auto found no MLP projection linear layers in "
                         f"{type(model).__name__}; list the module names in experts.target_modules")
    return sorted(set(found) | {t for t in targets if t != AUTO_TARGETS})


def target_modules_for_path(targets: Iterable[str], model_path: str,
                            trust_remote_code: bool = False) -> list[str]:
    """:func:`resolve_target_modules` for a model folder or hub id, without loading its
    weights (the model is built on the meta device from its config): what vLLM's
    ``lora_target_modules`` get, so that the engine and the learner's experts agree."""
    targets = list(targets)
    if AUTO_TARGETS not in targets:
        return targets
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return resolve_target_modules(targets, model)


def slot_name(i: int) -> str:
    return f"{SLOT_PREFIX}{i}"


def _alpha(value: float) -> Union[int, float]:
    """lora_alpha as int when integral (vLLM/older PEFT readers expect an int)."""
    return int(value) if float(value).is_integer() else float(value)


def _lora_config(cfg: ExpertConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.rank,
        lora_alpha=_alpha(cfg.lora_alpha),
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
        init_lora_weights=True,
        use_rslora=False,
    )


class ExpertBank:
    """Pre-allocated LoRA expert slots on a base causal LM (see module docstring).

    ``bank.model`` is the live ``PeftModel``; use it for forward passes/generation.
    """

    def __init__(self, model: nn.Module, cfg: ExpertConfig):
        from peft import PeftModel, get_peft_model

        if isinstance(model, PeftModel):
            raise TypeError("ExpertBank wants a plain base model, not a PeftModel")
        # 'auto' resolves to this model's MLP projections; the bank keeps the resolved names
        cfg = cfg.model_copy(update={"target_modules": resolve_target_modules(cfg.target_modules, model)})
        self.cfg = cfg
        self.max_slots = int(cfg.max_slots)
        self.slots: list[str] = [slot_name(i) for i in range(self.max_slots)]
        lcfg = _lora_config(cfg)
        missing = [t for t in cfg.target_modules
                   if not any(n == t or n.endswith("." + t) for n, _ in model.named_modules())]
        if missing:
            raise ValueError(f"target modules {missing} not found in the base model")
        cast = cfg.adapter_dtype == "float32"   # PEFT's default upcasts LoRA weights of bf16/fp16 models
        peft_model = get_peft_model(model, lcfg, adapter_name=self.slots[0], autocast_adapter_dtype=cast)
        for s in self.slots[1:]:
            peft_model.add_adapter(s, _lora_config(cfg), autocast_adapter_dtype=cast)
        self.model = peft_model
        if cfg.fused_lora:
            from sleepray.fused_lora import install
            install(peft_model, only_cuda=cfg.fused_lora == "auto")
        self.on: list[str] = []            # frozen on-experts, in the order they were opened
        self.training: Optional[str] = None
        self.versions: dict[str, int] = {s: 0 for s in self.slots}
        self._borrowed: set[str] = set()   # slots temporarily used by random_free_slot_context
        self._closed = False
        self.lineage: dict = {}
        self._layers: Optional[list] = None          # LoRA layers and slot tensors, found once
        self._params: dict[str, list[nn.Parameter]] = {}
        self._trainable: Optional[str] = ""          # the slot whose tensors require grad now
        self._apply()

    # ------------------------------------------------------------------ state
    @property
    def active_slots(self) -> list[str]:
        """Every switched-on expert (frozen ones first, then the training one)."""
        return self.on + ([self.training] if self.training else [])

    @property
    def free_slots(self) -> list[str]:
        used = set(self.active_slots) | self._borrowed
        return [s for s in self.slots if s not in used]

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this ExpertBank was deep-slept (its experts were merged into the base); "
                               "wrap the returned base model in a new ExpertBank")

    def _lora_layers(self) -> list[nn.Module]:
        """The model's LoRA layers, found once (a module walk over a large model takes
        milliseconds; a mode switch must not)."""
        if self._layers is None:
            from peft.tuners.lora import LoraLayer
            self._layers = [m for m in self.model.modules() if isinstance(m, LoraLayer)]
        return self._layers

    def slot_parameters(self, name: str) -> list[nn.Parameter]:
        """The LoRA A and B tensors of adapter ``name`` on ``bank.model``: an expert slot, or
        another LoRA adapter the bank does not manage (the dream writer)."""
        if name not in self._params:
            self._params[name] = [t for layer in self._lora_layers() if name in layer.lora_A
                                  for t in (layer.lora_A[name].weight, layer.lora_B[name].weight)]
        return self._params[name]

    def _switch(self, names: list[str]) -> None:
        """Exactly ``names`` switched on, by setting each cached LoRA layer's active list
        (what PEFT's ``set_adapter`` does, without its walk over every module and parameter).
        ``[]``: the base model alone. ``requires_grad`` is left as it is."""
        names = list(names)
        for layer in self._lora_layers():
            layer._active_adapter = names
        self.model.base_model.active_adapter = names

    @contextlib.contextmanager
    def _switched(self, names: list[str]) -> Iterator[None]:
        """Exactly ``names`` switched on inside (:meth:`_switch`), and on exit each layer's active
        list as it was found (also inside another switch such as :meth:`teacher_mode`)."""
        layers = self._lora_layers()
        found = [layer._active_adapter for layer in layers], self.model.base_model.active_adapter
        self._switch(names)
        try:
            yield
        finally:
            for layer, active in zip(layers, found[0]):
                layer._active_adapter = active
            self.model.base_model.active_adapter = found[1]

    def _apply(self, extra_active: Iterable[str] = ()) -> None:
        """Activate exactly the on-experts (+ extra); make only the training one trainable
        when the trainable expert changed since the last call."""
        self._switch(self.active_slots + [s for s in extra_active if s not in self.active_slots])
        if self._trainable != self.training:
            self._set_trainable()

    def _set_trainable(self) -> None:
        for p in self.model.parameters():
            p.requires_grad_(False)
        if self.training is not None:
            for p in self.slot_parameters(self.training):
                p.requires_grad_(True)
        self._trainable = self.training

    def reactivate(self) -> None:
        """Give the bank its own state back after a PEFT call that changed it (``add_adapter``,
        ``set_adapter``, loading tensors): exactly the on-experts and the training one switched
        on, and only the training one trainable."""
        self._layers, self._params = None, {}
        self._switch(self.active_slots)
        self._set_trainable()

    def _reinit_slot(self, slot: str) -> None:
        for layer in self._lora_layers():
            if slot in layer.lora_A:
                layer.reset_lora_parameters(slot, True)  # A kaiming-uniform, B = 0

    def _resolve(self, slot: Union[int, str]) -> str:
        name = slot_name(slot) if isinstance(slot, int) else str(slot)
        if name not in self.slots:
            raise KeyError(f"unknown expert slot {slot!r} (slots: {self.slots})")
        return name

    # ------------------------------------------------------------- lifecycle
    def open_new_expert(self) -> str:
        """Switch on a fresh free slot as THE trainable expert; output is unchanged (B = 0)."""
        self._check_open()
        if self.training is not None:
            raise RuntimeError(f"expert {self.training} is still training; call freeze_current() first")
        free = self.free_slots
        if not free:
            raise RuntimeError(
                f"no free expert slot: all {self.max_slots} slots are on ({self.on}); "
                "run a deep sleep (merge into the base) or reset() some experts first")
        slot = free[0]
        self._reinit_slot(slot)
        self.versions[slot] = self.versions.get(slot, 0) + 1
        self.training = slot
        self._apply()
        return slot

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The training expert's LoRA tensors (the only parameters with requires_grad)."""
        self._check_open()
        if self.training is None:
            raise RuntimeError("no expert is training; call open_new_expert() first")
        return self.slot_parameters(self.training)

    def scale_training(self, factor: float) -> None:
        """Multiply the training expert's lora_B by ``factor``: its weight delta B A scales exactly."""
        self._check_open()
        if self.training is None:
            raise RuntimeError("no expert is training")
        with torch.no_grad():
            for layer in self._lora_layers():
                if self.training in layer.lora_B:
                    layer.lora_B[self.training].weight.mul_(factor)

    def freeze_current(self) -> Optional[str]:
        """The training expert becomes a frozen on-expert; returns its name (None if none)."""
        self._check_open()
        slot = self.training
        if slot is not None:
            self.on.append(slot)
            self.training = None
            self._apply()
        return slot

    def reset(self, slots: Iterable[Union[int, str]]) -> None:
        """Zero (re-initialise, B = 0) and switch off the given experts; they become free."""
        self._check_open()
        names = [self._resolve(s) for s in slots]
        for s in names:
            self._reinit_slot(s)
            if s in self.on:
                self.on.remove(s)
            if s == self.training:
                self.training = None
        self._apply()

    def teacher_mode(self) -> contextlib.AbstractContextManager:
        """The model before expansion: the frozen on-experts only, the training expert off."""
        return self.only(self.on)

    @contextlib.contextmanager
    def only(self, names: Iterable[str]) -> Iterator[None]:
        """Exactly the LoRA adapters ``names`` switched on (slots, a borrowed random slot, the
        dream writer; none: the base model); the bank's own state back on exit. Microseconds:
        flags on the cached layers, no grad flag touched."""
        self._check_open()
        try:
            self._switch(list(dict.fromkeys(names)))
            yield
        finally:
            self._apply()

    @contextlib.contextmanager
    def random_free_slot_context(self, rng: Any = None, scale: float = 0.05) -> Iterator[str]:
        """Switch on one random free slot with small random A and B while sampling.

        ``rng``: ``random.Random``, ``numpy.random.Generator``, ``torch.Generator``, an
        int seed or None. ``scale`` ~ the relative size of the perturbation of each
        projection's output. On exit the slot's tensors, the active adapters and every
        ``requires_grad`` flag are restored exactly.
        """
        self._check_open()
        free = self.free_slots
        if not free:
            raise RuntimeError("no free expert slot for the random (REM) expert")
        idx, seed = _draw(rng, len(free))
        slot = free[idx]
        gen = torch.Generator().manual_seed(seed)
        grads = {id(p): p.requires_grad for p in self.model.parameters()}
        saved = [(p, p.detach().clone()) for p in self.slot_parameters(slot)]
        self._borrowed.add(slot)
        try:
            with torch.no_grad():
                for layer in self._lora_layers():
                    if slot not in layer.lora_A:
                        continue
                    a, b = layer.lora_A[slot].weight, layer.lora_B[slot].weight
                    r, d_in = a.shape
                    sc = float(layer.scaling[slot]) or 1.0
                    a.copy_(torch.randn(a.shape, generator=gen).to(a) / d_in ** 0.5)
                    b.copy_(torch.randn(b.shape, generator=gen).to(b) * (scale / (r ** 0.5 * sc)))
            self._apply(extra_active=[slot])
            yield slot
        finally:
            with torch.no_grad():
                for p, v in saved:
                    p.copy_(v)
            self._borrowed.discard(slot)
            self._apply()
            for p in self.model.parameters():
                p.requires_grad_(grads.get(id(p), False))

    # ------------------------------------------------------------ save/load
    def save(self, folder: Union[str, os.PathLike], lineage: Optional[dict] = None) -> Path:
        """Save every switched-on expert to ``folder/experts/expert_k/`` plus ``folder/bank.json``.

        The experts are written to a temporary folder first and swapped in;
        ``bank.json`` (with the sha256 of every adapter file) is the commit point,
        replaced atomically last.
        """
        self._check_open()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tag = uuid.uuid4().hex
        tmp = folder / f".{EXPERTS_DIR}.tmp-{tag}"
        tmp.mkdir()
        active = self.active_slots
        if active:
            self.model.save_pretrained(str(tmp), selected_adapters=active, safe_serialization=True)
        (tmp / "README.md").unlink(missing_ok=True)
        hashes = {s: file_sha256(tmp / s / ADAPTER_WEIGHTS) for s in active}
        if lineage is not None:
            self.lineage = dict(lineage)
        meta = {
            "format": BANK_FORMAT,
            "max_slots": self.max_slots,
            "slots_on": list(self.on),
            "training": self.training,
            "slot_order": list(active),
            "versions": dict(self.versions),
            "sha256": hashes,
            "lineage": dict(self.lineage if lineage is None else lineage),
            "expert_config": self.cfg.model_dump(mode="json"),
        }
        bank_tmp = folder / f".{BANK_FILE}.tmp-{tag}"
        with open(bank_tmp, "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        dest = folder / EXPERTS_DIR
        old = folder / f".{EXPERTS_DIR}.old-{tag}"
        if dest.exists():
            os.replace(dest, old)
        os.replace(tmp, dest)
        os.replace(bank_tmp, folder / BANK_FILE)
        shutil.rmtree(old, ignore_errors=True)
        return folder

    @classmethod
    def load(cls, base_model: nn.Module, folder: Union[str, os.PathLike]) -> "ExpertBank":
        """Rebuild a bank saved by :meth:`save` on ``base_model`` (safetensors only)."""
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        folder = Path(folder)
        meta = _read_bank_meta(folder)
        cfg = ExpertConfig(**meta["expert_config"])
        bank = cls(base_model, cfg)
        exp_dir = folder / EXPERTS_DIR
        for slot in meta["slot_order"]:
            d = exp_dir / slot
            check_adapter_compatible(base_model, d)
            sd = load_file(str(d / ADAPTER_WEIGHTS))
            res = set_peft_model_state_dict(bank.model, sd, adapter_name=slot)
            unexpected = [k for k in getattr(res, "unexpected_keys", []) if "lora_" in k]
            if unexpected:
                raise ValueError(f"{d}: tensors not in the model: {unexpected[:5]}")
            missing = [k for k in getattr(res, "missing_keys", []) if f".{slot}." in k]
            if missing:
                raise ValueError(f"{d}: tensors missing from the adapter: {missing[:5]}")
        bank.on = list(meta["slots_on"])
        bank.training = meta.get("training")
        bank.versions.update({k: int(v) for k, v in meta["versions"].items()})
        bank.lineage = dict(meta.get("lineage", {}))
        bank._apply()
        return bank

    # -------------------------------------------------------------- serving
    def export_combined(self, out_dir: Union[str, os.PathLike], overwrite: bool = False,
                        adapters: Optional[list[str]] = None) -> Path:
        """Write all on-experts (or the LoRA ``adapters`` named: slots, a borrowed random slot,
        the dream writer) as ONE plain PEFT adapter (rank = sum of ranks) to ``out_dir``.

        ``out_dir/adapter_config.json`` + ``out_dir/adapter_model.safetensors`` load with
        ``PeftModel.from_pretrained`` and vLLM's ``LoRARequest``.
        """
        self._check_open()
        adapters = self.active_slots if adapters is None else list(adapters)
        if not adapters:
            raise ValueError("no expert is switched on: nothing to export")
        out_dir = Path(out_dir)
        if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
            raise FileExistsError(f"{out_dir} exists and is not empty")
        name = "combined"
        while name in self.model.peft_config:
            name = f"combined_{uuid.uuid4().hex[:8]}"
        try:
            self.model.add_weighted_adapter(
                adapters, weights=[1.0] * len(adapters), adapter_name=name, combination_type="cat")
            cfg = self.model.peft_config[name]
            cfg.target_modules = sorted(cfg.target_modules) if isinstance(cfg.target_modules, set) \
                else cfg.target_modules
            save_peft_adapter(self.model, name, out_dir)
        finally:
            if name in self.model.peft_config:
                self.model.delete_adapter(name)
            self.reactivate()   # PEFT's add/delete touched the active lists and grad flags
        return out_dir

    def deep_sleep(self) -> nn.Module:
        """Merge all on-experts into the base weights (L2) and return the plain base model.

        Every slot becomes free and this bank is closed (wrap the returned model in a
        new ExpertBank). Save it with ``save_pretrained(..., safe_serialization=True)``.
        """
        self._check_open()
        adapters = self.active_slots
        if adapters:
            base = self.model.merge_and_unload(safe_merge=True, adapter_names=adapters)
        else:
            base = self.model.unload()
        for p in base.parameters():
            p.requires_grad_(True)
        self.on, self.training = [], None
        self._borrowed.clear()
        self._closed = True
        self.model = None
        return base


def _draw(rng: Any, n: int) -> tuple[int, int]:
    """(index in [0, n), torch seed) from any of the usual RNG kinds."""
    if rng is None or isinstance(rng, int):
        rng = random.Random(rng)
    if isinstance(rng, random.Random):
        return rng.randrange(n), rng.randrange(2**63)
    if isinstance(rng, torch.Generator):
        return (int(torch.randint(n, (1,), generator=rng)),
                int(torch.randint(2**62, (1,), generator=rng)))
    if hasattr(rng, "integers"):  # numpy Generator
        return int(rng.integers(n)), int(rng.integers(2**62))
    if hasattr(rng, "randint"):  # numpy RandomState
        return int(rng.randint(n)), int(rng.randint(2**31 - 1))
    raise TypeError(f"unsupported rng {type(rng).__name__}")


def _read_bank_meta(folder: Path) -> dict:
    """Read bank.json, verifying the adapter hashes (recovering an interrupted save)."""
    exp_dir = folder / EXPERTS_DIR
    if not exp_dir.exists():
        olds = sorted(folder.glob(f".{EXPERTS_DIR}.old-*"))
        if len(olds) == 1:  # crash between moving the old experts aside and moving the new in
            os.replace(olds[0], exp_dir)
    candidates = [folder / BANK_FILE] + sorted(folder.glob(f".{BANK_FILE}.tmp-*"))
    errors = []
    for path in candidates:
        if not path.is_file():
            continue
        try:
            meta = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            errors.append(f"{path.name}: {e}")
            continue
        bad = [s for s, h in meta.get("sha256", {}).items()
               if not (exp_dir / s / ADAPTER_WEIGHTS).is_file() or file_sha256(exp_dir / s / ADAPTER_WEIGHTS) != h]
        if not bad:
            if path.name != BANK_FILE:  # crash after the experts swap, before bank.json: finish it
                os.replace(path, folder / BANK_FILE)
            if meta.get("format") != BANK_FORMAT:
                raise ValueError(f"{folder}: unsupported bank format {meta.get('format')}")
            return meta
        errors.append(f"{path.name}: adapter files do not match for {bad}")
    if not errors:
        raise FileNotFoundError(f"no {BANK_FILE} in {folder}")
    raise ValueError(f"{folder}: inconsistent expert bank: " + "; ".join(errors))


# ---------------------------------------------------------------- checking
def _adapter_key_to_module(key: str) -> tuple[str, str]:
    """'base_model.model.X.lora_A.weight' -> ('X', 'lora_A')."""
    k = key
    for pre in ("base_model.model.", "base_model."):
        if k.startswith(pre):
            k = k[len(pre):]
            break
    for part in ("lora_A", "lora_B"):
        marker = f".{part}."
        if marker in k:
            mod = k.split(marker)[0]
            return mod, part
    raise ValueError(f"unsupported tensor {key!r} in adapter (only plain LoRA A/B weights are supported)")


def _base_linears(base_model: nn.Module) -> dict[str, tuple[int, int]]:
    """module path (relative to the causal LM) -> (in_features, out_features) of linear layers."""
    try:
        from peft import PeftModel
        if isinstance(base_model, PeftModel):
            base_model = base_model.get_base_model()
    except ImportError:  # pragma: no cover
        pass
    out = {}
    for name, mod in base_model.named_modules():
        if name.endswith(".base_layer") or ".lora_" in name:
            continue
        target = mod.get_base_layer() if hasattr(mod, "get_base_layer") else mod
        w = getattr(target, "weight", None)
        if isinstance(target, nn.Linear) or (w is not None and w.dim() == 2 and hasattr(target, "in_features")):
            out[name] = (int(target.in_features), int(target.out_features))
    return out


def check_adapter_compatible(base_model: nn.Module, adapter_folder: Union[str, os.PathLike]) -> dict:
    """Check a PEFT LoRA folder against ``base_model`` without loading any tensor.

    Reads adapter_config.json and the safetensors header only; raises ValueError
    naming the module and shapes when a target module is missing or a LoRA shape
    does not fit the base's in/out features. Returns a small summary dict.
    """
    from safetensors import safe_open

    folder = Path(adapter_folder)
    cfg_path = folder / ADAPTER_CONFIG
    weights = folder / ADAPTER_WEIGHTS
    if not cfg_path.is_file():
        raise ValueError(f"{folder}: no {ADAPTER_CONFIG}")
    if not weights.is_file():
        extra = " (only safetensors are loaded, never .bin)" if (folder / "adapter_model.bin").exists() else ""
        raise ValueError(f"{folder}: no {ADAPTER_WEIGHTS}{extra}")
    acfg = json.loads(cfg_path.read_text())
    if str(acfg.get("peft_type", "LORA")).upper() != "LORA":
        raise ValueError(f"{folder}: not a LoRA adapter (peft_type={acfg.get('peft_type')})")
    r_default = int(acfg["r"])
    rank_pattern = acfg.get("rank_pattern") or {}
    linears = _base_linears(base_model)

    targets = acfg.get("target_modules")
    if isinstance(targets, (list, tuple)):
        absent = [t for t in targets if not any(n == t or n.endswith("." + t) for n in linears)]
        if absent:
            raise ValueError(f"{folder}: target modules {absent} are missing in the base model")

    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            mod, part = _adapter_key_to_module(key)
            shapes.setdefault(mod, {})[part] = tuple(f.get_slice(key).get_shape())
    if not shapes:
        raise ValueError(f"{folder}: adapter has no LoRA tensors")
    for mod, parts in sorted(shapes.items()):
        if mod not in linears:
            raise ValueError(f"{folder}: module {mod!r} of the adapter is missing in the base model")
        if set(parts) != {"lora_A", "lora_B"}:
            raise ValueError(f"{folder}: module {mod!r} has only {sorted(parts)}")
        d_in, d_out = linears[mod]
        a, b = parts["lora_A"], parts["lora_B"]
        r = next((int(v) for k, v in rank_pattern.items() if mod == k or mod.endswith("." + k)), r_default)
        if len(a) != 2 or len(b) != 2 or a[1] != d_in or b[0] != d_out or a[0] != b[1]:
            raise ValueError(
                f"{folder}: LoRA shapes of module {mod!r} do not match the base: lora_A {list(a)}, "
                f"lora_B {list(b)}, but the base layer has in_features={d_in}, out_features={d_out} "
                f"(expected lora_A [r, {d_in}], lora_B [{d_out}, r])")
        if a[0] != r:
            raise ValueError(f"{folder}: module {mod!r} has rank {a[0]} but adapter_config says r={r}")
    return {"r": r_default, "lora_alpha": acfg.get("lora_alpha"), "modules": len(shapes)}
