"""The evaluation end to end: the quick profile, one seed, three methods (incl. sleep), through
the CLI; files, schema, plots, and every number recomputed from the answers it wrote."""
import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from sleepray import eval_metrics as M
from jobs.cli import main
from sleepray.config import ConfigError, load_config
from sleepray.eval_run import ANSWER_COLUMNS, RUN_METRICS, run_eval

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "examples" / "eval_quick.yaml"
METHODS = ["no_sleep", "sft", "sleep"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory, seed_test_model):
    out = tmp_path_factory.mktemp("eval") / "out"
    assert main(["eval", "-c", str(QUICK), "--out", str(out), "--no-progress", "eval.seeds=1",
                 f"eval.methods=[{','.join(METHODS)}]"]) == 0
    return out, json.loads((out / "results.json").read_text()), pq.read_table(out / "answers.parquet").to_pylist()


def test_files_and_schema(quick):
    out, res, rows = quick
    for name in ["results.json", "answers.parquet", "report.md", "plots/accuracy_over_time.png",
                 "plots/methods.png"] + [f"plots/R_{m}.png" for m in METHODS]:
        f = out / name
        assert f.is_file() and f.stat().st_size > 0, name
        if f.suffix == ".png":
            assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cfg = load_config(QUICK)
    E, T = cfg.world.n_episodes, cfg.cycle.n_sleeps
    assert res["schema_version"] == 2 and res["profile"] == "quick" and res["methods"] == METHODS
    prov = res["provenance"]
    assert prov["seeds"] == [0] and prov["world_seeds"] == [cfg.world.seed] and "revision" in prov
    assert res["phrasings"] == ["seen", "unseen"]
    assert sum(sum(v) for v in res["n_probes_by_phrasing"].values()) == sum(res["n_probes"])
    assert res["seeds"] == [0] and len(res["episodes"]) == E and len(res["parts"]) == T
    assert res["config"]["model"]["path"] == "seed:test"
    assert len(res["runs"]) == len(METHODS)
    for run in res["runs"]:
        assert len(run["R"]) == T and all(len(r) == E for r in run["R"])
        assert len(run["R_in_context"]) == T and len(run["drift"]) == T == len(run["sleep_seconds"])
        for key in ("R_by_phrasing", "R_in_context_by_phrasing"):
            assert set(run[key]) == {"seen", "unseen"}
            assert all(len(R) == T and all(len(r) == E for r in R) for R in run[key].values())
        assert set(RUN_METRICS) <= set(run["metrics"]) and run["config"]["seed"]["seed"] == run["seed"]
        assert run["seconds"] >= sum(run["sleep_seconds"]) > (0 if run["method"] != "no_sleep" else -1)
    assert pq.read_schema(out / "answers.parquet").names == ANSWER_COLUMNS
    assert not (out / "runs").exists()  # run storages are removed unless eval.keep_runs


def _flat(M_):
    return [v for row in M_ for v in row]


def _em(rows, method, seed, after, episode, mode="closed_book", phrasing=None):
    xs = [r["em"] for r in rows if (r["method"], r["seed"], r["after_sleep"], r["episode"], r["mode"])
          == (method, seed, after, episode, mode) and phrasing in (None, r["phrasing"])]
    assert xs
    return sum(xs) / len(xs)


