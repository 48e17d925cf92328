"""The actor system on a real local Ray cluster, with real kills.

A RolloutWorker (vLLM) killed mid-sleep is restarted by Ray and the sleep completes; a
Ray Train worker killed mid-update is replaced and goes on from its last checkpoint; a
Coordinator killed in each phase is resumed by a new one. Each time: no acknowledged
episode is lost and none is trained twice (memory store + adapter lineage + records).
"""
import json
import os
import signal
import time
import uuid

import pytest
import ray

from actors import coordinator
from sleepray.config import load_config
from sleepray.sleep_record import records
from sleepray.memory import MemoryStore
from sleepray.storage import Storage
from sleepray.world import World

FAST = ["nrem.judge=exact", "nrem.batch_size=4", "nrem.prompts_per_episode=4", "nrem.max_new_tokens=12",
        "rem.dreams_per_episode=2", "rem.formats=[qa]", "rem.keep_top_k=1", "rem.keep_random=0",
        "rem.trial_steps=1", "rem.restem_steps=1", "rem.sft_steps=2", "rem.probes_per_episode=2",
        "rem.max_new_tokens=12", "ray.max_failures=2"]


def make_cfg(tmp_path, model, *extra):
    return load_config(None, [f"cycle.storage={tmp_path}", f"model.path={model}",
                              f"ray.namespace=t-{uuid.uuid4().hex[:8]}", *FAST, *extra])


def add_episodes(tmp_path, seed, n=2) -> list[str]:
    eps = World(seed, 1, 0, 0, 1).episodes(n)
    return MemoryStore(Storage(tmp_path).memory).append(eps).episode_ids


