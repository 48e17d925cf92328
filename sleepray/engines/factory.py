"""Which engine to build: vLLM where it imports, else transformers."""
from __future__ import annotations

import logging
from typing import Optional

from sleepray.config import EngineConfig
from sleepray.engines.base import DEFAULT_MAX_LORA_RANK, Engine
from sleepray.engines.hf_engine import HFEngine
from sleepray.models import resolve_model_path

log = logging.getLogger(__name__)


def vllm_available() -> bool:
    """True when ``import vllm`` works (it fails loudly e.g. with a CUDA torchvision on CPU)."""
    try:
        import vllm  # noqa: F401
    except Exception as e:  # ImportError, RuntimeError (torchvision::nms), ...
        log.info("vLLM not usable (%s: %s); falling back to transformers", type(e).__name__, e)
        return False
    return True


def make_engine(kind: Optional[str], model_path: str, cfg: Optional[EngineConfig] = None,
                max_lora_rank: int = DEFAULT_MAX_LORA_RANK, seed: int = 0,
                dtype: Optional[str] = None, device: str = "auto",
                lora_target_modules: Optional[list[str]] = None) -> Engine:
    """Build an engine. ``kind``: "auto" (vLLM when it imports, else transformers), "vllm",
    "transformers", or None (= ``cfg.kind``). ``model_path`` may be ``seed:test`` etc.
    ``max_lora_rank`` (vLLM: rounded up to a rank it supports) must cover the combined
    adapter (sum of the on-experts' ranks); ``lora_target_modules`` (vLLM) default to the
    experts' MLP projections ('auto' resolves to the model's); ``dtype`` None / 'auto' resolves
    as the learner's (:func:`sleepray.models.resolve_dtype`)."""
    cfg = cfg or EngineConfig()
    kind = kind or cfg.kind
    if kind not in ("auto", "vllm", "transformers"):
        raise ValueError(f"engine kind must be 'auto', 'vllm' or 'transformers', got {kind!r}")
    path = resolve_model_path(str(model_path))
    if kind == "auto":
        kind = "vllm" if vllm_available() else "transformers"
    if kind == "vllm":
        from sleepray.engines.vllm_engine import VLLMEngine
        return VLLMEngine(path, cfg, max_lora_rank=max_lora_rank, seed=seed, dtype=dtype,
                          lora_target_modules=lora_target_modules)
    return HFEngine(path, cfg, seed=seed, dtype=dtype or "auto", device=device)

