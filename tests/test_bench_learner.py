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
    assert a1["step_s_phased"] > 0 and a1["syncs_per_step"] is None     # syncs are counted on a GPU
    assert modes["lti"]["teacher_pool_s"] > 0 and "reward" in modes["lti"]["phases_s"]
    assert "anchor" in modes["anchor"]["phases_s"]
    assert 0 < rec["switch_ms"] < 50 and rec["decode_ms"] > 0
    assert out.with_suffix(".png").stat().st_size > 0


def test_the_learner_benchmark_profiles_the_nrem_step_by_phase(tmp_path, seed_test_model):
    """--profile: steps under torch.profiler, summed by phase (host ops here; kernels on a GPU)."""
    out = tmp_path / "bench_learner_prof.json"
    assert main(["--shapes", "tiny", "--batches", "4", "--new-tokens", "6", "--warm", "1", "--iters", "1",
                 "--device", "cpu", "--modes", "alpha1", "--only-nrem", "--profile", "2", "--out", str(out)]) == 0
    [rec] = json.loads(out.read_text())
    [a1] = rec["nrem"]
    prof = a1["profile"]
    assert prof["steps"] == 2 and {"sampling", "student_forward", "backward", "loss"} <= set(prof["phases"])
    student = prof["phases"]["student_forward"]
    assert student["wall_ms"] > 0 and student["kernels"] == 0 and student["top_host_ms"]
    assert any("linear" in k or "mm" in k for k in student["top_host_ms"]), student["top_host_ms"]


def test_timed_steps_synchronise_only_the_phases_asked_for():
    """The timed steps run as a real step does: only sampling is synchronised and timed; a
    phase's own synchronisation would keep the host from queueing the next phase's kernels."""
    import torch
    from sleepray.learner_bench import Phases

    class Step:
        def sampling(self):
            return "s"

        def student(self):
            return "f"
    ph = Phases(torch.device("cpu"))
    undo = [ph.wrap(Step, "sampling", "sampling"), ph.wrap(Step, "student", "student_forward")]
    try:
        ph.only = {"sampling"}
        assert (Step().sampling(), Step().student()) == ("s", "f") and set(ph.acc) == {"sampling"}
        ph.only, ph.acc = None, {}
        Step().sampling(), Step().student()
        assert set(ph.acc) == {"sampling", "student_forward"}
    finally:
        for u in undo:
            u()


def test_the_bare_loops_alone_with_the_fused_optimizer(tmp_path, seed_test_model):
    """--only-bare: the bare variants and nothing else; tuned_fused's AdamW is PyTorch's fused one,
    tuned_lora's LoRA layers the fused ones."""
    out = tmp_path / "bench_bare.json"
    assert main(["--shapes", "tiny", "--batches", "4", "--warm", "1", "--iters", "1", "--device", "cpu",
                 "--bare", "tuned,tuned_fused,tuned_lora", "--only-bare", "--bare-iters", "2", "--out", str(out)]) == 0
    [rec] = json.loads(out.read_text())
    assert rec["nrem"] == [] and "decode" not in rec and "loss_memory" not in rec
    bare = {b["variant"]: b for b in rec["bare"]}
    assert bare["tuned_fused"]["fused_optimizer"] is True and bare["tuned"]["fused_optimizer"] is False
    assert bare["tuned_lora"]["fused_lora"] is True and bare["tuned"]["fused_lora"] is False
    assert all(len(b["step_s_all"]) == 2 for b in rec["bare"])   # --bare-iters
    assert rec["bare_tok_s"] == max(b["tok_s"] for b in rec["bare"]) > 0


def test_a_benchmark_longer_than_the_nrem_run_is_refused(tmp_path, seed_test_model):
    """Past nrem.steps, sample-ahead would draw groups shorter than k: the mode says so instead."""
    out = tmp_path / "too_long.json"
    assert main(["--shapes", "tiny", "--batches", "4", "--new-tokens", "6", "--warm", "1", "--iters", "2",
                 "--device", "cpu", "--modes", "alpha1", "--only-nrem", "--out", str(out), "nrem.steps=3"]) == 0
    [rec] = json.loads(out.read_text())
    assert "more than nrem.steps=3" in rec["nrem"][0]["error"]


def test_liger_swiglu_is_seen_whether_its_class_or_its_forward_was_put_in():
    """liger patches a built model by binding its SwiGLU forward onto the MLP (the class stays), and a
    model built after a patch by its class: the benchmark's record says SwiGLU in both cases."""
    import torch
    from sleepray.learner_bench import has_liger_swiglu

    class Qwen3MLP(torch.nn.Module):
        pass

    class LigerSwiGLUMLP(torch.nn.Module):
        pass
    plain, bound, built = (torch.nn.Sequential(m) for m in (Qwen3MLP(), Qwen3MLP(), LigerSwiGLUMLP()))
    bound[0].__dict__["_get_name"] = lambda: "LigerSwiGLUMLP"     # what liger's instance patch does
    assert (has_liger_swiglu(plain), has_liger_swiglu(bound), has_liger_swiglu(built)) == (False, True, True)


