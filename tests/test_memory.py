"""MemoryStore: durable append-only episodes, ledger, verification and quarantine."""
from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import stat
import threading

import pytest

from sleepray import memory as memory_mod
from sleepray.memory import (AlreadyConsolidatedError, EPISODE_SCHEMA, MemoryStore,
                             VerifyReport)
from sleepray.world import Episode, Fact, Probe, World


def rec(eid: str, text: str = "Ada Lovelace was born in London.", **kw) -> dict:
    r = {"episode_id": eid, "kind": "document", "text": text, "source": "test"}
    r.update(kw)
    return r


def ids(rows) -> list[str]:
    return [r["episode_id"] for r in rows]


def test_round_trip(tmp_path):
    store = MemoryStore(tmp_path / "mem")
    ep = World(0).episode(0)
    receipt = store.append([rec("a"), rec("b", text="one two three", n_tokens=7), ep])
    assert receipt.episode_ids == ["a", "b", ep.episode_id]
    assert receipt.segment.endswith(".parquet") and len(receipt.sha256) == 64
    seg = tmp_path / "mem" / "segments" / receipt.segment
    assert seg.exists()
    assert (seg.parent / (seg.name + ".sha256")).read_text().split()[0] == receipt.sha256

    rows = store.episodes()
    assert ids(rows) == ["a", "b", ep.episode_id]
    a = rows[0]
    assert a["kind"] == "document" and a["documents"] == [a["text"]]
    assert a["n_tokens"] == 6 and rows[1]["n_tokens"] == 7
    assert a["created_at"].tzinfo is not None and a["source"] == "test"
    assert store.table().schema.names == [n for n in EPISODE_SCHEMA.names
                                          if n not in ("probes", "eval_answers", "eval_facts")]
    # a world episode enters memory as its documents: its questions, answers and facts stay out
    assert ep.probes and ep.facts
    back = store.export_episodes()[2]
    assert back == Episode(ep.episode_id, ep.documents, [], [])
    assert store.pressure() == {"short_term_episodes": 3,
                                "short_term_tokens": 6 + 7 + len(ep.context.split())}


def test_evaluation_data_never_enters_memory(tmp_path):
    """Questions, answers and facts are refused with a clear error, nothing written; an Episode's
    are dropped; not a byte of them reaches the segment files."""
    store = MemoryStore(tmp_path)
    store.append([rec("x")])
    before = sorted(os.listdir(tmp_path / "segments"))
    for field, value in (("probes", [{"question": "Where was Ada born?"}]), ("eval_answers", ["London"]),
                         ("facts", [{"entity": "Ada", "kind": "person", "attribute": "birth_city",
                                     "value": "London"}])):
        with pytest.raises(ValueError, match=rf"record 1: field\(s\) \['{field}'\] hold evaluation data"):
            store.append([rec("a"), {**rec("b"), field: value}])
    assert sorted(os.listdir(tmp_path / "segments")) == before
    ep = Episode("u1", ["Ada Lovelace lived in London."], [Fact("Ada", "person", "hobby", "zqchess")],
                 [Probe("Which zqsecret question is this?", "zqanswer", "Ada", "hobby")])
    store.append([ep])
    raw = b"".join(p.read_bytes() for p in (tmp_path / "segments").iterdir())
    import io
    import pyarrow.parquet as pq
    text = json.dumps([pq.read_table(io.BytesIO((tmp_path / "segments" / n).read_bytes())).to_pylist()
                       for n in os.listdir(tmp_path / "segments") if n.endswith(".parquet")], default=str)
    assert "zqsecret" not in text and "zqanswer" not in text and "zqchess" not in text
    assert b"zqsecret" not in raw or "zqsecret" not in text  # compressed on disk: the decoded table decides
    assert store.export_episodes()[-1] == Episode("u1", ep.documents, [], [])


