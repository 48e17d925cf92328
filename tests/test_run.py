"""`sleepray run` end to end on the test seed model: it starts its own local Ray, runs the
cycle job there, and the numbers it prints are real."""
import os
import re
import subprocess
import sys
from pathlib import Path

from sleepray.config import load_config
from sleepray.models import load_model
from sleepray.qa import evaluate_probes
from sleepray.stream import episodes_from_config


def test_run_starts_a_local_ray_and_prints_before_and_after_a_sleep(tmp_path, seed_test_model):
    args = ["-c", "examples/quick.yaml", f"cycle.storage={tmp_path}", "world.n_episodes=1",
            "cycle.n_sleeps=1", "nrem.steps=6", "nrem.judge=exact", "rem.enabled=false",
            "ray.rollout_engine=transformers", f"model.path={seed_test_model}"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    r = subprocess.run([str(Path(sys.executable).with_name("sleepray")), "run", *args], env=env,
                       capture_output=True, text=True, timeout=900, cwd=Path(__file__).parent.parent)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "truth" in out and "after sleep" in out and "consolidated into" in out
    # the console: a progress line per step of the sleep, none of Ray's per-step reports;
    # the driver's log (its own Ray included) and the learner's are files of the run
    assert "s0001 NREM" in r.stderr and "s0001 publish" in r.stderr and "D=" in r.stderr
    assert "Reporting training result" not in r.stderr + out and "(RayTrainWorker" not in r.stderr + out
    (logs,) = tmp_path.glob("run-*/logs")
    assert "embedded local cluster" in (logs / "run.log").read_text()   # its own Ray
    assert "NREM s0001" in (logs / "learner-s0001-nrem-rank0.log").read_text()
    assert list(tmp_path.glob("run-*/tensorboard/s0001/events.out.tfevents.*"))
    printed = re.search(r"accuracy: in context ([0-9.]+), closed book ([0-9.]+), closed book after sleep", out)
    assert printed, out
    cfg = load_config(args[1], args[2:])
    ep = episodes_from_config(cfg.world)[0]
    model, tok = load_model(str(seed_test_model))
    assert float(printed.group(1)) == round(evaluate_probes(model, tok, ep.probes, ep.context).accuracy, 2)
    assert float(printed.group(2)) == round(evaluate_probes(model, tok, ep.probes, None).accuracy, 2)
    assert list(tmp_path.glob("run-*/adapters/v0001/lineage.json"))
    assert list(tmp_path.glob("run-*/cycle_results.json"))
