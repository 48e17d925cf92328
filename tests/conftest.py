"""Shared fixtures: the shipped `test` seed model, vLLM kept small on CPU."""
import os

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray reads its auth mode once, at import: the session's head uses token auth (as Ray
# documents it), so this process must be in token mode before anything imports ray
os.environ.setdefault("RAY_AUTH_MODE", "token")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def seed_test_model() -> Path:
    """The `test` seed model folder (shipped with the package; verified on first use)."""
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
    ensure_token()
    port, dash = _free_port(), _free_port()
    ray_bin = str(Path(sys.executable).with_name("ray"))
    temp = tmp_path_factory.mktemp("ray")
    env = dict(os.environ)
    # the head runs jobs' entrypoints (`python -m jobs.x`) with its own PATH: this venv's
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    # --block: the head lives as long as this process, and terminating it stops exactly
    # this cluster (``ray stop`` would stop every Ray on the machine)
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=8",
         "--disable-usage-stats", f"--temp-dir={temp}"], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    info = {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}", "env": env}
    try:
        _wait_for_dashboard(info["dashboard"], head)
        yield info
    finally:
        import ray
        import signal
        if ray.is_initialized():
            ray.shutdown()
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)


def _wait_for_dashboard(url: str, proc, timeout: float = 120.0) -> None:
    import time
    import urllib.error
    import urllib.request
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start --head exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url + "/api/version", timeout=2)
            return
        except urllib.error.HTTPError:
            return          # it answers (401 without the token): it is up
        except Exception:
            time.sleep(1)
    raise RuntimeError(f"the Ray head did not come up within {timeout}s")


@pytest.fixture(scope="session")
def ray_client(ray_head):
    """This pytest process joined to the session's head (namespace ``sleepray-test``)."""
    import ray
    if not ray.is_initialized():
        ray.init(address=ray_head["address"], namespace="sleepray-test", log_to_driver=False)
    return ray_head
