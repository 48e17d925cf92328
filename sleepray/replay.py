"""The rehearsal buffer of REM (DESIGN.md section 1, Dreaming step 5): dreams kept for
generative replay in later sleeps.

One Parquet file; every append rewrites it atomically (temporary file, fsync,
``os.replace``), so a crash leaves either the old or the new buffer, never half of
one. Rows are kept in the order they were appended and the buffer keeps at most
``capacity`` of them: the oldest are dropped first.

Columns (:data:`BUFFER_COLUMNS`): ``episode_id``, ``format``, ``prompt``, ``text``,
``score`` (selection score), ``trial_reward`` (1 / 0, null when untried), ``kept``
(selected for a trial), ``sleep_id``, ``learned`` (probe rows only: whether the model gave
that answer closed-book at the end of the sleep that wrote it; null when not measured).
Buffers written before ``learned`` existed read back with it null.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Union

import pyarrow as pa
import pyarrow.parquet as pq

from sleepray.storage import atomic_path
from sleepray.world import qa_prompt

__all__ = ["BUFFER_COLUMNS", "BUFFER_SCHEMA", "Dream", "ReplayBuffer", "probe_dream", "probe_row",
           "write_table_atomic"]


@dataclass
class Dream:
    """One self-written training text about an episode.

    ``prompt`` is what the dream writer was given (the episode followed by the format's
    cue); ``text`` is what it wrote. :attr:`sft_text` is what an expert trains on: the
    dream alone, without the episode (the student's view).
    """
    episode_id: str
    format: str  # "implications" | "qa" | "rewrite"
    prompt: str
    text: str

    @property
    def sft_text(self) -> str:
        """Blank for a blank dream; else ends its last line, as the pretraining texts do, so
        that the expert learns where an answer stops (the answer is read up to the newline)."""
        body = self.text.strip()
        if not body:
            return ""
        if self.format == "qa":  # the model wrote what follows "Q:"; keep the pair readable
            return f"Q: {body}\n"
        return body + "\n"


BUFFER_SCHEMA = pa.schema([
    ("episode_id", pa.string()),
    ("format", pa.string()),
    ("prompt", pa.string()),
    ("text", pa.string()),
    ("score", pa.float64()),
    ("trial_reward", pa.int8()),
    ("kept", pa.bool_()),
    ("sleep_id", pa.string()),
    ("learned", pa.bool_()),
])
BUFFER_COLUMNS = list(BUFFER_SCHEMA.names)


def probe_dream(episode_id: str, question: str, answer: str) -> Dream:
    """A probe question with the teacher's answer as a one-pair qa dream."""
    return Dream(episode_id, "qa", qa_prompt(question), f" {question}\nA: {answer}")


def probe_row(episode_id: str, question: str, answer: str, sleep_id: str,
              learned: Optional[bool] = None) -> dict:
    """:func:`probe_dream` as a buffer row, never a trial (``kept`` false);
    :meth:`ReplayBuffer.probe_answers` reads it back.
    ``learned``: the model gave that answer closed-book at the end of this sleep."""
    d = probe_dream(episode_id, question, answer)
    return {"episode_id": episode_id, "format": d.format, "prompt": d.prompt, "text": d.text, "kept": False,
            "sleep_id": sleep_id, "learned": learned}


def write_table_atomic(table: pa.Table, path: Union[str, os.PathLike]) -> Path:
    """Write ``table`` to ``path`` through :func:`sleepray.storage.atomic_path`."""
    with atomic_path(path) as tmp:
        pq.write_table(table, str(tmp))
    return Path(path)


class ReplayBuffer:
    """Dreams kept across sleeps, in one Parquet file at ``path`` (capped at ``capacity`` rows)."""

    def __init__(self, path: Union[str, os.PathLike], capacity: int = 2000):
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        self.path = Path(path)
        self.capacity = int(capacity)

    # ------------------------------------------------------------------ reading
    def table(self) -> pa.Table:
        if not self.path.is_file():
            return BUFFER_SCHEMA.empty_table()
        table = pq.read_table(str(self.path))
        for name in BUFFER_COLUMNS:  # a buffer from before a column existed: null there
            if name not in table.column_names:
                table = table.append_column(name, pa.nulls(table.num_rows, BUFFER_SCHEMA.field(name).type))
        return table.select(BUFFER_COLUMNS).cast(BUFFER_SCHEMA)

    def rows(self) -> list[dict]:
        return self.table().to_pylist()

    def __len__(self) -> int:
        if not self.path.is_file():
            return 0
        return pq.ParquetFile(str(self.path)).metadata.num_rows

    def episodes(self) -> set[str]:
        return set(self.table().column("episode_id").to_pylist())

    # ------------------------------------------------------------------ writing
    def append(self, rows: Iterable[dict]) -> int:
        """Append rows (dicts with the buffer columns; missing ones are null); returns the new size."""
        new = [{c: r.get(c) for c in BUFFER_COLUMNS} for r in rows]
        for r in new:
            if not r["episode_id"] or r["text"] is None:
                raise ValueError(f"buffer rows need episode_id and text: {r}")
        if not new:
            return len(self)
        table = pa.concat_tables([self.table(), pa.Table.from_pylist(new, schema=BUFFER_SCHEMA)])
        if table.num_rows > self.capacity:  # drop the oldest
            table = table.slice(table.num_rows - self.capacity)
        write_table_atomic(table, self.path)
        return table.num_rows

    def drop_sleep(self, sleep_id: str) -> int:
        """Remove the rows a sleep added (a REM phase redone after a crash adds them again)."""
        t = self.table()
        keep = [s != sleep_id for s in t.column("sleep_id").to_pylist()]
        if all(keep):
            return 0
        write_table_atomic(t.filter(pa.array(keep)), self.path)
        return keep.count(False)

    def drop_episodes(self, episode_ids: Iterable[str]) -> int:
        """Remove every row about these episodes (forgotten memories: ``sleepray.forget``)."""
        gone = set(episode_ids)
        t = self.table()
        keep = [e not in gone for e in t.column("episode_id").to_pylist()]
        if all(keep):
            return 0
        write_table_atomic(t.filter(pa.array(keep)), self.path)
        return keep.count(False)

    # ----------------------------------------------------------------- sampling
    def dreams(self, exclude_episodes: Iterable[str] = ()) -> list[Dream]:
        """Every dream in the buffer, oldest first, none about ``exclude_episodes``."""
        excluded = set(exclude_episodes)
        return [Dream(r["episode_id"], r["format"], r["prompt"] or "", r["text"])
                for r in self.rows() if r["episode_id"] not in excluded]

    def texts(self, exclude_episodes: Iterable[str] = ()) -> list[str]:
        """The training texts (:attr:`Dream.sft_text`) of every non-blank dream, none about
        ``exclude_episodes``: what NREM and REM rehearse in their KL anchor."""
        return [t for t in (d.sft_text for d in self.dreams(exclude_episodes)) if t.strip()]

    def probe_answers(self, exclude_episodes: Iterable[str] = (),
                      learned_only: bool = False) -> list[tuple[str, str, str]]:
        """(episode_id, question, answer) of every probe row (:func:`probe_row`), none about
        ``exclude_episodes``: what the model answered back then with the episode in context.
        ``learned_only``: leave out those it did not give closed-book after that sleep
        (``learned`` false; null, not measured, stays in)."""
        excluded = set(exclude_episodes)
        out = []
        for r in self.rows():
            if r["episode_id"] in excluded or r["format"] != "qa" or r["kept"]:
                continue
            if learned_only and r["learned"] is False:
                continue
            question, sep, answer = r["text"].strip().partition("\nA: ")
            if sep and r["prompt"] == qa_prompt(question) and answer.strip():
                out.append((r["episode_id"], question, answer.strip()))
        return out

    def sample(self, n: int, exclude_episodes: Iterable[str] = (),
               rng: Optional[random.Random] = None) -> list[Dream]:
        """Up to ``n`` distinct dreams, none about ``exclude_episodes``, drawn uniformly."""
        if n <= 0:
            return []
        rng = rng or random.Random()
        pool = self.dreams(exclude_episodes)
        return rng.sample(pool, min(n, len(pool)))
