"""`sleepray eval --merge`: evaluations run apart (other seeds, other methods) become one."""
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from sleepray.eval_merge import merge_results

QUICK = Path(__file__).resolve().parents[1] / "examples" / "eval_quick.yaml"


def _eval(out, *overrides):
    assert main(["eval", "-c", str(QUICK), "--out", str(out), "--no-progress", "eval.seeds=1",
                 "eval.in_context=false", *overrides]) == 0
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def parts(tmp_path_factory, seed_test_model):
    root = tmp_path_factory.mktemp("merge")
    a = _eval(root / "a", "eval.methods=[no_sleep]", "eval.first_seed=0")
    b = _eval(root / "b", "eval.methods=[no_sleep]", "eval.first_seed=1")
    c = _eval(root / "c", "eval.methods=[in_context]", "eval.first_seed=0")
    return root, a, b, c


def test_merge_combines_runs_summary_answers_and_report(parts):
    root, a, b, c = parts
    assert main(["eval", "--merge", str(root / "a"), str(root / "b"), str(root / "c"),
                 "--out", str(root / "m")]) == 0
    m = json.loads((root / "m" / "results.json").read_text())
    assert m["methods"] == ["no_sleep", "in_context"] and m["seeds"] == [0, 1]
    assert sorted((r["method"], r["seed"]) for r in m["runs"]) == [("in_context", 0), ("no_sleep", 0),
                                                                    ("no_sleep", 1)]
    acc = [r["metrics"]["ACC"] for r in m["runs"] if r["method"] == "no_sleep"]
    assert m["summary"]["no_sleep"]["ACC"]["mean"] == pytest.approx(sum(acc) / 2)
    rows = pq.read_table(root / "m" / "answers.parquet").num_rows
    assert rows == sum(pq.read_table(root / d / "answers.parquet").num_rows for d in "abc")
    assert (root / "m" / "report.md").is_file() and list((root / "m" / "plots").glob("*.png"))
    # the per-phrasing fields travel with their runs; the summary is recomputed over the parts
    assert all(set(r["R_by_phrasing"]) == {"seen", "unseen"} for r in m["runs"])
    unseen = [r["metrics"]["ACC_unseen"] for r in m["runs"] if r["method"] == "no_sleep"]
    assert m["summary"]["no_sleep"]["ACC_unseen"]["mean"] == pytest.approx(sum(unseen) / 2)
    assert m["summary"]["no_sleep"]["ACC_unseen"]["n"] == 2
    assert m["n_probes_by_phrasing"] == a["n_probes_by_phrasing"] and m["phrasings"] == ["seen", "unseen"]
    assert m["baseline"]["closed_book_by_phrasing"] == a["baseline"]["closed_book_by_phrasing"]
    # each part's provenance is kept; the merge has its own
    assert m["provenance_parts"] == [a["provenance"], b["provenance"], c["provenance"]]
    assert m["provenance"]["seeds"] == [0, 1] and m["provenance"]["world_seeds"] == a["provenance"]["world_seeds"]
    assert "ACC unseen" in (root / "m" / "report.md").read_text()


def test_merge_refuses_overlaps_and_other_settings(parts):
    _, a, b, _ = parts
    with pytest.raises(ValueError, match="more than one part"):
        merge_results([a, a])
    other = json.loads(json.dumps(b))
    other["config"]["nrem"]["lr"] = 0.5
    with pytest.raises(ValueError, match="other settings"):
        merge_results([a, other])
    other = json.loads(json.dumps(b))
    other["episodes"] = other["episodes"][::-1]
    with pytest.raises(ValueError, match="episodes"):
        merge_results([a, other])
    other = json.loads(json.dumps(b))
    other["n_probes_by_phrasing"]["unseen"][0] += 1
    with pytest.raises(ValueError, match="n_probes_by_phrasing"):
        merge_results([a, other])
    other = json.loads(json.dumps(b))
    other["schema_version"] = 1
    with pytest.raises(ValueError, match="schema_version"):
        merge_results([a, other])
    with pytest.raises(ValueError, match="at least two"):
        merge_results([a])
