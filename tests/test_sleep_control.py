"""The one sleep controller, in this process: triggers, the real step, one status schema.

The sleep it runs here is a stand-in that walks a real sleep record on disk step by step
(the controller reads the step from that record); the real sleeps it hosts run in
tests/test_cycle.py (in process), test_actors.py (Coordinator) and test_serve.py (Serve).
"""
import threading
import time

import pytest

from sleepray.config import load_config
from sleepray.memory import MemoryStore
from sleepray.sleep import open_sleep
from sleepray.sleep_control import SleepController
from sleepray.storage import Storage
from sleepray.world import World

STATUS_KEYS = {"controller", "phase", "sleep_id", "pressure", "adapter_version", "last_sleep",
               "current_sleep", "sleeps_done", "wakes", "error", "storage"}


def wait_for(cond, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


class SteppedSleep:
    """Opens a real record, then finishes one step each time ``go`` is set."""

    def __init__(self, cfg, store, fail: bool = False):
        self.cfg, self.store, self.fail = cfg, store, fail
        self.go, self.triggers = threading.Event(), []

    def __call__(self, trigger):
        self.triggers.append(trigger)
        rec = open_sleep(self.cfg, self.store, trigger)
        if rec is None:
            return None
        for step in rec.phases:
            assert self.go.wait(20)
            self.go.clear()
            if self.fail:
                raise RuntimeError("the learner died")
            rec.finish(step, {"seconds": 0.0})
        return rec.data


@pytest.fixture
def setup(tmp_path):
    cfg = load_config(None, [f"cycle.storage={tmp_path}", "rem.enabled=true", "experts.deep_sleep_every=100",
                             "cycle.capacity_tokens=1000000", "cycle.poll_seconds=0.05"])
    store = Storage(tmp_path)
    MemoryStore(store.memory).append([World(4242, 1, 0, 0, 1).episode(0)])
    return cfg, store


def test_status_follows_the_record_step_by_step_and_refuses_a_second_sleep(setup):
    cfg, store = setup
    sleep = SteppedSleep(cfg, store)
    ctl = SleepController(cfg, store.root, sleep, name="test")
    st = ctl.status()
    assert set(st) == STATUS_KEYS and st["phase"] == "wake" and st["last_sleep"] is None
    assert st["pressure"]["short_term_episodes"] == 1 and st["pressure"]["capacity_tokens"] == 1000000
    ack = ctl.request_sleep("request")
    assert ack["accepted"] and ack["phase"] == "nrem"
    seen = []
    for step in ["nrem", "rem", "publish"]:
        wait_for(lambda: ctl.status()["sleep_id"] == "s0001")
        st = ctl.status()
        seen.append(st["phase"])
        assert st["current_sleep"]["reason"] == "request"
        busy = ctl.request_sleep("request")
        assert not busy["accepted"] and busy["phase"] == step
        sleep.go.set()
        wait_for(lambda: ctl.status()["phase"] != step)
    assert seen == ["nrem", "rem", "publish"]
    st = ctl.wait(10)
    assert set(st) == STATUS_KEYS and st["phase"] == "wake" and st["error"] is None
    assert st["last_sleep"]["sleep_id"] == "s0001" and st["last_sleep"]["trigger"] == "request"
    assert set(st["last_sleep"]["metrics"]) == {"nrem", "rem", "publish"}
    assert st["sleeps_done"] == 1 and st["wakes"] == 1 and st["current_sleep"] is None


def test_a_failed_sleep_is_reported_and_the_next_request_resumes_it(setup):
    cfg, store = setup
    sleep = SteppedSleep(cfg, store, fail=True)
    ctl = SleepController(cfg, store.root, sleep)
    assert ctl.request_sleep()["accepted"]
    sleep.go.set()
    st = ctl.wait(10)
    assert st["phase"] == "wake" and "the learner died" in st["error"] and st["sleeps_done"] == 0
    # a new controller over the same storage resumes the unfinished sleep by itself
    sleep.fail = False
    again = SleepController(cfg, store.root, sleep)
    assert again.status()["phase"] == "nrem" and sleep.triggers[-1] == "resume"
    for _ in range(3):
        sleep.go.set()
        time.sleep(0.05)
    st = again.wait(10)
    assert st["error"] is None and st["last_sleep"]["sleep_id"] == "s0001"


def test_nothing_to_consolidate_is_a_message_not_an_error(tmp_path):
    cfg = load_config(None, [f"cycle.storage={tmp_path}"])
    ctl = SleepController(cfg, tmp_path, SteppedSleep(cfg, Storage(tmp_path)))
    ctl.request_sleep()
    st = ctl.wait(10)
    assert st["error"] is None and st["last_sleep"]["version"] is None
    assert "nothing to consolidate" in st["last_sleep"]["message"] and st["sleeps_done"] == 0


@pytest.mark.parametrize("trigger", ["pressure", "schedule"])
def test_the_watcher_falls_asleep_on_pressure_and_on_schedule(setup, trigger):
    cfg, store = setup
    tokens = MemoryStore(store.memory).pressure()["short_term_tokens"]
    if trigger == "pressure":
        cfg.cycle.capacity_tokens = tokens            # full: sleep now
    else:
        cfg.cycle.schedule_seconds = 0.2              # not full, but it is time
    sleep = SteppedSleep(cfg, store)
    ctl = SleepController(cfg, store.root, sleep, watch=True)
    try:
        wait_for(lambda: sleep.triggers)
        assert sleep.triggers == [trigger] and ctl.status()["phase"] == "nrem"
        for _ in range(3):
            sleep.go.set()
            time.sleep(0.05)
        assert ctl.wait(10)["last_sleep"]["trigger"] == trigger
    finally:
        ctl.stop()


def test_the_watcher_stays_awake_below_capacity_without_a_schedule(setup):
    cfg, store = setup
    sleep = SteppedSleep(cfg, store)
    ctl = SleepController(cfg, store.root, sleep, watch=True)
    time.sleep(0.5)   # ten checks
    ctl.stop()
    assert sleep.triggers == [] and ctl.status()["phase"] == "wake"
