"""jobs.nrem_eval on the `test` seed model with tiny settings: NREM on self-written prompts, then
REM, against SFT on the documents and SFT on the self-written Q/A, scored on seen- and
unseen-phrasing questions of a dev or test world."""
import json
import subprocess
import sys

import pytest

from sleepray.config import load_config
from sleepray.nrem_eval import METHODS, evaluate_nrem, merge, world_seed
from sleepray.splits import world_split

TINY = ["model.path=seed:test", "world.people_per_episode=1", "world.orgs_per_episode=0",
        "world.places_per_episode=0", "world.phrasings_per_fact=1", "nrem.steps=2", "nrem.batch_size=4",
        "nrem.judge=exact", "nrem.prompts_per_episode=8", "rem.dreams_per_episode=2", "rem.keep_top_k=1",
        "rem.keep_random=0", "rem.trial_steps=1", "rem.restem_steps=1", "rem.sft_steps=2",
        "rem.max_new_tokens=16", "rem.probes_per_episode=2"]


@pytest.fixture(scope="module")
def result(seed_test_model):
    return evaluate_nrem(load_config(None, TINY), [0], "dev", progress=False)


def test_every_method_is_scored_on_both_phrasings_against_the_same_baseline(result):
    run = result["runs"][0]
    assert run["world_seed"] == world_seed("dev", 0) and world_split(run["world_seed"]) == "dev"
    assert run["n_probes"] == {"seen": 12, "unseen": 12}
    assert run["self_written_questions"] >= 1 and run["self_qa_pairs"] >= 1  # the model wrote its own data
    for m in METHODS:
        r = run[m]
        for ph in ("seen", "unseen"):
            assert r[f"closed_over_in_context_{ph}"] == r[f"closed_book_{ph}"] / max(
                run["before"][f"in_context_{ph}"], 1e-9)
        assert r["drift"] > -1.0 and r["drift_world"] > -1.0
    assert run["nrem_rem"]["rem"]["dreams"] == 2 and run["nrem_rem"]["seconds"] >= run["nrem"]["seconds"]
    assert set(result["summary"]) == {"before", *METHODS}
    prov = result["provenance"]
    assert prov["world_seeds"] == [world_seed("dev", 0)] and prov["world_split"] == ["dev"] and prov["command"]


def test_same_seed_same_nrem_and_merge_of_seeds(result, tmp_path):
    off = evaluate_nrem(load_config(None, TINY + ["rem.enabled=false"]), [0], "dev", progress=False)
    assert "nrem_rem" not in off["runs"][0] and "nrem_rem" not in off["summary"]
    assert off["runs"][0]["nrem"] == {**result["runs"][0]["nrem"], "seconds": off["runs"][0]["nrem"]["seconds"]}
    with pytest.raises(ValueError, match="config"):
        merge([result, off])
    with pytest.raises(ValueError, match="seed is in two parts"):
        merge([result, result])


def test_nrem_eval_job_writes_json_on_test_worlds_and_merges(seed_test_model, tmp_path):
    for s in (1, 2):
        subprocess.run([sys.executable, "-m", "jobs.nrem_eval", "--seeds", str(s), "--split", "test",
                        "--out", str(tmp_path / f"r{s}.json"), *TINY, "rem.enabled=false"],
                       check=True, capture_output=True, timeout=600)
    subprocess.run([sys.executable, "-m", "jobs.nrem_eval", "--merge", str(tmp_path / "r1.json"),
                    str(tmp_path / "r2.json"), "--out", str(tmp_path / "all.json")], check=True,
                   capture_output=True, timeout=120)
    data = json.loads((tmp_path / "all.json").read_text())
    assert data["seeds"] == [1, 2] and data["split"] == "test" and data["config"]["nrem"]["steps"] == 2
    assert data["provenance"]["world_seeds"] == [world_seed("test", 1), world_seed("test", 2)]
    assert [p["command"].split("--seeds ")[1][0] for p in data["provenance_parts"]] == ["1", "2"]
    assert data["summary"]["nrem"]["closed_book_seen"]["n"] == 2
