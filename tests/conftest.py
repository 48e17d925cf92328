"""Shared fixtures: one seed model build per machine, vLLM kept small on CPU."""
import os

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def seed_test_model() -> Path:
    """The `test` seed model folder (built on first use, cached per machine)."""
    from sleepray.seed import seed_path
    return seed_path("test", progress=False)


@pytest.fixture(scope="session")
def seed_test_report(seed_test_model) -> dict:
    return json.loads((seed_test_model / "seed_report.json").read_text())
