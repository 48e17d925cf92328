"""User data -> episodes: JSONL or Parquet records of documents and QA pairs.

Each record is either ``{"document": str, "episode": optional str|int}`` or
``{"question": str, "answer": str, "episode": optional str|int}``. Documents are memory:
what a sleep learns from. Question/answer pairs are evaluation data only (an episode's
``probes``, phrasing ``"unseen"``): they never enter the MemoryStore, so no sleep sees
them, unless ``world.qa_as_memory=true`` opts in by name (``sleepray.stream``). Records with an
``episode`` are grouped by it; records without one go into automatic episodes of
``chunk`` documents in file order, named ``chunk-0``, ``chunk-1``, ... (a QA pair joins
the automatic episode of the documents before it). Episodes come out in order of first appearance. Bad input
raises ``ValueError`` naming the file and the line (JSONL) or row (Parquet).
In Parquet a null cell counts as an absent key.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

from sleepray.world import Episode, Probe

JSONL_EXTS = {".jsonl", ".ndjson"}
PARQUET_EXTS = {".parquet", ".pq"}
_SHAPES = ({"document"}, {"question", "answer"})


def _iter_jsonl(path: Path) -> Iterator[tuple[str, object]]:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ValueError(f"{path}: cannot read file: {err}") from None
    for n, line in enumerate(raw.splitlines(), start=1):
        where = f"{path}: line {n}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{where}: not valid UTF-8: {err}") from None
        if not text.strip():
            continue
        try:
            yield where, json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON: {err}") from None


def _iter_parquet(path: Path) -> Iterator[tuple[str, object]]:
    import pyarrow.parquet as pq
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as err:  # missing file, not parquet, corrupt ...
        raise ValueError(f"{path}: cannot read Parquet file: {err}") from None
    for n, row in enumerate(rows, start=1):
        yield f"{path}: row {n}", {k: v for k, v in row.items() if v is not None}


def iter_records(path: str | Path) -> Iterator[tuple[str, dict]]:
    """Validated records of one file as ``(location, record)``; location names file and line/row."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext in JSONL_EXTS:
        source = _iter_jsonl(path)
    elif ext in PARQUET_EXTS:
        source = _iter_parquet(path)
    else:
        raise ValueError(f"{path}: unsupported extension {ext!r}; "
                         f"use one of {sorted(JSONL_EXTS | PARQUET_EXTS)}")
    for where, rec in source:
        yield where, _validate(where, rec)


def _validate(where: str, rec: object) -> dict:
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: record must be a JSON object, got {type(rec).__name__}")
    keys = set(rec) - {"episode"}
    if keys not in _SHAPES:
        raise ValueError(f"{where}: unknown record shape with keys {sorted(rec)}; expected "
                         "{document, episode?} or {question, answer, episode?}")
    for k in keys:
        v = rec[k]
        if not isinstance(v, str):
            raise ValueError(f"{where}: field {k!r} must be a string, got {type(v).__name__}")
        if not v.strip():
            raise ValueError(f"{where}: field {k!r} is empty")
    if "episode" in rec:
        ep = rec["episode"]
        if isinstance(ep, bool) or not isinstance(ep, (str, int)):
            raise ValueError(f"{where}: field 'episode' must be a string or an integer, "
                             f"got {type(ep).__name__}")
        if isinstance(ep, str) and not ep.strip():
            raise ValueError(f"{where}: field 'episode' is empty")
    return rec


def load_episodes(paths: str | Path | Iterable[str | Path], chunk: int = 8) -> list[Episode]:
    """Episodes from one or more JSONL/Parquet files (records taken in file order)."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if isinstance(paths, (str, Path)):
        paths = [paths]
    episodes: dict[str, Episode] = {}
    auto_n, auto_id = 0, None  # the open automatic episode
    for path in paths:
        for where, rec in iter_records(path):
            if "episode" in rec:
                eid = str(rec["episode"])
            else:
                cur = episodes.get(auto_id) if auto_id else None
                if cur is None or ("document" in rec and len(cur.documents) >= chunk):
                    auto_id = f"chunk-{auto_n}"
                    auto_n += 1
                eid = auto_id
            ep = episodes.setdefault(eid, Episode(eid, [], []))
            if "document" in rec:
                ep.documents.append(rec["document"])
            else:
                # evaluation data: another person's later question, never seen by a sleep
                ep.probes.append(Probe(rec["question"], rec["answer"], entity="", attribute="user",
                                       phrasing="unseen"))
    return list(episodes.values())


def episode_records(episodes: Iterable[Episode]) -> list[dict]:
    """The records that ``load_episodes`` reads back into the same episodes."""
    out: list[dict] = []
    for ep in episodes:
        out += [{"document": d, "episode": ep.episode_id} for d in ep.documents]
        out += [{"question": p.question, "answer": p.answer, "episode": ep.episode_id}
                for p in ep.probes]
    return out


def write_jsonl(episodes: Iterable[Episode], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for rec in episode_records(episodes):
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path


def write_parquet(episodes: Iterable[Episode], path: str | Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recs = episode_records(episodes)
    cols = {k: [r.get(k) for r in recs] for k in ("document", "question", "answer", "episode")}
    pq.write_table(pa.table({k: pa.array(v, type=pa.string()) for k, v in cols.items()}), path)
    return path
