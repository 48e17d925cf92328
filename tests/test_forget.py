"""Forgetting a consolidated memory (sleepray/forget.py): real sleeps on the seed:test model,
a real MemoryStore, replay buffer and storage folder. Through the HTTP endpoint with the real
engine and Ray Serve: tests/test_serve.py."""
import json

import pytest
from serve_fakes import FakeEngine

from sleepray import forget
from sleepray.adapter_pointer import AdapterPointer
from sleepray.config import load_config
from sleepray.memory import MemoryStore
from sleepray.replay import ReplayBuffer, probe_row
from sleepray.sleep import sleep_nrem
from sleepray.sleep_control import SleepController
from sleepray.storage import Storage
from sleepray.world import World

A, B = World(10000950, 1, 0, 0, 1).episode(0), World(10000951, 1, 0, 0, 1).episode(0)


@pytest.fixture
def cfg(tmp_path, seed_test_model):
    return load_config(None, [f"cycle.storage={tmp_path}", "model.path=seed:test", "nrem.judge=exact",
                              "nrem.steps=4", "nrem.batch_size=4", "nrem.prompts_per_episode=8",
                              "nrem.use_lti=false", "rem.enabled=false"])


def _lineage(v) -> dict:
    return json.loads((v / "lineage.json").read_text())


def test_deleting_a_consolidated_memory_rebuilds_the_experts_without_it(cfg, tmp_path):
    store, memory = Storage(tmp_path), MemoryStore(Storage(tmp_path).memory)
    memory.append([A])
    v1 = sleep_nrem(cfg, progress=False)
    memory.append([B])
    v2 = sleep_nrem(cfg, progress=False)
    assert len(_lineage(v2)["experts_on"]) == 2 and forget.pending(store) == []
    buffer = ReplayBuffer(store.replay)
    buffer.append([probe_row(e.episode_id, "Q?", "ans", "s0001") for e in (A, B)])

    memory.delete([A.episode_id], "user asked")
    assert memory.forgotten() == [A.episode_id] and forget.pending(store) == [A.episode_id]
    assert SleepController(cfg, tmp_path, lambda t: None).due() == "forget"
    v3 = sleep_nrem(cfg, progress=False)
    lin = _lineage(v3)
    assert lin["rebuild"] is True and lin["forgotten"] == [A.episode_id] and lin["parent"] == v2.name
    assert lin["episodes"] == [B.episode_id]                 # the memory is gone from the lineage
    assert len(lin["experts_on"]) == 1                       # fresh experts, not v2's stack + one
    assert memory.status_of(B.episode_id) == "consolidated" and B.episode_id in memory.consolidated_by(v3.name)
    assert {r["episode_id"] for r in buffer.rows()} == {B.episode_id}   # its replay rows are gone
    assert forget.pending(store) == [] and SleepController(cfg, tmp_path, lambda t: None).due() is None
    assert store.starting_bank() == v3 / "bank"
    # the ledger's rebuild marks survive a reread
    assert MemoryStore(store.memory).consolidated_by(v3.name) == [B.episode_id]
    assert v1.name == "v0001"


def test_forgetting_everything_serves_the_base_model_again(cfg, tmp_path):
    store, memory = Storage(tmp_path), MemoryStore(Storage(tmp_path).memory)
    memory.append([A])
    v1 = sleep_nrem(cfg, progress=False)
    engine = FakeEngine(_model(cfg), cfg.engine)
    pointer = AdapterPointer(engine, tmp_path)
    assert pointer.poll_once() and pointer.version == v1.name
    memory.delete([A.episode_id])
    v2 = sleep_nrem(cfg, progress=False)
    lin = _lineage(v2)
    assert lin["phase"] == "empty" and lin["episodes"] == [] and lin["forgotten"] == [A.episode_id]
    assert not (v2 / "adapter_config.json").exists() and store.starting_bank() is None
    assert pointer.poll_once() and pointer.version == "base"
    assert engine.unloaded == [v1.name] and not pointer.poll_once()
    memory.append([B])                                        # life goes on from a fresh bank
    v3 = sleep_nrem(cfg, progress=False)
    assert _lineage(v3)["episodes"] == [B.episode_id] and len(_lineage(v3)["experts_on"]) == 1


def _model(cfg):
    from sleepray.models import resolve_model_path
    return resolve_model_path(cfg.model.path)


def test_merged_bases_before_a_rebuild_are_ignored(tmp_path):
    store = Storage(tmp_path)
    for v in ("v0001", "v0002"):
        (store.version_dir(v) / "bank").mkdir(parents=True)
        (store.version_dir(v) / "lineage.json").write_text("{}")
    (store.base_dir("v0001")).mkdir(parents=True)
    (store.base_dir("v0001") / "config.json").write_text("{}")
    assert store.latest_base() == store.base_dir("v0001") and store.starting_bank() == store.version_dir("v0002") / "bank"
    rec = store.sleep_dir("s0003")
    rec.mkdir(parents=True)          # a rebuild that is running
    (rec / "record.json").write_text(json.dumps({"version": "v0003", "rebuild": {"forgotten": ["x"]}}))
    assert store.latest_rebuild() == "v0003"
    assert store.latest_base() is None and store.starting_bank() is None