def test_numbers_are_consistent_with_the_answers(quick):
    _, res, rows = quick
    eps, p = res["episodes"], res["part_of"]
    b = [_em(rows, "base", None, 0, e) for e in eps]
    assert res["baseline"]["closed_book"] == pytest.approx(b)
    n_q = sum(res["n_probes"])
    for run in res["runs"]:
        m, s = run["method"], run["seed"]
        R = [[_em(rows, m, s, i + 1, e) for e in eps] for i in range(len(res["parts"]))]
        assert _flat(run["R"]) == pytest.approx(_flat(R))
        assert _flat(run["R_in_context"]) == pytest.approx(
            _flat([[_em(rows, m, s, i + 1, e, "in_context") for e in eps] for i in range(len(R))]))
        want = M.metrics(R, p, b)
        for k in ("ACC", "BWT", "FWT", "LA", "forgetting"):
            assert run["metrics"][k] == pytest.approx(want[k]), (m, k)
        for ph in ("seen", "unseen"):  # every episode has both phrasings here
            R_ph = [[_em(rows, m, s, i + 1, e, phrasing=ph) for e in eps] for i in range(len(R))]
            assert _flat(run["R_by_phrasing"][ph]) == pytest.approx(_flat(R_ph))
            assert run["metrics"][f"ACC_{ph}"] == pytest.approx(M.acc(R_ph))
            assert run["metrics"][f"LA_{ph}"] == pytest.approx(M.learning_accuracy(R_ph, p))
            assert run["metrics"][f"BWT_{ph}"] == pytest.approx(M.bwt(R_ph, p))
            R_ic = [[_em(rows, m, s, i + 1, e, "in_context", ph) for e in eps] for i in range(len(R))]
            assert run["metrics"][f"ACC_in_context_{ph}"] == pytest.approx(M.acc(R_ic))
            assert res["summary"][m][f"ACC_{ph}"]["n"] == 1
        # the questions of both families weigh alike: R is their mean when the counts are equal
        assert _flat(run["R"]) == pytest.approx([(x + y) / 2 for x, y in zip(
            _flat(run["R_by_phrasing"]["seen"]), _flat(run["R_by_phrasing"]["unseen"]))])
        assert run["metrics"]["drift"] == pytest.approx(run["perplexity"][-1] / res["baseline"]["perplexity"] - 1)
        assert res["summary"][m]["ACC"] == {"mean": pytest.approx(want["ACC"]), "std": 0.0, "n": 1}
        # every question, after every sleep, in both modes
        assert len([r for r in rows if r["method"] == m]) == 2 * n_q * len(R)
        assert all(r["em"] in (0.0, 1.0) and 0.0 <= r["f1"] <= 1.0 and r["em"] <= r["f1"]
                   for r in rows if r["method"] == m)
        assert all(r["seen"] == (r["part"] <= r["after_sleep"]) for r in rows if r["method"] == m)
        assert {r["phrasing"] for r in rows if r["method"] == m} == {"seen", "unseen"}
    for ph in ("seen", "unseen"):
        for mode in ("closed_book", "in_context"):
            assert res["baseline"][f"{mode}_by_phrasing"][ph] == pytest.approx(
                [_em(rows, "base", None, 0, e, mode, ph) for e in eps])
    by = {r["method"]: r for r in res["runs"]}
    # the never-trained model answers exactly as the baseline after every "sleep"
    assert all(row == pytest.approx(b) for row in by["no_sleep"]["R"])
    assert by["no_sleep"]["metrics"]["drift"] == pytest.approx(0.0)
    # the trained methods changed the weights: perplexity moved and the sleeps were real
    for m in ("sft", "sleep"):
        assert by[m]["perplexity_world"][-1] != pytest.approx(res["baseline"]["perplexity_world"], rel=1e-6)
    assert [s["version"] for s in by["sleep"]["sleeps"]] == ["v0001", "v0002", "v0003"]
    assert all("rem" in s["phases"] and s["nrem_steps"] == 20 for s in by["sleep"]["sleeps"])


def test_report_has_the_table_and_its_plots(quick):
    out, res, _ = quick
    text = (out / "report.md").read_text()
    assert "| method | ACC | BWT | FWT |" in text
    assert "| ACC seen | ACC unseen | LA seen | LA unseen | in-context ACC | in-context ACC seen | " \
           "in-context ACC unseen |" in text
    assert "evaluation-only paraphrases" in text and "![ACC by phrasing](plots/phrasing.png)" in text
    for m in METHODS:
        s = res["summary"][m]
        assert f"| {m} | {s['ACC']['mean']:.3f} |" in text
        assert f"| {s['LA']['mean']:.3f} | {s['ACC_seen']['mean']:.3f} | {s['ACC_unseen']['mean']:.3f} | " \
               f"{s['LA_seen']['mean']:.3f} | {s['LA_unseen']['mean']:.3f} |" in text
    for ref in [line.split("](")[1].rstrip(")") for line in text.splitlines() if line.startswith("![")]:
        assert (out / ref).is_file(), ref


def test_in_context_and_bad_methods(tmp_path, seed_test_model):
    cfg = load_config(QUICK, ["eval.seeds=1", "eval.methods=[in_context]", "cycle.n_sleeps=2",
                              "eval.drift_texts=2", "eval.drift_world_episodes=1"])
    res = run_eval(cfg, tmp_path / "ic", progress=False)
    run, p = res["runs"][0], res["part_of"]
    ic, cb = res["baseline"]["in_context"], res["baseline"]["closed_book"]
    # seen episodes are measured with their documents in context, the others closed-book
    for i, row in enumerate(run["R"]):
        assert row == pytest.approx([ic[j] if p[j] <= i else cb[j] for j in range(len(row))])
        for ph in ("seen", "unseen"):  # the same rule, per phrasing
            ic_ph, cb_ph = (res["baseline"][f"{k}_by_phrasing"][ph] for k in ("in_context", "closed_book"))
            assert run["R_by_phrasing"][ph][i] == pytest.approx(
                [ic_ph[j] if p[j] <= i else cb_ph[j] for j in range(len(row))])
    assert run["R_mode"] == "in_context"
    with pytest.raises(ValueError, match="eval.methods: unknown method"):
        run_eval(load_config(QUICK, ["eval.methods=[no_sleep,dreamless]"]), tmp_path / "bad", progress=False)
    with pytest.raises(ConfigError, match="eval.seeds"):
        load_config(QUICK, ["eval.seeds=0"])


def test_job_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "jobs.eval", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "usage: sleepray eval" in out.stdout and "--out" in out.stdout
