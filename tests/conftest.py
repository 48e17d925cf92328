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


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """ONE real Ray head for the whole session, on loopback, with token auth as Ray documents.

    Tests join it with ``ray_client``; the job test submits to its dashboard address.
    Logical CPUs are over-provisioned (8) so that a coordinator, rollout workers, Ray Train
    workers and Serve replicas all fit on the 2-core CI machine.
    """
    import subprocess
    import sys
    from sleepray.raycluster import ensure_token
    os.environ["RAY_AUTH_MODE"] = "token"
    ensure_token()
    port, dash = _free_port(), _free_port()
    ray_bin = str(Path(sys.executable).with_name("ray"))
    temp = tmp_path_factory.mktemp("ray")
    env = dict(os.environ)
    subprocess.run([ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=8",
                    "--disable-usage-stats", f"--temp-dir={temp}"], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    info = {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}", "env": env}
    try:
        yield info
    finally:
        import ray
        if ray.is_initialized():
            ray.shutdown()
        subprocess.run([ray_bin, "stop", "--force"], env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)


@pytest.fixture(scope="session")
def ray_client(ray_head):
    """This pytest process joined to the session's head (namespace ``sleepray-test``)."""
    import ray
    if not ray.is_initialized():
        ray.init(address=ray_head["address"], namespace="sleepray-test", log_to_driver=False)
    return ray_head
