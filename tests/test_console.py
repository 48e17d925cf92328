"""The readable console: per-phase progress lines drawn from disk, logs in a file, TensorBoard curves."""
import io
import json
import logging

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sleepray import console, nrem
from sleepray.config import load_config
from sleepray.cycle import evaluate, run_cycle
from sleepray.memory import MemoryStore
from sleepray.sleep import run_sleep
from sleepray.sleep_record import SleepRecord
from sleepray.storage import Storage, write_json
from sleepray.world import World
from test_cycle import FAST  # tests/ is on sys.path (pytest prepend import mode)


def _scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    ea = EventAccumulator(str(logdir))
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def test_tensorboard_has_every_nrem_step_rem_per_sleep_and_the_cycles_accuracies(tmp_path, seed_test_model,
                                                                                monkeypatch):
    cfg = load_config(None, [f"cycle.storage={tmp_path}", *FAST, "cycle.n_sleeps=1"])
    histories = []
    real_run_nrem = nrem.run_nrem

    def spy(*args, **kwargs):
        result = real_run_nrem(*args, **kwargs)
        histories.append(result.history)
        return result

    monkeypatch.setattr(nrem, "run_nrem", spy)
    store = MemoryStore(Storage(tmp_path).memory)
    episodes = [World(5001, 1, 0, 0, 1).episode(0)]
    lines = []
    result = run_cycle(cfg, episodes, append=lambda eps: store.append(eps).__dict__,
                       sleep=lambda trig: {"sleep_id": run_sleep(cfg, tmp_path, trigger=trig, progress=False).sleep_id},
                       evaluate_fn=lambda eps, ic: evaluate(cfg, tmp_path, eps, ic), progress=False,
                       on_sleep=lambda i, st, ev: lines.append((i, ev["version"])))
    assert lines == [(0, "v0001")]

    # every NREM step, each metric nrem_loss recorded, equal to the history
    (history,) = histories
    assert [h["step"] for h in history] == [1, 2, 3]
    steps = _scalars(tmp_path / "tensorboard" / "s0001")
    keys = [k for k, v in history[0].items() if k != "step" and isinstance(v, (int, float))]
    assert {"divergence", "reward", "loss"} <= set(keys)
    for k in keys:
        assert [s for s, _ in steps[f"nrem/{k}"]] == [1, 2, 3]
        assert [v for _, v in steps[f"nrem/{k}"]] == pytest.approx([h[k] for h in history], rel=1e-5, abs=1e-6)
    assert json.loads((tmp_path / "sleeps" / "s0001" / "nrem" / "progress.json").read_text())["step"] == 3

    # each step of the sleep once, at the sleep's number: NREM's final metrics, REM's
    sleeps = _scalars(tmp_path / "tensorboard" / "sleeps")
    rec = SleepRecord.read(tmp_path / "sleeps" / "s0001" / "record.json")
    rem_metrics = rec.metrics("rem")
    assert sleeps["rem/dreams"] == [(1, rem_metrics["dreams"])] and rem_metrics["dreams"] == 2
    assert sleeps["rem/probe_accuracy_final"] == [(1, pytest.approx(rem_metrics["probe_accuracy_final"]))]
    assert sleeps["nrem/divergence"] == [(1, pytest.approx(rec.metrics("nrem")["divergence"], rel=1e-5))]
    assert [s for s, _ in sleeps["publish/seconds"]] == [1]
    assert json.loads((tmp_path / "sleeps" / "s0001" / "rem" / "progress.json").read_text())["stage"] == "outputs"

    # the cycle's closed-book accuracy before (0) and after each sleep, in context before
    cycle = _scalars(tmp_path / "tensorboard" / "cycle")
    before = result["before"]["closed_book"]
    assert cycle["accuracy/closed_book"] == [(0, pytest.approx(sum(before.values()) / len(before))),
                                             (1, pytest.approx(sum(result["R"][0]) / len(result["R"][0])))]
    assert [s for s, _ in cycle["accuracy/in_context"]] == [0]
    assert [s for s, _ in cycle["accuracy/closed_book_seen"]] == [0, 1]


def _record(tmp_path, done: dict) -> SleepRecord:
    store = Storage(tmp_path)
    rec = SleepRecord.new(store, 1, {"parent": None, "trigger": "request", "episodes": ["e0"],
                                     "phases": ["nrem", "rem", "publish"]})
    for phase, m in done.items():
        rec.finish(phase, m)
    return rec


