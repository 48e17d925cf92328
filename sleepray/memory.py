"""The short-term memory store (L0): durable, append-only episode storage on a folder.

Layout of ``MemoryStore(root)``::

    root/
      segments/seg-000000000001.parquet         one Parquet segment per append batch
      segments/seg-000000000001.parquet.sha256  its checksum sidecar (``sha256sum`` format)
      ledger.jsonl                              append-only state changes, one JSON a line
      quarantine/                               segments that failed verification + reasons
      .lock                                     fcntl lock shared by every process

Storage is append-only. Segments are never rewritten; consolidation and deletion are
*records* in ``ledger.jsonl``:

* ``{"op": "consolidated", "episode_ids": [...], "sleep_id": ..., "adapter_version": ...}``
* ``{"op": "deleted", "episode_ids": [...], "reason": ...}``

A deleted episode's data stays in its segment on disk, but it is excluded everywhere:
it never shows up in ``episodes()`` / ``table()`` (short-term, consolidated or all),
does not count toward ``pressure()``, and can never be consolidated.

Durability: ``append`` validates the whole batch first (nothing is written when any
record is bad), writes the segment to a temp file, flushes and fsyncs it, writes and
fsyncs the checksum sidecar, renames both into place and fsyncs the directory; only
then does it return its ``AppendReceipt``. A crash before the rename leaves only temp
files, which ``verify`` removes (they were never acknowledged). Ledger records are
fsynced before the call returns; a torn last line (crash mid-write) is ignored with a
warning and cut off before the next ledger write.

Concurrency: every operation holds a ``threading.RLock`` and an exclusive ``fcntl``
lock on ``root/.lock``, so threads and several processes can share one folder.

An interaction may carry ``model_output``: the model's own answer, kept (when the user asked
for it) beside what the user sent, never in ``text`` / ``documents``: a sleep reads those
only, so it never trains on a model answer as if it were ground truth.

Memory is what a user hands over to learn: documents and conversations. Evaluation
data (questions, their answers, a world's facts) never enters it: an ``Episode`` is
stored as its documents alone, and a record that carries ``probes``, ``eval_answers``,
``facts`` or ``eval_facts`` is refused (issue 15: a sleep never sees the questions it is
graded on). The ``probes`` / ``eval_*`` columns stay in the schema, always empty, so that
segments written before this rule still read; their questions and answers are never
handed out.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sleepray.world import Episode

log = logging.getLogger(__name__)

KINDS = ("document", "interaction", "episode")
STATUSES = ("short_term", "consolidated", "all", "deleted")
HIDDEN_COLUMNS = ("probes", "eval_answers", "eval_facts")  # never handed out
EVAL_FIELDS = ("probes", "eval_answers", "facts", "eval_facts")

PROBE_TYPE = pa.struct([("question", pa.string()), ("entity", pa.string()),
                        ("attribute", pa.string())])
FACT_TYPE = pa.struct([("entity", pa.string()), ("kind", pa.string()),
                       ("attribute", pa.string()), ("value", pa.string())])

EPISODE_SCHEMA = pa.schema([
    pa.field("episode_id", pa.string(), nullable=False),
    pa.field("kind", pa.string(), nullable=False),
    pa.field("text", pa.string(), nullable=False),
    pa.field("documents", pa.list_(pa.string())),
    pa.field("probes", pa.list_(PROBE_TYPE)),          # always empty now: older segments' questions
    pa.field("eval_answers", pa.list_(pa.string())),   # always null now (older segments' answers)
    pa.field("eval_facts", pa.list_(FACT_TYPE)),       # always empty now (older segments' facts)
    pa.field("source", pa.string()),
    pa.field("created_at", pa.timestamp("us", tz="UTC")),
    pa.field("n_tokens", pa.int32()),
    pa.field("model_output", pa.string()),             # the model's answer, when asked to keep it
])
"""Schema of every segment. ``eval_*`` columns hold evaluation ground truth."""

_SEG_RE = re.compile(r"^seg-(\d{12})\.parquet$")
_SEQ_RE = re.compile(r"^seg-(\d{12})\.parquet")
_TMP_PREFIX = ".tmp-"
_RECORD_KEYS = {f.name for f in EPISODE_SCHEMA} | {"facts"}


@dataclass(frozen=True)
class AppendReceipt:
    """Returned by ``append`` once the segment is durable on disk."""
    segment: str
    episode_ids: list[str]
    sha256: str


@dataclass
class VerifyReport:
    ok: list[str] = field(default_factory=list)
    quarantined: list[dict] = field(default_factory=list)   # {"segment", "reason"}
    removed_temp: list[str] = field(default_factory=list)
    ledger_torn: bool = False
    ledger_bad_lines: int = 0

    @property
    def clean(self) -> bool:
        return not self.quarantined and not self.ledger_torn and not self.ledger_bad_lines


Report = VerifyReport


class AlreadyConsolidatedError(ValueError):
    """An episode was already consolidated by another sleep (no double training)."""


# ------------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _seg_name(seq: int) -> str:
    return f"seg-{seq:012d}.parquet"


def _as_str_list(v: Any, where: str) -> list[str]:
    if isinstance(v, str) or not isinstance(v, (list, tuple)):
        raise ValueError(f"{where} must be a list of strings, got {type(v).__name__}")
    for j, x in enumerate(v):
        if not isinstance(x, str):
            raise ValueError(f"{where}[{j}] must be a string, got {type(x).__name__}")
    return list(v)


def _as_record(where: str, rec: Any) -> dict:
    """The record as a dict of known, non-evaluation fields (an Episode: its documents only)."""
    if isinstance(rec, Episode):  # its probes and facts are evaluation data: only the documents are memory
        rec = {"episode_id": rec.episode_id, "kind": "episode", "text": rec.context,
               "documents": list(rec.documents), "source": "world"}
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: must be a dict or an Episode, got {type(rec).__name__}")
    unknown = set(rec) - _RECORD_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}; "
                         f"allowed: {sorted(_RECORD_KEYS)}")
    held = sorted(k for k in EVAL_FIELDS if rec.get(k))
    if held:
        raise ValueError(f"{where}: field(s) {held} hold evaluation data (questions, answers, facts), "
                         "which never enter memory: a sleep writes its own questions about the documents. "
                         "Give documents only")
    return rec


def _episode_id_and_kind(where: str, rec: dict) -> tuple[str, str]:
    eid = rec.get("episode_id")
    if not isinstance(eid, str) or not eid.strip():
        raise ValueError(f"{where}: field 'episode_id' must be a non-empty string, got {eid!r}")
    kind = rec.get("kind", "episode")
    if kind not in KINDS:
        raise ValueError(f"{where}: field 'kind' must be one of {KINDS}, got {kind!r}")
    return eid, kind


def _text_and_documents(where: str, rec: dict, kind: str) -> tuple[str, list[str]]:
    """The text (by default the documents, one a line) and the documents (a document: its text)."""
    docs = rec.get("documents")
    docs = [] if docs is None else _as_str_list(docs, f"{where}: field 'documents'")
    text = rec.get("text")
    if text is None:
        text = "\n".join(docs)
    if not isinstance(text, str):
        raise ValueError(f"{where}: field 'text' must be a string, got {type(text).__name__}")
    if not text.strip():
        raise ValueError(f"{where}: field 'text' is empty (give 'text' or 'documents')")
    if kind == "document" and not docs:
        docs = [text]
    return text, docs


def _created_at(where: str, created: Any) -> _dt.datetime:
    """A timezone-aware creation time (now when not given; naive times are UTC)."""
    if created is None:
        created = _now()
    elif isinstance(created, str):
        try:
            created = _dt.datetime.fromisoformat(created)
        except ValueError:
            raise ValueError(f"{where}: field 'created_at' is not an ISO timestamp: "
                             f"{created!r}") from None
    if not isinstance(created, _dt.datetime):
        raise ValueError(f"{where}: field 'created_at' must be a datetime, "
                         f"got {type(created).__name__}")
    if created.tzinfo is None:
        created = created.replace(tzinfo=_dt.timezone.utc)
    return created


def _n_tokens(where: str, n_tok: Any, text: str) -> int:
    if n_tok is None:
        n_tok = len(text.split())
    if isinstance(n_tok, bool) or not isinstance(n_tok, int) or not 0 <= n_tok < 2**31:
        raise ValueError(f"{where}: field 'n_tokens' must be a non-negative int, got {n_tok!r}")
    return n_tok


def _normalize(i: int, rec: Any) -> dict:
    """Validate one input record and return a row of ``EPISODE_SCHEMA``."""
    where = f"record {i}"
    rec = _as_record(where, rec)
    eid, kind = _episode_id_and_kind(where, rec)
    text, docs = _text_and_documents(where, rec, kind)
    source = rec.get("source") or ""
    if not isinstance(source, str):
        raise ValueError(f"{where}: field 'source' must be a string")
    created = _created_at(where, rec.get("created_at"))
    n_tok = _n_tokens(where, rec.get("n_tokens"), text)
    output = rec.get("model_output")
    if output is not None and (not isinstance(output, str) or kind != "interaction"):
        raise ValueError(f"{where}: 'model_output' is a string, on interactions only")
    return {"episode_id": eid, "kind": kind, "text": text, "documents": docs,
            "probes": [], "eval_answers": None, "eval_facts": [],
            "source": source, "created_at": created, "n_tokens": n_tok, "model_output": output}


def _row_to_episode(row: dict) -> Episode:
    """The episode as memory: its documents (a segment written before evaluation data was kept
    out may still hold questions, answers or facts: they are not handed out)."""
    docs = list(row.get("documents") or []) or [row["text"]]
    return Episode(row["episode_id"], docs, [], [])


# ------------------------------------------------------------------------------------
class MemoryStore:
    """Durable append-only episode store on a local folder (see the module docstring)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.segments_dir = self.root / "segments"
        self.quarantine_dir = self.root / "quarantine"
        self.ledger_path = self.root / "ledger.jsonl"
        for d in (self.root, self.segments_dir, self.quarantine_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._lock_path = self.root / ".lock"
        self._tlock = threading.RLock()
        self._depth = 0
        self._lock_fd: int | None = None
        # caches: segments are immutable, the ledger is read incrementally
        self._tables: dict[str, pa.Table] = {}
        self._ids: dict[str, str] = {}             # episode_id -> segment
        self._consolidated: dict[str, str] = {}    # episode_id -> sleep_id
        self._deleted: dict[str, str] = {}         # episode_id -> reason
        self._ledger_offset = 0
        self._ledger_torn_warned = False
        self._ledger_bad_lines = 0
        self._verified = False

    # -- locking ------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._tlock:
            if self._depth == 0:
                fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except BaseException:
                    os.close(fd)
                    raise
                self._lock_fd = fd
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    fd, self._lock_fd = self._lock_fd, None
                    fcntl.flock(fd, fcntl.LOCK_UN)
                    os.close(fd)

    # -- segments -----------------------------------------------------------------------
    def _segment_names(self) -> list[str]:
        return sorted(n for n in os.listdir(self.segments_dir) if _SEG_RE.match(n))

    def _next_seq(self) -> int:
        seqs = [int(m.group(1)) for d in (self.segments_dir, self.quarantine_dir)
                for n in os.listdir(d) if (m := _SEQ_RE.match(n))]
        return max(seqs, default=0) + 1

    def _check_segment(self, name: str) -> tuple[pa.Table | None, str | None]:
        """(table, None) when the segment is intact, else (None, reason)."""
        path = self.segments_dir / name
        side = path.with_name(name + ".sha256")
        try:
            data = path.read_bytes()
        except OSError as err:
            return None, f"cannot read segment: {err}"
        try:
            expected = side.read_text().split()[0].strip().lower()
        except FileNotFoundError:
            return None, "missing checksum sidecar"
        except (OSError, IndexError, UnicodeDecodeError) as err:
            return None, f"unreadable checksum sidecar: {err!r}"
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            return None, (f"sha256 mismatch: expected {expected}, got {actual} "
                          f"({len(data)} bytes; corrupt or truncated)")
        try:
            table = pq.read_table(pa.BufferReader(data))
        except Exception as err:  # noqa: BLE001 - any parse failure quarantines
            return None, f"does not parse as Parquet: {err}"
        if not table.schema.equals(EPISODE_SCHEMA, check_metadata=False):
            if "model_output" not in table.column_names:   # written before the column existed
                table = table.append_column("model_output", pa.nulls(table.num_rows, pa.string()))
            try:
                table = table.select(EPISODE_SCHEMA.names).cast(EPISODE_SCHEMA)
            except Exception as err:  # noqa: BLE001
                return None, f"schema does not match EPISODE_SCHEMA: {err}"
        return table, None

    def _quarantine(self, name: str, reason: str) -> None:
        dest = self.quarantine_dir / name
        if dest.exists():
            dest = self.quarantine_dir / f"{name}.{uuid.uuid4().hex[:8]}"
        src = self.segments_dir / name
        os.replace(src, dest)
        side = src.with_name(name + ".sha256")
        if side.exists():
            os.replace(side, dest.with_name(dest.name + ".sha256"))
        info = {"segment": name, "reason": reason, "quarantined_at": _now().isoformat(),
                "moved_to": dest.name}
        _write_durable(dest.with_name(dest.name + ".reason.json"),
                       (json.dumps(info, indent=1) + "\n").encode())
        _fsync_dir(self.quarantine_dir)
        _fsync_dir(self.segments_dir)
        log.warning("memory store %s: quarantined segment %s: %s", self.root, name, reason)

    def _add_table(self, name: str, table: pa.Table) -> None:
        self._tables[name] = table
        for eid in table.column("episode_id").to_pylist():
            self._ids[eid] = name

    def _refresh(self, report: VerifyReport | None = None) -> None:
        """Bring caches up to date with the folder (call with the lock held)."""
        names = self._segment_names()
        present = set(names)
        gone = [n for n in self._tables if n not in present]
        for n in gone:  # quarantined or removed by another process
            del self._tables[n]
        if gone:
            self._ids = {e: s for e, s in self._ids.items() if s in present}
        for name in names:
            if name in self._tables:
                if report is not None:
                    report.ok.append(name)
                continue
            table, reason = self._check_segment(name)
            if table is None:
                self._quarantine(name, reason)
                if report is not None:
                    report.quarantined.append({"segment": name, "reason": reason})
                continue
            self._add_table(name, table)
            if report is not None:
                report.ok.append(name)
        self._read_ledger(report)

    def _cleanup_temp(self) -> list[str]:
        """Remove leftovers of a crash mid-append (lock held: nobody is writing)."""
        removed = []
        for n in sorted(os.listdir(self.segments_dir)):
            p = self.segments_dir / n
            orphan_sidecar = (n.endswith(".sha256") and _SEG_RE.match(n[:-7])
                              and not (self.segments_dir / n[:-7]).exists())
            if n.startswith(_TMP_PREFIX) or orphan_sidecar:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                removed.append(n)
                log.warning("memory store %s: removed %s left by an interrupted append",
                            self.root, n)
        if removed:
            _fsync_dir(self.segments_dir)
        return removed

    def verify(self) -> VerifyReport:
        """Check every segment against its sha256 sidecar and that it parses.

        Bad segments (corrupt, truncated, missing sidecar, wrong schema) are moved to
        ``quarantine/`` with a ``<segment>.reason.json``; the rest stays readable. Temp
        files from an interrupted append are removed."""
        with self._locked():
            report = VerifyReport()
            report.removed_temp = self._cleanup_temp()
            self._tables.clear()
            self._ids.clear()
            self._refresh(report)
            report.ledger_torn = self._ledger_torn()
            report.ledger_bad_lines = self._ledger_bad_lines
            self._verified = True
            return report

    def _ensure(self) -> None:
        if not self._verified:
            self.verify()
        else:
            self._refresh()

    # -- ledger -------------------------------------------------------------------------
    def _ledger_torn(self) -> bool:
        try:
            size = self.ledger_path.stat().st_size
        except FileNotFoundError:
            return False
        if size == 0:
            return False
        with open(self.ledger_path, "rb") as f:
            f.seek(size - 1)
            return f.read(1) != b"\n"

    def _read_ledger(self, report: VerifyReport | None = None) -> None:
        try:
            with open(self.ledger_path, "rb") as f:
                f.seek(self._ledger_offset)
                data = f.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1
        if end < len(data) and not self._ledger_torn_warned:
            self._ledger_torn_warned = True
            log.warning("memory store %s: ignoring a truncated last line in ledger.jsonl "
                        "(interrupted write, never acknowledged)", self.root)
        for lineno, line in enumerate(data[:end].splitlines()):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                op, ids = rec["op"], rec["episode_ids"]
            except (ValueError, KeyError, TypeError):
                self._ledger_bad_lines += 1
                log.warning("memory store %s: skipping an unreadable ledger line at byte "
                            "offset %d", self.root, self._ledger_offset)
                continue
            if op == "consolidated":
                for e in ids:
                    if rec.get("rebuild"):
                        self._consolidated[e] = rec.get("sleep_id")
                    else:
                        self._consolidated.setdefault(e, rec.get("sleep_id"))
            elif op == "deleted":
                for e in ids:
                    self._deleted.setdefault(e, rec.get("reason", ""))
            else:
                log.warning("memory store %s: unknown ledger op %r", self.root, op)
        self._ledger_offset += end

    def _append_ledger(self, rec: dict) -> None:
        """Append one record, fsynced (lock held). Cuts a torn tail off first."""
        line = (json.dumps(rec, ensure_ascii=False) + "\n").encode()
        new = not self.ledger_path.exists()
        fd = os.open(self.ledger_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and self._ledger_offset < size:
                self._read_ledger()  # catch up before deciding what is torn
            if self._ledger_offset < size:  # torn tail: never acknowledged, cut it off
                log.warning("memory store %s: cutting %d bytes of a truncated ledger line",
                            self.root, size - self._ledger_offset)
                os.ftruncate(fd, self._ledger_offset)
            os.lseek(fd, 0, os.SEEK_END)
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        if new:
            _fsync_dir(self.root)
        self._read_ledger()

    # -- writing ------------------------------------------------------------------------
    def append(self, records: Sequence[dict] | Sequence[Episode]) -> AppendReceipt:
        """Write a batch as one new segment; returns once it is durable on disk.

        Every record is validated first: a bad one raises ``ValueError`` naming its
        index and field, and nothing is written. Episode ids must be new."""
        if isinstance(records, (dict, Episode)):
            records = [records]
        records = list(records)
        if not records:
            raise ValueError("append: no records given")
        rows = [_normalize(i, r) for i, r in enumerate(records)]
        seen: dict[str, int] = {}
        for i, r in enumerate(rows):
            if r["episode_id"] in seen:
                raise ValueError(f"record {i}: field 'episode_id' {r['episode_id']!r} "
                                 f"duplicates record {seen[r['episode_id']]} of this batch")
            seen[r["episode_id"]] = i
        table = pa.Table.from_pylist(rows, schema=EPISODE_SCHEMA)
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        data = buf.getvalue()
        digest = hashlib.sha256(data).hexdigest()

        with self._locked():
            self._ensure()
            for i, r in enumerate(rows):
                if r["episode_id"] in self._ids:
                    raise ValueError(f"record {i}: field 'episode_id' {r['episode_id']!r} "
                                     "is already in the store")
            name = _seg_name(self._next_seq())
            final = self.segments_dir / name
            tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
            tmp = self.segments_dir / f"{_TMP_PREFIX}{name}.{tag}"
            tmp_side = self.segments_dir / f"{_TMP_PREFIX}{name}.sha256.{tag}"
            try:
                _write_durable(tmp, data)
                _write_durable(tmp_side, f"{digest}  {name}\n".encode())
                # sidecar first: a segment in place always has its checksum
                os.replace(tmp_side, final.with_name(name + ".sha256"))
                os.replace(tmp, final)
                _fsync_dir(self.segments_dir)
            except BaseException:
                for p in (tmp, tmp_side):
                    with contextlib.suppress(OSError):
                        p.unlink()
                raise
            self._add_table(name, table)
        return AppendReceipt(name, [r["episode_id"] for r in rows], digest)

    def _check_known(self, ids: list[str], what: str) -> None:
        unknown = [e for e in ids if e not in self._ids]
        if unknown:
            raise ValueError(f"{what}: unknown episode id(s) {unknown[:10]}")

    def mark_consolidated(self, episode_ids: Iterable[str], sleep_id: str,
                          adapter_version: str | None = None, rebuild: bool = False) -> list[str]:
        """Record that ``sleep_id`` trained these episodes into the weights.

        Idempotent for the same ``sleep_id`` (returns only the newly marked ids, ``[]``
        when nothing changed). Raises ``AlreadyConsolidatedError`` for an id another
        sleep consolidated, ``ValueError`` for unknown or deleted ids; on error nothing
        is recorded. ``rebuild``: a sleep that retrained the experts from scratch
        (``sleepray.forget``) takes over episodes other sleeps consolidated."""
        ids = list(dict.fromkeys(episode_ids))
        if not isinstance(sleep_id, str) or not sleep_id:
            raise ValueError("mark_consolidated: sleep_id must be a non-empty string")
        with self._locked():
            self._ensure()
            self._check_known(ids, "mark_consolidated")
            deleted = [e for e in ids if e in self._deleted]
            if deleted:
                raise ValueError(f"mark_consolidated: episode(s) {deleted[:10]} were deleted "
                                 "and can't be consolidated")
            other = {e: self._consolidated[e] for e in ids
                     if self._consolidated.get(e, sleep_id) != sleep_id}
            if rebuild:
                new = [e for e in ids if self._consolidated.get(e) != sleep_id]
                if new:
                    self._append_ledger({"op": "consolidated", "episode_ids": new, "sleep_id": sleep_id,
                                         "rebuild": True, "at": _now().isoformat(),
                                         **({"adapter_version": adapter_version} if adapter_version else {})})
                return new
            if other:
                raise AlreadyConsolidatedError(
                    f"mark_consolidated: episode(s) already consolidated by another sleep: "
                    f"{dict(list(other.items())[:10])}")
            new = [e for e in ids if e not in self._consolidated]
            if new:
                rec = {"op": "consolidated", "episode_ids": new, "sleep_id": sleep_id,
                       "at": _now().isoformat()}
                if adapter_version is not None:
                    rec["adapter_version"] = adapter_version
                self._append_ledger(rec)
            return new

    def delete(self, episode_ids: Iterable[str], reason: str = "") -> list[str]:
        """Record a deletion. The data stays in its (append-only) segment but the
        episodes are excluded from every read, from pressure and from consolidation.
        Returns the newly deleted ids; unknown ids raise ``ValueError``."""
        ids = list(dict.fromkeys(episode_ids))
        with self._locked():
            self._ensure()
            self._check_known(ids, "delete")
            new = [e for e in ids if e not in self._deleted]
            if new:
                self._append_ledger({"op": "deleted", "episode_ids": new,
                                     "reason": str(reason), "at": _now().isoformat()})
            return new

    # -- reading ------------------------------------------------------------------------
    def _status_ids(self, status: str) -> set[str] | None:
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        if status == "deleted":
            return set(self._deleted) & set(self._ids)
        live = set(self._ids) - set(self._deleted)
        if status == "all":
            return live
        if status == "consolidated":
            return live & set(self._consolidated)
        return live - set(self._consolidated)

    def table(self, status: str = "short_term") -> pa.Table:
        """Episodes as an Arrow table in append order (without the evaluation columns)."""
        with self._locked():
            self._ensure()
            keep = self._status_ids(status)
            tables = [self._tables[n] for n in sorted(self._tables)]
        t = pa.concat_tables(tables) if tables else EPISODE_SCHEMA.empty_table()
        t = t.filter(pc.is_in(t.column("episode_id"), pa.array(sorted(keep), pa.string())))
        return t.drop_columns(list(HIDDEN_COLUMNS))

    def episodes(self, status: str = "short_term") -> list[dict]:
        return self.table(status).to_pylist()

    def export_episodes(self, status: str = "short_term") -> list[Episode]:
        """As ``sleepray.world.Episode``: documents only (no probes, no facts)."""
        return [_row_to_episode(r) for r in self.episodes(status)]

    def status_of(self, episode_id: str) -> str | None:
        """"short_term", "consolidated", "deleted", or None when unknown."""
        with self._locked():
            self._ensure()
            if episode_id not in self._ids:
                return None
            if episode_id in self._deleted:
                return "deleted"
            return "consolidated" if episode_id in self._consolidated else "short_term"

    def forgotten(self) -> list[str]:
        """Ids deleted after a sleep consolidated them: in some version's weights, until a rebuild
        (``sleepray.forget``) publishes one without them."""
        with self._locked():
            self._ensure()
            return sorted(e for e in self._deleted if e in self._consolidated and e in self._ids)

    def consolidated_by(self, sleep_id: str) -> list[str]:
        """Ids a given sleep consolidated (lets a restarted sleep see what it finished)."""
        with self._locked():
            self._ensure()
            return sorted(e for e, s in self._consolidated.items()
                          if s == sleep_id and e in self._ids and e not in self._deleted)

    def pressure(self) -> dict:
        """Short-term memory size, for the memory-pressure sleep trigger."""
        t = self.table("short_term")
        return {"short_term_tokens": int(pc.sum(t.column("n_tokens")).as_py() or 0),
                "short_term_episodes": t.num_rows}

    def __len__(self) -> int:
        return self.table("all").num_rows

    def __repr__(self) -> str:
        return f"MemoryStore({str(self.root)!r})"
