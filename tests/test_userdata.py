import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sleepray.userdata import load_episodes, write_jsonl, write_parquet
from sleepray.world import Episode, Probe, World


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_keyed_and_chunked_episodes(tmp_path):
    recs = [{"document": f"doc {i}"} for i in range(3)]
    recs += [{"question": "q1?", "answer": "a1"}]
    recs += [{"document": "keyed a", "episode": "alpha"}, {"document": "doc 3"},
             {"question": "qa?", "answer": "aa", "episode": "alpha"},
             {"document": "seven", "episode": 7}, {"document": "doc 4"}]
    eps = load_episodes(_jsonl(tmp_path / "d.jsonl", recs), chunk=2)
    assert [e.episode_id for e in eps] == ["chunk-0", "chunk-1", "alpha", "7", "chunk-2"]
    by = {e.episode_id: e for e in eps}
    assert by["chunk-0"].documents == ["doc 0", "doc 1"]
    assert by["chunk-1"].documents == ["doc 2", "doc 3"]
    # a QA pair without episode joins the automatic episode of the documents before it
    assert by["chunk-1"].probes == [Probe("q1?", "a1", entity="", attribute="user", phrasing="unseen")]
    assert by["chunk-2"].documents == ["doc 4"]
    assert by["alpha"].documents == ["keyed a"]
    assert by["alpha"].probes == [Probe("qa?", "aa", "", "user", "unseen")]
    assert by["7"].documents == ["seven"]
    assert all(e.facts == [] for e in eps)


def test_default_chunk_and_blank_lines(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"document": f"d{i}"}) for i in range(10)) + "\n\n  \n")
    eps = load_episodes(p)
    assert [len(e.documents) for e in eps] == [8, 2]


def _world_episodes():
    eps = World(1, people_per_episode=2).episodes(2)
    eps.append(Episode("user-1", ["only a doc"], []))
    eps.append(Episode("3", [], [], [Probe("q only?", "yes", "", "user", "unseen")]))
    return eps


def _as_user(eps):
    return [(e.episode_id, e.documents, [(p.question, p.answer) for p in e.probes]) for e in eps]


@pytest.mark.parametrize("writer,name", [(write_jsonl, "rt.jsonl"), (write_parquet, "rt.parquet")])
def test_round_trip(tmp_path, writer, name):
    eps = _world_episodes()
    path = writer(eps, tmp_path / name)
    back = load_episodes(path)
    assert _as_user(back) == _as_user(eps)
    assert all(p.attribute == "user" and p.entity == "" for e in back for p in e.probes)
    # and round-trips again unchanged
    assert _as_user(load_episodes(write_jsonl(back, tmp_path / "again.jsonl"))) == _as_user(eps)


def test_parquet_written_by_hand(tmp_path):
    table = pa.table({"document": ["d1", None, "d2"], "question": [None, "q?", None],
                      "answer": [None, "a", None]})
    pq.write_table(table, tmp_path / "x.parquet")
    [ep] = load_episodes(tmp_path / "x.parquet")
    assert ep.documents == ["d1", "d2"] and ep.probes == [Probe("q?", "a", "", "user", "unseen")]


def test_multiple_files_in_order(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [{"document": "1", "episode": "e"}])
    b = _jsonl(tmp_path / "b.jsonl", [{"document": "2", "episode": "e"}, {"document": "3"}])
    eps = load_episodes([a, b])
    assert [(e.episode_id, e.documents) for e in eps] == [("e", ["1", "2"]), ("chunk-0", ["3"])]


GOOD = json.dumps({"document": "fine"})