def test_the_learner_benchmark_refuses_unknown_decode_loops_and_modes_before_running(tmp_path, capsys):
    import pytest
    out = tmp_path / "never.json"
    for loops in ("fast", "graph_fast"):       # unknown; a graphed loop on a CPU
        with pytest.raises(SystemExit) as e:
            main(["--shapes", "tiny", "--device", "cpu", "--decode-loops", loops, "--out", str(out)])
        assert e.value.code == 2 and "--decode-loops" in capsys.readouterr().err
    for flag in ("--modes", "--ray-mode"):    # a mode name that is not one
        with pytest.raises(SystemExit) as e:
            main(["--shapes", "tiny", "--device", "cpu", flag, "alpha2", "--out", str(out)])
        assert e.value.code == 2 and "unknown NREM modes ['alpha2']" in capsys.readouterr().err
    assert not out.exists()


def test_the_learner_benchmark_keeps_sample_ahead_apart_from_the_on_policy_headline(tmp_path, seed_test_model):
    """A sample-ahead mode (four steps' samples from one call) is timed over whole groups of four
    steps and reported beside the headline, which stays the every-step-on-policy figure."""
    out = tmp_path / "bench_learner_ahead.json"
    assert main(["--shapes", "tiny", "--batches", "4", "--new-tokens", "6", "--warm", "1", "--iters", "1",
                 "--device", "cpu", "--modes", "alpha1,alpha1_ahead4", "--only-nrem", "--out", str(out)]) == 0
    [rec] = json.loads(out.read_text())
    modes = {n["mode"]: n for n in rec["nrem"]}
    assert rec["nrem_mode"] == "alpha1" and rec["nrem_tok_s"] == modes["alpha1"]["nrem_tok_s"]
    ahead = modes["alpha1_ahead4"]
    assert rec["nrem_ahead_mode"] == "alpha1_ahead4" and rec["nrem_ahead_k"] == 4 == ahead["sample_ahead"]
    assert len(ahead["step_s_all"]) == 4 and len(modes["alpha1"]["step_s_all"]) == 1
    assert rec["nrem_tok_s_ahead"] == ahead["nrem_tok_s"] > 0 and ahead["phases_s"]["sampling"] > 0


def test_the_learner_benchmark_runs_the_nrem_step_on_ray_train(ray_client, tmp_path, seed_test_model):
    """The Ray Train path (one CPU worker, gloo) on a real local Ray: the same step as in process
    (same seeds, same rows: the same loss tokens and divergence), its tok/s beside the in-process one."""
    out = tmp_path / "bench_learner_ray.json"
    assert main(["--shapes", "tiny", "--batches", "4", "--new-tokens", "6", "--warm", "1", "--iters", "2",
                 "--device", "cpu", "--modes", "alpha1", "--only-nrem", "--ray-workers", "1",
                 "--out", str(out)]) == 0
    [rec] = json.loads(out.read_text())
    assert "--ray-workers 1" in rec["command"] and rec["revision"]
    [inproc], [run] = rec["nrem"], rec["ray_train"]
    assert "error" not in run, run.get("error")
    assert run["workers"] == 1 and run["backend"] == "gloo" and run["rows_per_rank"] == [4]
    assert rec["nrem_tok_s"] > 0 and rec["ray_train_tok_s_1cpu"] == run["tok_s"] > 0
    assert run["loss_tokens"] == inproc["loss_tokens"] > 0
    [rank0] = run["ranks"]
    assert abs(rank0["divergence"] - inproc["divergence"]) < 1e-4 * max(1.0, abs(inproc["divergence"]))
    assert len(rank0["step_s_all"]) == 2 and run["fit_s"] > run["step_s"]
    expect = (rec["nrem_tok_s"] / run["tok_s"] - 1) * 100
    assert abs(rec["ray_train_overhead_pct"] - expect) < 1e-9 and rec["ray_train_mode"] == run["mode"] == "alpha1"
    assert "bare" not in rec and "decode" not in rec


def test_the_learner_benchmark_runs_the_fused_decode_on_a_cpu(tmp_path, seed_test_model):
    out = tmp_path / "bench_learner.json"
    assert main(["--shapes", "tiny", "--batches", "4", "--new-tokens", "6", "--warm", "1", "--iters", "1",
                 "--device", "cpu", "--bare", "tuned", "--modes", "alpha1,alpha1_fused", "--decode-loops",
                 "own,fused", "--out", str(out)]) == 0
    [rec] = json.loads(out.read_text())
    dec = rec["decode"]
    assert dec["own_decode_ms"] > 0 and dec["fused_decode_ms"] > 0 and dec["fused_equal_greedy_frac"] == 1.0
    assert rec["decode_ms"] == min(dec["own_decode_ms"], dec["fused_decode_ms"])
    fused = {n["mode"]: n for n in rec["nrem"]}["alpha1_fused"]
    assert "error" not in fused and fused["loss_tokens"] > 0 and fused["phases_s"]["sampling"] > 0


def test_every_nrem_mode_loads_and_its_name_says_its_switches():
    from sleepray.config import load_config
    from sleepray.learner_bench import NREM_MODES
    for name, over in NREM_MODES.items():
        n = load_config(None, list(over)).nrem          # a bad override would raise here
        parts = name.split("_")
        assert (n.decode == "fused") == ("fused" in parts), name
        assert (n.sample_ahead == 4) == ("ahead4" in parts), name
        assert (n.async_rows is True) == ("async" in parts), name
        # "graphs": the blocks' CUDA graphs in a fast mode; alone (alpha1_graphs), the teacher's graph
        assert (n.block_graphs is True) == ("fast" in parts and "graphs" in parts), name
        assert (n.teacher_graph is True) == ("fast" in parts or "graphs" in parts), name
        assert (n.attention == "math") == ("math" in parts), name
