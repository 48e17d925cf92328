"""Generation engines: one interface (:class:`Engine`), vLLM and transformers implementations."""
from sleepray.engines.base import (  # noqa: F401
    DEFAULT_MAX_LORA_RANK, Engine, GenDelta, GenRequest, GenResult, ScoreRequest, ScoreResult)
from sleepray.engines.factory import make_engine, vllm_available  # noqa: F401