def test_sleep_bars_draw_one_line_per_phase_from_the_record_and_progress_files(tmp_path):
    cfg = load_config(None, [f"cycle.storage={tmp_path}", "nrem.steps=10"])
    out = io.StringIO()
    bars = console.SleepBars(cfg, tmp_path, file=out)
    rec = _record(tmp_path, {})
    write_json(rec.dir / "nrem" / "progress.json", {"step": 4, "divergence": 0.25, "reward": 0.5, "loss": 0.1})
    bars.update({"phase": "nrem", "sleep_id": "s0001"})
    assert "s0001 NREM" in out.getvalue() and "4/10" in out.getvalue() and "D=0.250" in out.getvalue()
    rec.finish("nrem", {"divergence": 0.125, "reward": 0.75, "loss": 0.05, "seconds": 12.0})
    write_json(rec.dir / "rem" / "progress.json", {"stage": "trials", "done": 2, "dreams": 8, "kept": 4,
                                                   "rewarded": 3})
    bars.update({"phase": "rem", "sleep_id": "s0001"})
    text = out.getvalue()
    assert "10/10" in text and "D=0.125" in text and "12s" in text
    assert "s0001 REM" in text and "2/5" in text and "trials" in text and "rewarded=3" in text
    # REM and publish finish between two polls: both get their final line once awake
    rec.finish("rem", {"dreams": 8, "kept": 4, "rewarded": 3, "probe_accuracy_final": 0.5, "seconds": 30})
    rec.finish("publish", {"seconds": 1})
    bars.update({"phase": "wake", "sleep_id": None, "last_sleep": {"sleep_id": "s0001"}})
    final = [ln.rsplit("\r", 1)[-1] for ln in out.getvalue().split("\n") if ln.strip()]
    assert len(final) == 3
    assert final[0].startswith("s0001 NREM") and "10/10" in final[0]
    assert final[1].startswith("s0001 REM") and "5/5" in final[1] and "probe_accuracy_final=0.500" in final[1]
    assert final[2].startswith("s0001 publish") and "version v0001" in final[2]
    bars.update({"phase": "wake", "sleep_id": None, "last_sleep": {"sleep_id": "s0001"}})   # nothing new
    assert len([ln for ln in out.getvalue().split("\n") if ln.strip()]) == 3


def test_a_sleep_that_ran_between_polls_gets_its_lines_and_a_failed_step_says_so(tmp_path):
    cfg = load_config(None, [f"cycle.storage={tmp_path}", "nrem.steps=3"])
    out = io.StringIO()
    bars = console.SleepBars(cfg, tmp_path, file=out)
    _record(tmp_path, {"nrem": {"skipped": "every episode of this sleep was deleted"}})
    bars.update({"phase": "wake", "last_sleep": {"sleep_id": "s0001", "error": "RuntimeError: boom"}})
    final = [ln.rsplit("\r", 1)[-1] for ln in out.getvalue().split("\n") if ln.strip()]
    assert "skipped: every episode" in final[0] and "not finished" in final[1] and len(final) == 2


def test_setup_logging_sends_info_to_the_run_log_and_only_warnings_to_the_console(tmp_path, capsys):
    root, ray_logger = logging.getLogger(), logging.getLogger("ray")
    saved = list(root.handlers), root.level, list(ray_logger.handlers), ray_logger.propagate
    try:
        path = console.setup_logging(tmp_path / "logs", verbose=False)
        logging.getLogger("sleepray.x").info("an info line")
        logging.getLogger("sleepray.x").warning("a warning line")
        logging.getLogger("ray.train").warning("a ray warning")
        for h in root.handlers:
            h.flush()
        err = capsys.readouterr().err
        assert "a warning line" in err and "an info line" not in err and "a ray warning" not in err
        text = path.read_text()
        assert path == tmp_path / "logs" / "run.log"
        assert "INFO sleepray.x: an info line" in text and "a ray warning" in text and text[:4].isdigit()
    finally:
        for h in list(root.handlers):
            if getattr(h, "_sleepray", False):
                root.removeHandler(h)
                h.close()
        for h in saved[0]:
            if h not in root.handlers:
                root.addHandler(h)
        root.setLevel(saved[1])
        ray_logger.handlers[:] = saved[2]
        ray_logger.propagate = saved[3]
