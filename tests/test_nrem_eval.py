"""jobs.nrem_eval on the `test` seed model with tiny settings: NREM on self-written prompts, then
REM, against SFT on the documents and SFT on the self-written Q/A, scored on seen- and
unseen-phrasing questions of a dev or test world."""
import json
import statistics
import subprocess
import sys

import pytest

from sleepray import general_text
from sleepray.config import load_config
from sleepray.lm import perplexity
from sleepray.models import load_model, resolve_model_path
from sleepray.nrem_eval import METHODS, evaluate_nrem, merge, world_seed
from sleepray.qa import evaluate_probes
from sleepray.splits import world_split
from sleepray.world import World

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
    before = run["before"]
    # the baseline recomputed independently: the plain seed model (no expert) on the dev world's
    # episode, closed book and reading the episode, per phrasing family
    model, tok = load_model(resolve_model_path("seed:test"))
    ep = World(run["world_seed"], 1, 0, 0, 1).episode(0)
    assert run["episode"] == ep.episode_id
    for ph in ("seen", "unseen"):
        probes = [p for p in ep.probes if p.phrasing == ph]
        assert before[f"closed_book_{ph}"] == evaluate_probes(model, tok, probes, None).accuracy
        assert before[f"in_context_{ph}"] == evaluate_probes(model, tok, probes, ep.context).accuracy
    # the seed model reads the facts from its context and can only guess without it
    # (seed report: 1.00 in context, 0.02 closed book on seen phrasings)
    assert before["in_context_seen"] >= before["closed_book_seen"] + 0.5, before
    assert before["in_context_unseen"] >= before["closed_book_unseen"], before
    assert (before["closed_book"], before["in_context"]) == (before["closed_book_seen"], before["in_context_seen"])
    for m in METHODS:
        r = run[m]
        for ph in ("seen", "unseen"):
            assert r[f"closed_over_in_context_{ph}"] == r[f"closed_book_{ph}"] / max(
                before[f"in_context_{ph}"], 1e-9)
        # drift is the perplexity ratio to the same texts before, minus one
        assert r["drift"] == pytest.approx(r["perplexity"] / before["perplexity"] - 1.0, rel=1e-12)
        assert r["drift_world"] == pytest.approx(r["perplexity_world"] / before["perplexity_world"] - 1.0,
                                                 rel=1e-12)
        # one seed: the summary is that seed's value, std 0
        for k in ("closed_book_seen", "closed_book_unseen", "drift", "drift_world"):
            assert result["summary"][m][k] == {"mean": r[k], "std": 0.0, "n": 1}, (m, k)
    # the plain seed model's perplexity on held-out general text and on other worlds' documents
    assert before["perplexity"] == pytest.approx(
        perplexity(model, tok, general_text.corpus(general_text.HELDOUT_SEED + 0, 32)), rel=1e-6)
    assert 1.0 < before["perplexity_world"] < before["perplexity"], before  # it was trained on world text
    assert result["summary"]["before"]["in_context_seen"]["mean"] == before["in_context_seen"]
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
    parts = [json.loads((tmp_path / f"r{s}.json").read_text()) for s in (1, 2)]
    # the merged file holds exactly the parts' runs, and its summary is recomputed from them
    assert data["runs"] == [parts[0]["runs"][0], parts[1]["runs"][0]]
    assert [r["world_seed"] for r in data["runs"]] == [world_seed("test", 1), world_seed("test", 2)]
    for m in ("before", "nrem", "sft_raw", "sft_self_qa"):
        for k in ("closed_book_seen", "closed_book_unseen"):
            xs = [r[m][k] for r in data["runs"]]
            assert data["summary"][m][k]["n"] == 2
            assert data["summary"][m][k]["mean"] == pytest.approx(statistics.fmean(xs), abs=1e-12)
            assert data["summary"][m][k]["std"] == pytest.approx(statistics.stdev(xs), abs=1e-12)
    for r in data["runs"]:
        assert "nrem_rem" not in r and r["before"]["in_context_seen"] >= r["before"]["closed_book_seen"] + 0.5
