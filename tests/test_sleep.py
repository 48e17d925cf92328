"""`sleepray memory add` + `sleepray sleep --phase nrem` over a storage folder, with a crash."""
import json

import pytest
from peft import PeftModel

from jobs.cli import main
from sleepray.config import load_config
from sleepray.memory import MemoryStore
from sleepray.models import load_model, resolve_model_path
from sleepray.sleep import sleep_nrem
from sleepray.storage import Storage
from sleepray.world import World


@pytest.fixture
def overrides(tmp_path, seed_test_model):
    return [f"cycle.storage={tmp_path}", "model.path=seed:test", "world.n_episodes=2",
            "world.people_per_episode=1", "world.orgs_per_episode=0", "world.places_per_episode=0",
            "world.phrasings_per_fact=1", "world.seed=10000900", "nrem.judge=exact", "nrem.steps=4",
            "nrem.batch_size=4", "nrem.prompts_per_episode=8"]


def test_sleep_writes_a_versioned_adapter_and_marks_episodes(tmp_path, overrides, capsys):
    assert main(["memory", "add", *overrides]) == 0
    assert main(["sleep", "--phase", "nrem", *overrides]) == 0
    v = Storage(tmp_path).latest_version()
    assert v is not None and v.name == "v0001"
    lineage = json.loads((v / "lineage.json").read_text())
    assert lineage["episodes"] == ["w10000900-e0", "w10000900-e1"]
    assert lineage["parent"] is None and lineage["metrics"]["nrem"]["prompts"] == 16
    assert lineage["config"]["nrem"]["steps"] == 4
    assert (v / "adapter_model.safetensors").is_file() and (v / "bank" / "bank.json").is_file()
    store = MemoryStore(Storage(tmp_path).memory)
    assert store.pressure()["short_term_episodes"] == 0
    assert sorted(store.consolidated_by("v0001")) == lineage["episodes"]
    # the artifact loads as a plain PEFT adapter
    cfg = load_config(None, overrides)
    base, _ = load_model(resolve_model_path(cfg.model.path))
    PeftModel.from_pretrained(base, str(v))
    # nothing left: a second sleep trains nothing and writes no version
    assert main(["sleep", *overrides]) == 0
    assert "nothing to consolidate" in capsys.readouterr().out
    assert len(Storage(tmp_path).versions()) == 1


def test_crash_after_publish_resumes_without_retraining(tmp_path, overrides, monkeypatch):
    cfg = load_config(None, overrides)
    assert main(["memory", "add", *overrides]) == 0
    store_cls = MemoryStore

    def boom(self, *a, **k):
        raise RuntimeError("killed before marking")
    monkeypatch.setattr(store_cls, "mark_consolidated", boom)
    with pytest.raises(RuntimeError, match="killed"):
        sleep_nrem(cfg, progress=False)
    monkeypatch.undo()
    assert len(Storage(tmp_path).versions()) == 1  # the adapter landed
    assert MemoryStore(Storage(tmp_path).memory).pressure()["short_term_episodes"] == 2
    from sleepray.sleep_record import records
    rec = records(Storage(tmp_path))[0]
    assert rec.is_done("nrem") and not rec.is_done("publish")
    trained_at = rec.metrics("nrem")["finished_at"]
    # the next sleep resumes at publish: it finishes the marking and trains nothing again
    assert sleep_nrem(cfg, progress=False) == Storage(tmp_path).versions()[0]
    rec = records(Storage(tmp_path))[0]
    assert rec.complete and rec.metrics("nrem")["finished_at"] == trained_at
    assert sleep_nrem(cfg, progress=False) is None
    store = MemoryStore(Storage(tmp_path).memory)
    assert store.pressure()["short_term_episodes"] == 0
    assert len(store.consolidated_by("v0001")) == 2 and len(Storage(tmp_path).versions()) == 1


def test_second_sleep_stacks_a_new_expert(tmp_path, overrides):
    one = [*overrides, "world.n_episodes=1"]
    cfg = load_config(None, one)
    assert main(["memory", "add", *one]) == 0
    first = sleep_nrem(cfg, progress=False)
    MemoryStore(Storage(tmp_path).memory).append([World(10000901, 1, 0, 0, 1).episode(0)])
    second = sleep_nrem(cfg, progress=False)
    lin = json.loads((second / "lineage.json").read_text())
    assert lin["parent"] == first.name and len(lin["experts_on"]) == 2
    assert lin["episodes"] == ["w10000901-e0"]


def test_free_text_memories_get_model_written_questions(tmp_path, overrides):
    from sleepray.prompts import grounded, model_question_writer
    from sleepray.banks import load_bank
    from sleepray.world import Episode
    cfg = load_config(None, overrides)
    # names from the seed model's lexicon: the tiny seed models copy those into their questions,
    # not names outside it (for "Zoubrel Kanth" they write none that is grounded)
    from sleepray.world import World
    doc = World(10_600_123, 1, 0, 0, 1).episode(0).documents[0]
    MemoryStore(Storage(tmp_path).memory).append([Episode("user-1", [doc], facts=[])])
    bank, tok, _ = load_bank(cfg, tmp_path)
    qs = model_question_writer(bank, tok, seed=3)(doc, 4)
    assert 1 <= len(qs) <= 4 and all(q.endswith("?") and grounded(q, doc) for q in qs)
    assert len(set(qs)) == len(qs)
    assert model_question_writer(bank, tok, seed=3)(doc, 4) == qs  # seeded: a redone sleep writes the same
    v = sleep_nrem(cfg, progress=False)
    assert json.loads((v / "lineage.json").read_text())["episodes"] == ["user-1"]
