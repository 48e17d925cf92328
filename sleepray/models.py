"""Loading models: the built-in seed models, any local Hugging Face folder, or a hub id.

Only safetensors weights are loaded (no pickle from storage) and remote code stays
off unless the config asks for it.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from sleepray.prompt_format import attach

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(path: str, progress: bool = True) -> str:
    """'seed:test' / 'seed:small' -> the seed model's folder (shipped, else built once and cached);
    else unchanged."""
    if path.startswith("seed:"):
        from sleepray.seed import PROFILES, seed_path
        profile = path.split(":", 1)[1]
        if profile not in PROFILES:
            raise ValueError(f"unknown seed model '{path}' (choose from {['seed:' + p for p in PROFILES]})")
        return str(seed_path(profile, progress=progress))
    p = Path(path).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ValueError(f"{p} is not a Hugging Face model folder (no config.json)")
        return str(p)
    if path.count("/") > 1 or path.startswith((".", "/")):
        raise ValueError(f"model folder not found: {path}")
    return path  # a hub id; transformers resolves it (cache or network)


def pick_device(device: str = "auto") -> str:
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str | None = "auto", device: str = "auto") -> str:
    """The one place ``model.dtype`` is resolved (learner and engines call it, so they agree):
    'auto' (or None) is bfloat16 where the model runs on a GPU with bf16 support, else
    float32 (CPU); an explicit 'float32' / 'bfloat16' / 'float16' is kept."""
    if dtype is None or dtype == "auto":
        on_gpu = pick_device(device).startswith("cuda") and torch.cuda.is_available()
        return "bfloat16" if on_gpu and torch.cuda.is_bf16_supported() else "float32"
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {dtype!r}")
    return dtype


def torch_dtype(dtype: str | None = "auto", device: str = "auto") -> torch.dtype:
    """:func:`resolve_dtype` as a ``torch.dtype``."""
    return _DTYPES[resolve_dtype(dtype, device)]


def load_model(path: str, dtype: str = "auto", device: str = "auto",
               trust_remote_code: bool = False):
    """(model, tokenizer) from a resolved path or hub id, safetensors only; ``dtype`` as
    :func:`resolve_dtype` resolves it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    dtype = resolve_dtype(dtype, device)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=_DTYPES[dtype], use_safetensors=True, trust_remote_code=trust_remote_code)
    model.to(pick_device(device)).eval()
    return model, tok


def load_from_config(cfg, progress: bool = True):
    """(model, tokenizer, resolved_path) for ``cfg.model``; the tokenizer carries the prompt
    format ``cfg.model`` asks for (``sleepray.prompt_format``)."""
    path = resolve_model_path(cfg.model.path, progress=progress)
    model, tok = load_model(path, cfg.model.dtype, cfg.model.device, cfg.model.trust_remote_code)
    attach(tok, cfg.model)
    return model, tok, path
