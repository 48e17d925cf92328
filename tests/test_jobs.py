"""`ray job submit --working-dir . -- python -m jobs.cycle ...` against the session's
`ray start --head` cluster (token auth on, as Ray documents it), waited to SUCCEEDED."""
import json
import subprocess
import sys
from pathlib import Path

from sleepray.memory import MemoryStore
from sleepray.sleep import versions

REPO = Path(__file__).resolve().parent.parent


def test_cycle_job_runs_through_ray_job_submit(ray_head, tmp_path, seed_test_model):
    ray_bin = str(Path(sys.executable).with_name("ray"))
    env = {**ray_head["env"], "RAY_AUTH_MODE": "token"}
    cmd = [ray_bin, "job", "submit", "--address", ray_head["dashboard"], "--working-dir", str(REPO),
           "--", "python", "-m", "jobs.cycle", "-c", "examples/quick.yaml", f"cycle.storage={tmp_path}",
           f"model.path={seed_test_model}", "ray.rollout_engine=transformers", "nrem.steps=4",
           "rem.enabled=false", "world.n_episodes=2", "cycle.n_sleeps=2", "--no-progress"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "succeeded" in out.lower(), out[-2000:]
    results = json.loads((tmp_path / "cycle_results.json").read_text())
    assert len(results["R"]) == 2 and len(results["R"][1]) == 2
    assert all(0.0 <= v <= 1.0 for v in results["R"][1])
    assert [v.name for v in versions(tmp_path)] == ["v0001", "v0002"]
    store = MemoryStore(tmp_path / "memory")
    assert store.pressure()["short_term_episodes"] == 0
    assert sorted(store.consolidated_by("v0001") + store.consolidated_by("v0002")) == sorted(results["episodes"])