@pytest.mark.parametrize("bad_line,msg", [
    ('{"document": "x"', "not valid JSON"),
    ('["document"]', "must be a JSON object"),
    ('{"text": "x"}', "unknown record shape"),
    ('{"document": "x", "question": "q?", "answer": "a"}', "unknown record shape"),
    ('{"question": "q?"}', "unknown record shape"),
    ('{"answer": "a"}', "unknown record shape"),
    ('{"document": "x", "extra": 1}', "unknown record shape"),
    ('{"document": ""}', "'document' is empty"),
    ('{"document": "   "}', "'document' is empty"),
    ('{"question": "q?", "answer": ""}', "'answer' is empty"),
    ('{"document": 5}', "'document' must be a string"),
    ('{"document": null}', "'document' must be a string"),
    ('{"question": ["q"], "answer": "a"}', "'question' must be a string"),
    ('{"document": "x", "episode": 1.5}', "'episode' must be a string or an integer"),
    ('{"document": "x", "episode": true}', "'episode' must be a string or an integer"),
    ('{"document": "x", "episode": ""}', "'episode' is empty"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, bad_line, msg):
    p = tmp_path / "bad.jsonl"
    p.write_text(f"{GOOD}\n\n{GOOD}\n{bad_line}\n{GOOD}\n")
    with pytest.raises(ValueError) as err:
        load_episodes(p)
    text = str(err.value)
    assert str(p) in text and "line 4" in text and msg in text


def test_invalid_utf8(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(GOOD.encode() + b"\n\xff\xfe\n")
    with pytest.raises(ValueError, match="line 2: not valid UTF-8"):
        load_episodes(p)


def test_parquet_errors_name_row(tmp_path):
    p = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"document": ["ok", None, "ok"], "question": [None, "q?", None]}), p)
    with pytest.raises(ValueError, match=r"bad\.parquet: row 2: unknown record shape"):
        load_episodes(p)
    p2 = tmp_path / "bad2.parquet"
    pq.write_table(pa.table({"document": ["ok", "x"], "episode": [1.0, 2.0]}), p2)
    with pytest.raises(ValueError, match=r"row 1: field 'episode' must be a string or an integer"):
        load_episodes(p2)


def test_unreadable_and_unsupported(tmp_path):
    with pytest.raises(ValueError, match="cannot read file"):
        load_episodes(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="cannot read Parquet file"):
        load_episodes(tmp_path / "missing.parquet")
    junk = tmp_path / "junk.parquet"
    junk.write_text("not parquet at all")
    with pytest.raises(ValueError, match=r"junk\.parquet: cannot read Parquet file"):
        load_episodes(junk)
    csv = tmp_path / "data.csv"
    csv.write_text("document\nx\n")
    with pytest.raises(ValueError, match=r"data\.csv: unsupported extension '\.csv'"):
        load_episodes(csv)
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        load_episodes(csv, chunk=0)


def test_question_answer_records_are_evaluation_only_unless_opted_in_by_name(tmp_path):
    """{question, answer} records never become memory; world.qa_as_memory=true is the one opt-in,
    and an evaluation refuses such a stream (it would grade what the sleeps trained on)."""
    from sleepray.config import load_config
    from sleepray.eval_run import Stream
    from sleepray.memory import MemoryStore
    from sleepray.stream import episodes_from_config, evaluation_episodes
    path = tmp_path / "u.jsonl"
    path.write_text('{"document": "Ann Lee was born in Paris.", "episode": "e"}\n'
                    '{"question": "Where was Ann Lee born?", "answer": "Paris", "episode": "e"}\n')
    cfg = load_config(None, ["world.source=file", f"world.data_path={path}"])
    (ep,) = evaluation_episodes(cfg.world)
    assert ep.documents == ["Ann Lee was born in Paris."] and [p.question for p in ep.probes] == [
        "Where was Ann Lee born?"]
    store = MemoryStore(tmp_path / "m")
    store.append([ep])
    assert store.export_episodes() == [Episode("e", ["Ann Lee was born in Paris."], [], [])]
    assert len(Stream(cfg).episodes) == 1
    opted = load_config(None, ["world.source=file", f"world.data_path={path}", "world.qa_as_memory=true"])
    (mem,) = episodes_from_config(opted.world)
    assert mem.documents == ["Ann Lee was born in Paris.", "Q: Where was Ann Lee born?\nA: Paris"]
    assert [p.phrasing for p in mem.probes] == ["trained"]  # never reported as an unseen question
    with pytest.raises(ValueError, match="qa_as_memory=true puts the question/answer records into memory"):
        evaluation_episodes(opted.world)
    with pytest.raises(ValueError, match="qa_as_memory"):
        Stream(opted)
    with pytest.raises(ValueError, match="world.source=file only"):
        episodes_from_config(load_config(None, ["world.qa_as_memory=true"]).world)


def test_an_evaluation_refuses_questions_with_no_document_to_learn_them_from(tmp_path):
    from sleepray.config import load_config
    from sleepray.eval_run import Stream
    path = tmp_path / "u.jsonl"
    path.write_text('{"document": "Ann Lee was born in Paris.", "episode": "e"}\n'
                    '{"question": "Where was Ann Lee born?", "answer": "Paris", "episode": "e"}\n'
                    '{"question": "Where was Bo born?", "answer": "Rome", "episode": "f"}\n')
    with pytest.raises(ValueError, match=r"\['f'\] have questions but no document"):
        Stream(load_config(None, ["world.source=file", f"world.data_path={path}"]))
