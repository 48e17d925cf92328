"""The learner benchmark runs on CPU with a tiny shape (CI exercises the code the H200 figures
come from) and writes every field the learner issue asks for, with revision and command."""
import json

from jobs.bench_learner import main

FIELDS = ["device", "shape", "batch", "new_tokens", "bare_tok_s", "bare_mfu_6n", "nrem_tok_s",
          "nrem_tok_s_nosample", "switch_ms", "loss_peak_gib_256x64", "decode_ms", "decode_floor_ms",
          "revision", "command"]


def test_the_learner_benchmark_writes_its_record(tmp_path, seed_test_model):
    out = tmp_path / "bench_learner.json"
    assert main(["--shapes", "tiny", "--batches", "4", "--new-tokens", "6", "--warm", "1", "--iters", "1",
                 "--device", "cpu", "--out", str(out)]) == 0
    [rec] = json.loads(out.read_text())
    assert all(k in rec for k in FIELDS), [k for k in FIELDS if k not in rec]
    assert rec["shape"] == "tiny" and rec["batch"] == 4 and "--shapes tiny" in rec["command"]
    assert {b["variant"] for b in rec["bare"]} == {"peft", "tuned"} and rec["bare_tok_s"] > 0
    modes = {n["mode"]: n for n in rec["nrem"]}
    assert set(modes) == {"alpha1", "lti", "anchor"} and not any("error" in n for n in rec["nrem"])
    a1 = modes["alpha1"]
    assert 0 < a1["loss_tokens"] <= 4 * 6 and 0 < rec["nrem_tok_s"] < rec["nrem_tok_s_nosample"]
    assert a1["phases_s"]["sampling"] > 0 and a1["phases_s"]["backward"] > 0
    assert modes["lti"]["teacher_pool_s"] > 0 and "reward" in modes["lti"]["phases_s"]
    assert "anchor" in modes["anchor"]["phases_s"]
    assert 0 < rec["switch_ms"] < 50 and rec["decode_ms"] > 0
    assert out.with_suffix(".png").stat().st_size > 0
