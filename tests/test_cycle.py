"""The sleep state machine in one process: NREM -> REM -> publish -> deep, durable per phase."""
import json

import pyarrow.parquet as pq
import pytest

from sleepray.config import load_config
from sleepray.memory import MemoryStore
from sleepray.replay import ReplayBuffer
from sleepray.sleep import LocalBackend, run_sleep
from sleepray.sleep_record import records
from sleepray.storage import Storage
from sleepray.world import World

FAST = ["model.path=seed:test", "nrem.judge=exact", "nrem.steps=3", "nrem.batch_size=4",
        "nrem.prompts_per_episode=4", "rem.dreams_per_episode=2", "rem.formats=[qa,rewrite]",
        "rem.keep_top_k=1", "rem.keep_random=1", "rem.trial_steps=1", "rem.restem_steps=1",
        "rem.sft_steps=2", "rem.probes_per_episode=2", "rem.max_new_tokens=16",
        "experts.deep_sleep_every=2"]


@pytest.fixture
def cfg(tmp_path, seed_test_model):
    return load_config(None, [f"cycle.storage={tmp_path}", *FAST])


def _add(tmp_path, world_seed, n=1):
    w = World(world_seed, 1, 0, 0, 1)
    MemoryStore(Storage(tmp_path).memory).append([w.episode(i) for i in range(n)])


def test_two_sleeps_run_every_phase_and_deep_sleep_merges(tmp_path, cfg):
    _add(tmp_path, 5001)
    first = run_sleep(cfg, tmp_path, progress=False)
    assert first.phases == ["nrem", "rem", "publish"] and first.complete
    dreams = pq.read_table(first.dir / "rem" / "dreams.parquet").to_pylist()
    assert len(dreams) == 2  # m per episode, over the formats
    # every dream trained into the expert is kept for replay, and only those, with the
    # teacher's probe answers (rem.replay_probes)
    probes = pq.read_table(first.dir / "rem" / "probes.parquet").num_rows
    assert len(ReplayBuffer(Storage(tmp_path).replay)) == sum(d["trained"] for d in dreams) + probes
    lin = json.loads((tmp_path / "adapters" / "v0001" / "lineage.json").read_text())
    assert lin["phase"] == "nrem+rem" and lin["metrics"]["rem"]["dreams"] == 2
    _add(tmp_path, 5002)
    second = run_sleep(cfg, tmp_path, trigger="pressure", progress=False)
    assert second.phases == ["nrem", "rem", "publish", "deep"] and second.complete
    assert (Storage(tmp_path).base_dir("v0002") / "model.safetensors").is_file()
    lin2 = json.loads((tmp_path / "adapters" / "v0002" / "lineage.json").read_text())
    assert lin2["parent"] == "v0001" and len(lin2["experts_on"]) == 2 and lin2["trigger"] == "pressure"
    # the third sleep starts on the merged base with one fresh expert
    _add(tmp_path, 5003)
    run_sleep(cfg, tmp_path, progress=False)
    lin3 = json.loads((tmp_path / "adapters" / "v0003" / "lineage.json").read_text())
    assert lin3["base_model"].endswith("bases/v0002") and len(lin3["experts_on"]) == 1
    store = MemoryStore(Storage(tmp_path).memory)
    assert store.pressure()["short_term_episodes"] == 0 and len(Storage(tmp_path).versions()) == 3


class _Crash(Exception):
    pass


class _CrashingBackend(LocalBackend):
    def __init__(self, phase):
        super().__init__(progress=False)
        self.phase = phase

    def rem(self, *a, **k):
        if self.phase == "rem":
            raise _Crash("killed in REM")
        return super().rem(*a, **k)

    def published(self, version_dir):
        if self.phase == "publish":
            raise _Crash("killed after the adapter landed")


@pytest.mark.parametrize("phase", ["rem", "publish"])
def test_a_crash_resumes_at_the_unfinished_phase_without_retraining(tmp_path, cfg, phase):
    _add(tmp_path, 5004, n=2)
    with pytest.raises(_Crash):
        run_sleep(cfg, tmp_path, backend=_CrashingBackend(phase))
    rec = records(Storage(tmp_path))[0]
    assert rec.is_done("nrem") and not rec.complete
    nrem_at = rec.metrics("nrem")["finished_at"]
    # killed in REM: nothing consolidated yet; killed after publishing: marked, not recorded
    left = MemoryStore(Storage(tmp_path).memory).pressure()["short_term_episodes"]
    assert left == (2 if phase == "rem" else 0)
    again = run_sleep(cfg, tmp_path, progress=False)
    assert again.sleep_id == rec.sleep_id and again.complete
    assert again.metrics("nrem")["finished_at"] == nrem_at      # NREM was not run twice
    store = MemoryStore(Storage(tmp_path).memory)
    assert sorted(store.consolidated_by(again.version)) == sorted(rec.episodes)
    assert len(Storage(tmp_path).versions()) == 1 and run_sleep(cfg, tmp_path, progress=False) is None


def test_a_memory_deleted_during_a_sleep_is_never_consolidated(tmp_path, cfg):
    _add(tmp_path, 5005, n=2)
    store = MemoryStore(Storage(tmp_path).memory)
    gone = store.episodes()[0]["episode_id"]

    class DeleteAfterNREM(LocalBackend):
        def rem(self, *a, **k):
            MemoryStore(Storage(tmp_path).memory).delete([gone], reason="user asked")
            return super().rem(*a, **k)
    rec = run_sleep(cfg, tmp_path, backend=DeleteAfterNREM(progress=False))
    lin = json.loads((Storage(tmp_path).version_dir(rec.version) / "lineage.json").read_text())
    assert gone not in lin["episodes"] and len(lin["episodes"]) == 1
    assert MemoryStore(Storage(tmp_path).memory).status_of(gone) == "deleted"