def test_an_older_segment_with_questions_hands_none_out(tmp_path):
    """Segments written before evaluation data was kept out may hold questions and answers:
    they are never handed out."""
    import pyarrow as pa
    store = MemoryStore(tmp_path)
    store.append([rec("a")])
    seg = next((tmp_path / "segments").glob("*.parquet"))
    import pyarrow.parquet as pq
    row = pq.read_table(seg).to_pylist()[0]
    row.update(episode_id="old", probes=[{"question": "Where was zqAda born?", "entity": "", "attribute": ""}],
               eval_answers=["zqLondon"])
    # an old-style segment, written by hand with its checksum
    t = pa.Table.from_pylist([row], schema=EPISODE_SCHEMA)
    name = seg.name.replace("000000000001", "000000000002")
    pq.write_table(t, tmp_path / "segments" / name)
    import hashlib
    digest = hashlib.sha256((tmp_path / "segments" / name).read_bytes()).hexdigest()
    (tmp_path / "segments" / (name + ".sha256")).write_text(f"{digest}  {name}\n")
    fresh = MemoryStore(tmp_path)
    assert ids(fresh.episodes()) == ["a", "old"]
    assert "probes" not in fresh.episodes()[1] and "eval_answers" not in fresh.episodes()[1]
    assert fresh.export_episodes()[1].probes == [] and "zq" not in json.dumps(fresh.episodes(), default=str)


@pytest.mark.parametrize("bad, field", [
    ({"kind": "tweet"}, "kind"),
    ({"text": ""}, "text"),
    ({"episode_id": 3}, "episode_id"),
    ({"n_tokens": -1}, "n_tokens"),
    ({"documents": "not a list"}, "documents"),
    ({"probes": [{"question": "q", "answer": "a"}]}, "probes"),
    ({"colour": "red"}, "colour"),
])
def test_bad_record_writes_nothing(tmp_path, bad, field):
    store = MemoryStore(tmp_path)
    store.append([rec("x")])
    before = sorted(os.listdir(tmp_path / "segments"))
    batch = [rec("a"), rec("b"), {**rec("c"), **bad}]
    with pytest.raises(ValueError, match=rf"record 2.*{field}"):
        store.append(batch)
    assert sorted(os.listdir(tmp_path / "segments")) == before
    assert ids(MemoryStore(tmp_path).episodes()) == ["x"]


def test_duplicates_rejected(tmp_path):
    store = MemoryStore(tmp_path)
    with pytest.raises(ValueError, match="record 1.*duplicates record 0"):
        store.append([rec("a"), rec("a")])
    store.append([rec("a")])
    with pytest.raises(ValueError, match="record 1.*'a'.*already in the store"):
        store.append([rec("b"), rec("a")])
    with pytest.raises(ValueError, match="already in the store"):
        MemoryStore(tmp_path).append([rec("a")])  # a fresh instance knows too
    assert ids(store.episodes()) == ["a"]
    with pytest.raises(ValueError, match="no records"):
        store.append([])


