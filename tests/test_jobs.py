"""`ray job submit --working-dir . -- python -m jobs.cycle ...` against the session's
`ray start --head` cluster (token auth on, as Ray documents it), waited to SUCCEEDED."""
import json
import subprocess
import sys
from pathlib import Path

from peft import PeftModel

from sleepray.config import load_config
from sleepray.memory import MemoryStore
from sleepray.models import load_model
from sleepray.qa import evaluate_probes
from sleepray.world import World

REPO = Path(__file__).resolve().parent.parent


def versions(storage: Path) -> list[Path]:
    """The published adapter versions, read from the folder (``adapters/vNNNN``)."""
    return sorted(p for p in (storage / "adapters").iterdir() if p.is_dir() and p.name[0] == "v"
                  and p.name[1:].isdigit())


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
    assert [v.name for v in versions(tmp_path)] == ["v0001", "v0002"]
    # the accuracy matrix, recomputed independently from what the job wrote: row i is the closed
    # book of the adapter published by sleep i (loaded as a plain PEFT adapter on the seed model)
    # on the episodes seen so far; an episode not yet seen has no entry
    cfg = load_config(REPO / "examples" / "quick.yaml", ["world.n_episodes=2"])
    episodes = World.from_config(cfg.world).episodes(2)
    assert results["episodes"] == [e.episode_id for e in episodes]
    assert results["parts"] == [[episodes[0].episode_id], [episodes[1].episode_id]]
    assert results["R"][0][1] is None
    base, tok = load_model(str(seed_test_model))
    for e in episodes:   # before any sleep: the seed model reads the facts, closed book it guesses
        cb = evaluate_probes(base, tok, e.probes, None).accuracy
        ic = evaluate_probes(base, tok, e.probes, e.context).accuracy
        assert results["before"]["closed_book"][e.episode_id] == cb
        assert results["before"]["in_context"][e.episode_id] == ic and ic >= cb + 0.5
    for i, v in enumerate(versions(tmp_path)):
        model = PeftModel.from_pretrained(load_model(str(seed_test_model))[0], str(v)).eval()
        expected = [evaluate_probes(model, tok, e.probes, None).accuracy if j <= i else None
                    for j, e in enumerate(episodes)]
        assert results["R"][i] == expected, (v.name, results["R"][i], expected)
    store = MemoryStore(tmp_path / "memory")
    assert store.pressure()["short_term_episodes"] == 0
    assert sorted(store.consolidated_by("v0001") + store.consolidated_by("v0002")) == sorted(results["episodes"])