def wait_for(pred, timeout=300.0, every=0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(every)
    raise TimeoutError("condition not reached")


def progress(tmp_path, sleep_id="s0001"):
    p = tmp_path / "sleeps" / sleep_id / "nrem" / "progress.json"
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def assert_consolidated_once(tmp_path, ids):
    store = MemoryStore(Storage(tmp_path).memory)
    assert [v.name for v in Storage(tmp_path).versions()] == ["v0001"]
    lineage = json.loads((tmp_path / "adapters" / "v0001" / "lineage.json").read_text())
    assert sorted(lineage["episodes"]) == sorted(ids)
    assert sorted(store.consolidated_by("v0001")) == sorted(ids)
    assert store.pressure()["short_term_episodes"] == 0
    assert len(records(Storage(tmp_path))) == 1 and records(Storage(tmp_path))[0].complete


def stop(coord):
    try:
        ray.get(coord.shutdown.remote(), timeout=60)
    finally:
        ray.kill(coord, no_restart=True)


def test_sleep_with_vllm_rollouts_survives_a_killed_rollout_worker(ray_client, tmp_path, seed_test_model):
    """NREM's samples and REM's dreams on the vLLM RolloutWorker (``ray.sampling=rollouts``)."""
    cfg = make_cfg(tmp_path, seed_test_model, "ray.rollout_engine=vllm", "nrem.steps=8",
                   "ray.sampling=rollouts", "ray.publish_every=2", "ray.checkpoint_every=4",
                   "rem.dreams_per_episode=2", "rem.keep_top_k=1", "rem.keep_random=0", "rem.trial_steps=1",
                   "rem.restem_steps=1", "rem.sft_steps=2", "rem.probes_per_episode=2", "rem.max_new_tokens=16")
    ids = add_episodes(tmp_path, 6101)
    coord = coordinator.start(cfg, watch=False)
    try:
        assert ray.get(coord.request_sleep.remote("request"))["accepted"]
        wait_for(lambda: (progress(tmp_path) or {}).get("step", 0) >= 1)
        before = ray.get(coord.rollout_info.remote())[0]
        assert before["engine"] == "VLLMEngine"
        os.kill(before["pid"], signal.SIGKILL)
        st = ray.get(coord.wait_idle.remote(900))
        assert st["error"] is None and st["adapter_version"] == "v0001"
        after = ray.get(coord.rollout_info.remote())[0]
        assert after["pid"] != before["pid"]                  # Ray restarted the worker
        assert "v0001" in after["adapters"]                    # and the new version reached it
        nrem = st["last_sleep"]["metrics"]["nrem"]
        assert nrem["step"] == 8 and nrem["rollout_workers"] == 1 and nrem["nrem_sampling"] == "rollouts"
        assert len(list((tmp_path / "sleeps").glob("s*/nrem/drafts/*-d00002"))) == 1   # drafts published
        rem = st["last_sleep"]["metrics"]["rem"]                # the dreams came from the rollouts too
        assert rem["dreams_from"] == "rollouts" and rem["dreams"] == 2 * len(ids)
        assert rem["dream_adapters"] == len(ids) and any("-dream-" in a for a in after["adapters"])
        assert_consolidated_once(tmp_path, ids)
    finally:
        stop(coord)


def test_memory_pressure_starts_a_sleep_and_a_killed_learner_worker_resumes(ray_client, tmp_path,
                                                                            seed_test_model):
    # two data-parallel learner workers (gloo): rank 0 is killed mid-update
    cfg = make_cfg(tmp_path, seed_test_model, "ray.rollout_engine=transformers", "nrem.steps=8",
                   "ray.num_learner_workers=2",
                   "ray.checkpoint_every=2", "ray.publish_every=4", "rem.enabled=false",
                   "cycle.capacity_tokens=20", "cycle.poll_seconds=0.5")
    coord = coordinator.start(cfg, watch=True)
    try:
        assert ray.get(coord.status.remote())["phase"] == "wake"
        ids = add_episodes(tmp_path, 6102)                     # over capacity: it falls asleep itself
        p = wait_for(lambda: (lambda q: q if q and q["step"] >= 3 else None)(progress(tmp_path)))
        os.kill(p["pid"], signal.SIGKILL)                      # a Ray Train worker, mid-update
        st = ray.get(coord.wait_idle.remote(900))
        assert st["error"] is None
        assert st["last_sleep"]["trigger"] == "pressure"
        nrem = st["last_sleep"]["metrics"]["nrem"]
        assert nrem["step"] == 8 and nrem["resumed_from"] >= 2     # restored, not restarted
        assert nrem["learner_workers"] == 2
        assert nrem["ray_train_poll_s"] == cfg.ray.train_poll_seconds    # not Ray's 2 s a report
        # on CPU (ray.use_gpu false) NREM samples with the learner's own loop: no drafts published
        assert nrem["nrem_sampling"] == "learner" and not list((tmp_path / "sleeps").glob("s*/nrem/drafts/*"))
        assert_consolidated_once(tmp_path, ids)
    finally:
        stop(coord)


def _current_phase(coord):
    try:
        return ray.get(coord.status.remote(), timeout=10)["phase"]
    except Exception:
        return None


def test_a_coordinator_killed_in_each_phase_is_resumed_by_a_new_one(ray_client, tmp_path, seed_test_model):
    cfg = make_cfg(tmp_path, seed_test_model, "ray.rollout_engine=transformers", "nrem.steps=6",
                   "ray.checkpoint_every=2", "ray.publish_every=3")
    ids = add_episodes(tmp_path, 6103)
    coord = coordinator.start(cfg, watch=False)
    ray.get(coord.request_sleep.remote("request"))
    nrem_done_at = None
    for phase in ["nrem", "rem", "publish"]:
        if phase == "nrem":   # mid-update, after a checkpoint
            wait_for(lambda: (progress(tmp_path) or {}).get("step", 0) >= 3)
        else:
            wait_for(lambda: _current_phase(coord) == phase, every=0.05)
        ray.kill(coord, no_restart=True)
        rec = records(Storage(tmp_path))[0]
        assert not rec.complete
        if phase != "nrem":
            nrem_done_at = nrem_done_at or rec.metrics("nrem")["finished_at"]
            assert rec.metrics("nrem")["finished_at"] == nrem_done_at   # NREM was not redone
        wait_for(lambda: _gone(cfg), timeout=60)
        coord = coordinator.start(cfg, watch=False)            # resumes the unfinished sleep
    try:
        st = ray.get(coord.wait_idle.remote(900))
        assert st["error"] is None
        rec = records(Storage(tmp_path))[0]
        assert rec.complete and rec.metrics("nrem")["finished_at"] == nrem_done_at
        assert rec.metrics("nrem")["resumed_from"] >= 2        # Ray Train restored the killed run
        assert_consolidated_once(tmp_path, ids)
    finally:
        stop(coord)


def _gone(cfg) -> bool:
    try:
        ray.get_actor(coordinator.NAME, namespace=cfg.ray.namespace)
        return False
    except ValueError:
        return True