def test_durable_and_fsynced(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def counting(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        return real(fd)

    store = MemoryStore(tmp_path)
    store.verify()
    monkeypatch.setattr(os, "fsync", counting)
    store.append([rec("a")])
    files, dirs = synced.count(False), synced.count(True)
    assert files >= 2 and dirs >= 1  # segment + sidecar files, the segments directory
    monkeypatch.setattr(os, "fsync", real)
    # a new instance (as after a restart) sees what was acknowledged
    assert ids(MemoryStore(tmp_path).episodes()) == ["a"]

    synced.clear()
    monkeypatch.setattr(os, "fsync", counting)
    store.mark_consolidated(["a"], "sleep-1")
    assert synced.count(False) >= 1  # the ledger record


def test_consolidation(tmp_path):
    store = MemoryStore(tmp_path)
    store.append([rec("a"), rec("b"), rec("c")])
    assert store.mark_consolidated(["a", "b"], "sleep-1", adapter_version="v1") == ["a", "b"]
    assert ids(store.episodes()) == ["c"]
    assert ids(store.episodes("consolidated")) == ["a", "b"]
    assert ids(store.episodes("all")) == ["a", "b", "c"]
    assert store.pressure()["short_term_episodes"] == 1
    # idempotent for the same sleep: no new ledger record
    n_lines = len((tmp_path / "ledger.jsonl").read_text().splitlines())
    assert store.mark_consolidated(["a", "b"], "sleep-1") == []
    assert store.mark_consolidated(["b", "a"], "sleep-1") == []
    assert len((tmp_path / "ledger.jsonl").read_text().splitlines()) == n_lines
    # another sleep can't train them again, nothing is recorded
    with pytest.raises(AlreadyConsolidatedError, match="another sleep"):
        store.mark_consolidated(["c", "a"], "sleep-2")
    assert store.status_of("c") == "short_term"
    with pytest.raises(ValueError, match="unknown"):
        store.mark_consolidated(["zzz"], "sleep-2")
    # state survives a restart
    fresh = MemoryStore(tmp_path)
    assert ids(fresh.episodes()) == ["c"]
    assert fresh.consolidated_by("sleep-1") == ["a", "b"]
    with pytest.raises(AlreadyConsolidatedError):
        fresh.mark_consolidated(["b"], "sleep-2")
    rec0 = json.loads((tmp_path / "ledger.jsonl").read_text().splitlines()[0])
    assert rec0["op"] == "consolidated" and rec0["adapter_version"] == "v1"


def test_delete(tmp_path):
    store = MemoryStore(tmp_path)
    store.append([rec("a", n_tokens=5), rec("b", n_tokens=3)])
    assert store.delete(["a"], reason="user request") == ["a"]
    assert store.delete(["a"]) == []
    assert ids(store.episodes()) == ["b"]
    assert ids(store.episodes("all")) == ["b"]
    assert ids(store.episodes("deleted")) == ["a"]
    assert store.pressure() == {"short_term_tokens": 3, "short_term_episodes": 1}
    with pytest.raises(ValueError, match="deleted"):
        store.mark_consolidated(["a", "b"], "sleep-1")
    assert store.status_of("b") == "short_term"  # nothing recorded for b either
    with pytest.raises(ValueError, match="unknown"):
        store.delete(["nope"])
    # a consolidated episode that is deleted leaves the consolidated view too
    store.mark_consolidated(["b"], "sleep-1")
    store.delete(["b"])
    assert MemoryStore(tmp_path).episodes("consolidated") == []
    led = [json.loads(x) for x in (tmp_path / "ledger.jsonl").read_text().splitlines()]
    assert led[0] == {**led[0], "op": "deleted", "episode_ids": ["a"], "reason": "user request"}


def test_corrupt_and_truncated_segments_quarantined(tmp_path, caplog):
    store = MemoryStore(tmp_path)
    r1 = store.append([rec("a")])
    r2 = store.append([rec("b"), rec("c")])
    r3 = store.append([rec("d")])
    r4 = store.append([rec("e")])
    seg = tmp_path / "segments"
    p = seg / r2.segment  # flip bytes in the middle
    data = bytearray(p.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 8):
        data[i] ^= 0xFF
    p.write_bytes(bytes(data))
    p = seg / r3.segment  # truncate
    p.write_bytes(p.read_bytes()[: len(data) // 3])
    (seg / (r4.segment + ".sha256")).unlink()  # checksum lost

    fresh = MemoryStore(tmp_path)
    with caplog.at_level(logging.WARNING, logger="sleepray.memory"):
        assert ids(fresh.episodes()) == ["a"]  # lazy verify on first read
    assert "quarantined" in caplog.text
    q = tmp_path / "quarantine"
    for r, why in ((r2, "sha256 mismatch"), (r3, "sha256 mismatch"),
                   (r4, "missing checksum sidecar")):
        assert not (seg / r.segment).exists() and (q / r.segment).exists()
        info = json.loads((q / (r.segment + ".reason.json")).read_text())
        assert info["segment"] == r.segment and why in info["reason"]
    assert (seg / r1.segment).exists()

    report = fresh.verify()
    assert isinstance(report, VerifyReport)
    assert report.ok == [r1.segment] and report.quarantined == []
    # the store keeps working; sequence numbers are not reused
    r5 = fresh.append([rec("f")])
    assert r5.segment > r4.segment
    assert ids(MemoryStore(tmp_path).episodes()) == ["a", "f"]


def test_verify_reports_quarantine(tmp_path):
    store = MemoryStore(tmp_path)
    r = store.append([rec("a")])
    p = tmp_path / "segments" / r.segment
    p.write_bytes(p.read_bytes()[:-10])
    report = store.verify()
    assert report.ok == [] and report.quarantined[0]["segment"] == r.segment
    assert "sha256" in report.quarantined[0]["reason"]
    assert store.episodes() == [] and store.pressure()["short_term_episodes"] == 0


def test_truncated_ledger_line(tmp_path, caplog):
    store = MemoryStore(tmp_path)
    store.append([rec("a"), rec("b"), rec("c")])
    store.mark_consolidated(["a"], "sleep-1")
    with open(tmp_path / "ledger.jsonl", "ab") as f:  # crash mid-write
        f.write(b'{"op": "consolidated", "episode_ids": ["b"], "sle')
    fresh = MemoryStore(tmp_path)
    with caplog.at_level(logging.WARNING, logger="sleepray.memory"):
        assert ids(fresh.episodes()) == ["b", "c"]
    assert "truncated" in caplog.text
    assert fresh.verify().ledger_torn
    # the next write cuts the torn tail off, and the ledger is clean again
    fresh.mark_consolidated(["b"], "sleep-2")
    lines = (tmp_path / "ledger.jsonl").read_text().splitlines()
    assert [json.loads(x)["episode_ids"] for x in lines] == [["a"], ["b"]]
    again = MemoryStore(tmp_path)
    assert ids(again.episodes()) == ["c"] and again.verify().clean


def test_leftover_temp_files_ignored(tmp_path):
    store = MemoryStore(tmp_path)
    store.append([rec("a")])
    seg = tmp_path / "segments"
    # simulated crashes: a half-written temp segment, and a sidecar whose segment
    # never got renamed into place
    (seg / ".tmp-seg-000000000002.parquet.123-abcd").write_bytes(b"PAR1 half")
    (seg / "seg-000000000002.parquet.sha256").write_text("0" * 64 + "  x\n")
    fresh = MemoryStore(tmp_path)
    report = fresh.verify()
    assert len(report.removed_temp) == 2 and report.quarantined == []
    assert sorted(os.listdir(seg)) == ["seg-000000000001.parquet",
                                       "seg-000000000001.parquet.sha256"]
    assert ids(fresh.episodes()) == ["a"]
    assert fresh.append([rec("b")]).segment == "seg-000000000002.parquet"


def _append_many(root: str, worker: int, n: int) -> None:
    store = MemoryStore(root)
    for i in range(n):
        store.append([rec(f"w{worker}-{i}", text=f"worker {worker} item {i}")])


def test_concurrent_processes(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(str(tmp_path), w, 20)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    rows = MemoryStore(tmp_path).episodes()
    assert sorted(ids(rows)) == sorted(f"w{w}-{i}" for w in range(2) for i in range(20))
    segs = [n for n in os.listdir(tmp_path / "segments") if n.endswith(".parquet")]
    assert len(segs) == len(set(segs)) == 40
    assert not [n for n in os.listdir(tmp_path / "segments") if n.startswith(".tmp-")]
    assert MemoryStore(tmp_path).verify().ok == sorted(segs)


def test_concurrent_threads(tmp_path):
    store = MemoryStore(tmp_path)
    errors = []

    def work(w):
        try:
            for i in range(10):
                store.append([rec(f"t{w}-{i}")])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(MemoryStore(tmp_path).episodes()) == 40


def test_episode_objects_and_dict_variants(tmp_path):
    store = MemoryStore(tmp_path)
    ep = Episode("u1", ["doc one.", "doc two."], [Fact("X", "person", "hobby", "chess")],
                 [Probe("What does X enjoy?", "chess", "X", "hobby")])
    store.append([ep, {"episode_id": "i1", "kind": "interaction",
                       "text": "User: hi\nAssistant: hello"}])
    rows = store.episodes()
    assert rows[0]["kind"] == "episode" and rows[0]["text"] == "doc one.\ndoc two."
    assert "eval_facts" not in rows[0] and rows[1]["documents"] == []
    # a row read back can be appended again elsewhere
    other = MemoryStore(tmp_path / "copy")
    other.append(rows)
    assert other.export_episodes()[0] == Episode("u1", ep.documents, [], [])
    with pytest.raises(ValueError, match="unknown status|status must be"):
        store.episodes("awake")
    assert memory_mod.Report is VerifyReport
