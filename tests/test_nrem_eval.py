"""jobs.nrem_eval's measurement on the `test` seed model with tiny settings: NREM, then REM
on the same expert, and SFT on the raw episode, each scored against the same baseline."""
import json
import subprocess
import sys

from sleepray.config import load_config
from sleepray.nrem_eval import evaluate_nrem

TINY = ["model.path=seed:test", "world.people_per_episode=1", "world.orgs_per_episode=0",
        "world.places_per_episode=0", "world.phrasings_per_fact=1", "nrem.steps=2", "nrem.batch_size=4",
        "nrem.judge=exact", "nrem.prompts_per_episode=4", "rem.dreams_per_episode=2", "rem.keep_top_k=1",
        "rem.keep_random=0", "rem.trial_steps=1", "rem.restem_steps=1", "rem.sft_steps=2",
        "rem.max_new_tokens=16", "rem.probes_per_episode=2"]


def test_nrem_eval_reports_nrem_nrem_rem_and_sft_with_drift(seed_test_model):
    out = evaluate_nrem(load_config(None, TINY), [0], progress=False)
    run = out["runs"][0]
    for stage in ("nrem", "nrem_rem", "sft_raw"):
        r = run[stage]
        assert 0.0 <= r["closed_book"] <= 1.0 and r["drift"] > -1.0 and r["drift_world"] > -1.0
        assert r["closed_book_over_in_context"] == r["closed_book"] / max(run["before"]["in_context"], 1e-9)
    assert run["nrem_rem"]["rem"]["dreams"] == 2 and run["nrem_rem"]["seconds"] >= run["nrem"]["seconds"]
    assert set(out["summary"]) == {"before", "nrem", "nrem_rem", "sft_raw"}
    off = evaluate_nrem(load_config(None, TINY + ["rem.enabled=false"]), [0], progress=False)
    assert "nrem_rem" not in off["runs"][0] and "nrem_rem" not in off["summary"]
    # the same seed gives the same NREM
    assert off["runs"][0]["nrem"]["closed_book"] == run["nrem"]["closed_book"]


def test_nrem_eval_job_writes_json(seed_test_model, tmp_path):
    out = tmp_path / "r.json"
    subprocess.run([sys.executable, "-m", "jobs.nrem_eval", "--seeds", "1", "--out", str(out),
                    *TINY, "rem.enabled=false"], check=True, capture_output=True, timeout=600)
    data = json.loads(out.read_text())
    assert data["seeds"] == [1] and data["config"]["nrem"]["steps"] == 2
