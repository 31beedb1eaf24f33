"""The journal: an append-only SQLite table of events, the only source of truth.

* WAL with ``synchronous=FULL``: a committed event survives a crash and a power cut.
* Appends run in ``BEGIN IMMEDIATE`` transactions; several events (even across streams)
  are appended atomically in one.
* ``seq`` gives a total order; ``(stream, version)`` is unique, which is the optimistic
  concurrency check: appending with a stale ``expected_version`` raises ``ConcurrencyError``
  and appends nothing.
* Opening verifies that the file is an ftctl journal of a supported schema *before* SQLite
  may write to it, so a foreign or damaged file is reported and left untouched.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import struct
import zlib
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

import msgspec

from .errors import UserError
from .types import (
    EVENT_TYPES,
    PAIR_FIELDS,
    READINGS,
    ROOT_TAGS,
    TS_FORMAT,
    DecodeError,
    Event,
    EventBase,
    Metrics,
    Recorded,
    decode,
    decode_bodies,
    decode_columns,
    recorded_root,
)

_METRIC_FIELDS = Metrics.__struct_fields__
# metrics columns added after the first schema (the device readings, issue 22; preference training's
# pair figures, issue 23): a journal made before them gets them at its first report (ALTER TABLE ...
# ADD COLUMN: instant, old rows read NULL); until then, and in a read-only view, its reads give NULL
_ADDED_METRICS = {
    "device": "TEXT",
    **dict.fromkeys(READINGS, "REAL"),
    **dict.fromkeys(PAIR_FIELDS, "REAL"),
}

# The schema, written once by Journal.create. Plain SQL: the schema tool this used (sqlite-utils)
# imports pandas when it is installed (`datasets` brings it), a second more on every new workspace.
_SCHEMA = f"""
CREATE TABLE events (
    seq INTEGER PRIMARY KEY, stream TEXT NOT NULL, version INTEGER NOT NULL,
    ts TEXT NOT NULL, type TEXT NOT NULL, body TEXT NOT NULL
);
CREATE UNIQUE INDEX idx_events_stream_version ON events (stream, version);
CREATE TABLE snapshots (seq INTEGER PRIMARY KEY, format INTEGER, ts TEXT, body BLOB);
CREATE TABLE metrics (
    id INTEGER PRIMARY KEY, job TEXT, step INTEGER, global_step INTEGER, ts TEXT, loss REAL, lr REAL,
    tokens_per_s REAL, peak_mem_gb REAL, trained_tokens INTEGER,
    {", ".join(f"{k} {t}" for k, t in _ADDED_METRICS.items())}
);
CREATE INDEX idx_metrics_job_step ON metrics (job, step);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
"""
APPLICATION_ID = 0x66746374  # "ftct"
SCHEMA_VERSION = 1
SUPPORTED_SCHEMAS = (1,)
_SQLITE_MAGIC = b"SQLite format 3\x00"


class JournalError(UserError):
    """A journal problem a user can act on; str() says what happened and what to do."""


class NotAJournal(JournalError):
    pass


class ConcurrencyError(JournalError):
    """Another writer appended to the stream first; nothing was appended."""

    def __init__(self, stream: str, expected: int, actual: int):
        self.stream, self.expected, self.actual = stream, expected, actual
        super().__init__(
            f"stream {stream!r} moved on (expected version {expected}, found {actual}): "
            "another process wrote to it first; nothing was appended — re-read and retry"
        )


class JournalBusy(JournalError):
    pass


# --------------------------------------------------------------------------- the storage, not the journal
# A read-only file system, a permission denied and a full disk are not a damaged journal: each has its
# own message and its own remedy, and none of them says "restore from a backup" (that advice, taken,
# would overwrite a good journal). Only the journal's own checks (its header, SQLite's "malformed" /
# "not a database") call it damaged.


class StorageError(JournalError):
    """The workspace's storage refuses what ftctl must do there; the journal itself is intact."""

    kind = ""

    def note(self) -> str:
        """What a query that could still read says (`status` on a read-only mount)."""
        return (
            f"the workspace's storage refuses writes ({self.kind}): this is the journal as it is on disk; "
            "nothing can be recorded or trained here until that is fixed"
        )


class ReadOnly(StorageError):
    kind = "read-only"


class NoPermission(StorageError):
    kind = "permission denied"


class DiskFull(StorageError):
    kind = "disk full"


_INTACT = "Nothing was changed, and nothing is damaged: the journal and everything it committed are intact."


def _writable(p: Path) -> bool:
    # os.path's probes never raise (a folder we may not enter hides what is in it: "not there")
    return not os.path.lexists(p) or os.access(p, os.W_OK)


def storage_problem(path, err: BaseException | None = None) -> StorageError | None:
    """Why ftctl cannot write (or read) ``path`` — a file of the workspace, or the workspace — when the
    cause is its storage: a read-only file system, permissions, a full disk; None when the storage is
    not the cause (then an error is the file's own). ``err``: the OSError or sqlite3 error seen, if any."""
    path = Path(path)
    folder = path if os.path.isdir(path) else path.parent
    code = err.errno if isinstance(err, OSError) else None
    name = getattr(err, "sqlite_errorname", "") or ""
    try:
        vfs = os.statvfs(folder)
    except OSError:
        vfs = None
    if code == errno.EROFS or (vfs is not None and vfs.f_flag & os.ST_RDONLY):
        return ReadOnly(
            f"{folder} is on a read-only file system (EROFS): ftctl needs to write in the workspace "
            f"(its journal, lock and job folders). {_INTACT} Remount it read-write, or copy the workspace "
            "to a writable place (a copy is a separate workspace), then run the command again."
        )
    files = (
        [path, *(path.with_name(path.name + s) for s in ("-wal", "-shm"))] if path != folder else []
    )
    denied = [f for f in (folder, *files) if not _writable(f)] or [
        f
        for f in (folder, *files)
        if os.path.lexists(f) and not os.access(f, os.R_OK | (os.X_OK if f == folder else 0))
    ]
    if code in (errno.EACCES, errno.EPERM) or (
        denied
        and (err is None or name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM")))
    ):
        where = denied[0] if denied else Path(getattr(err, "filename", None) or path)
        try:
            owner = (
                f"it belongs to uid {where.stat().st_uid} (mode {where.stat().st_mode & 0o777:o}), "
            )
        except OSError:
            owner = ""
        return NoPermission(
            f"permission denied on {where} (EACCES): {owner}this process runs as uid {os.getuid()}. "
            f"{_INTACT} Run ftctl as the workspace's owner, or give this user read and write access to "
            "the workspace (chown / chmod), then run the command again."
        )
    if (
        code in (errno.ENOSPC, errno.EDQUOT)
        or name == "SQLITE_FULL"
        or (
            (err is None or name.startswith(("SQLITE_IOERR", "SQLITE_CANTOPEN")))
            and vfs is not None
            and vfs.f_bavail == 0
        )
    ):
        free = f"{vfs.f_bavail * vfs.f_frsize / 1e6:.1f} MB free" if vfs is not None else "no space"
        return DiskFull(
            f"no space left on the device holding {folder} (ENOSPC, {free}). Nothing committed is lost "
            "or damaged: the journal rolled the write back (a half-written file is removed, or left to "
            "the next recovery). Free some space (`ftctl doctor` shows the workspace's disk use), then "
            "run the command again."
        )
    return None


def _damaged_by_sqlite(path: Path, e: sqlite3.Error) -> JournalError:
    """An error SQLite raised opening or reading the journal: the storage's, if it is; "damaged" only
    when SQLite says the file is (malformed, not a database); else what it said, with no advice to
    restore anything."""
    problem = storage_problem(path, e)
    if problem is not None:
        return problem
    if getattr(e, "sqlite_errorname", "") in ("SQLITE_CORRUPT", "SQLITE_NOTADB"):
        return NotAJournal(
            f"{path}: the journal is damaged ({e}). Nothing was changed; restore it from a backup copy."
        )
    return NotAJournal(f"{path}: the journal cannot be opened ({e}). Nothing was changed.")


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime(TS_FORMAT)


def _check_header(path: Path) -> None:
    """Refuse anything that is not an ftctl journal before SQLite may write to it.

    The header is read through an ``immutable`` SQLite connection (no lock, no -wal/-shm, no
    write) rather than with open()/close(): closing any descriptor of a database file drops
    every POSIX lock this process holds on it, which would let another process's checkpoint
    overwrite pages a live connection of ours is still reading."""
    what = f"{path} is not an ftctl journal"
    try:
        size = path.stat().st_size
    except OSError as e:
        raise storage_problem(path, e) or NotAJournal(
            f"{path}: cannot read the journal ({e.strerror}); check the path and permissions"
        ) from None
    if size == 0:
        raise NotAJournal(
            f"{what}: the file is empty. Nothing was changed; point --home at a workspace made by `ftctl init`."
        )
    uri = f"file:{quote(str(path))}?immutable=1"
    try:
        con = sqlite3.connect(uri, uri=True)
        try:
            app_id, user_version, page_size, pages = (
                con.execute(f"PRAGMA {p}").fetchone()[0]
                for p in ("application_id", "user_version", "page_size", "page_count")
            )
        finally:
            con.close()
    except sqlite3.DatabaseError as e:
        if "not a database" in str(e):
            raise NotAJournal(
                f"{what}: it is not a SQLite database. Nothing was changed; point --home at a "
                "workspace made by `ftctl init`."
            ) from None
        if _ours_with_wal(path):
            return  # killed mid-checkpoint: the main file alone is inconsistent, its WAL completes it
        problem = storage_problem(path, e) if not os.access(path, os.R_OK) else None
        raise problem or NotAJournal(_damaged(path, size, e)) from None
    if app_id != APPLICATION_ID:
        raise NotAJournal(
            f"{what}: it is a SQLite database of another application (application_id {app_id:#x}). "
            "Nothing was changed; point --home at a workspace made by `ftctl init`."
        )
    if user_version not in SUPPORTED_SCHEMAS:
        raise NotAJournal(
            f"{path}: journal schema version {user_version} is not supported by this ftctl "
            f"(supports {', '.join(map(str, SUPPORTED_SCHEMAS))}). Nothing was changed; use the "
            "ftctl version that wrote it."
        )
    wal = path.with_name(path.name + "-wal")
    if size < page_size * pages and not (wal.exists() and wal.stat().st_size > 0):
        raise NotAJournal(
            f"{path}: the journal is truncated ({size} bytes, its header says {page_size * pages}). "
            "Nothing was changed; restore it from a backup copy or move it aside and run `ftctl init`."
        )


_encode = msgspec.json.Encoder().encode  # types.encode, without a Python call per event
_TAG = {t: t.__struct_config__.tag for t in EVENT_TYPES}
_read_back = msgspec.json.Decoder(list[Event]).decode


def _reads_back(rows: list[tuple[str, int, str, str, str]]) -> bool:
    try:
        _read_back("[" + ",".join([r[4] for r in rows]) + "]")
        return True
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError, UnicodeError):
        return False


def _raw_header(path: Path) -> bytes:
    # Only for files SQLite's immutable view refused: see _check_header on why this is rare.
    with open(path, "rb") as f:
        return f.read(100)


def _ours_with_wal(path: Path) -> bool:
    """An ftctl journal whose main file was caught mid-checkpoint: the header is ours and a
    non-empty WAL exists, which SQLite replays on a normal open."""
    wal = path.with_name(path.name + "-wal")
    if not (wal.exists() and wal.stat().st_size > 0):
        return False
    head = _raw_header(path)
    return (
        len(head) == 100
        and head.startswith(_SQLITE_MAGIC)
        and struct.unpack(">I", head[68:72])[0] == APPLICATION_ID
        and struct.unpack(">I", head[60:64])[0] in SUPPORTED_SCHEMAS
    )


def _damaged(path: Path, size: int, err: Exception) -> str:
    """Why SQLite cannot read the file. The file is unusable anyway, so reading its header
    bytes directly (see _check_header on why that is avoided otherwise) is harmless here."""
    head = _raw_header(path)
    if len(head) == 100 and head.startswith(_SQLITE_MAGIC):
        page_size = struct.unpack(">H", head[16:18])[0]
        page_size = 65536 if page_size == 1 else page_size
        pages = struct.unpack(">I", head[28:32])[0]
        if size < page_size * pages:
            return (
                f"{path}: the journal is truncated ({size} bytes, its header says {page_size * pages}). "
                "Nothing was changed; restore it from a backup copy or move it aside and run `ftctl init`."
            )
    return f"{path}: the journal is damaged ({err}). Nothing was changed; restore it from a backup copy."


# A compressed snapshot body starts with this marker (a msgpack snapshot never can: a leading
# 0x00 would be a bare integer, and a projection is a map).
_ZLIB = b"\x00zlib\x00"


def _pack(body: bytes) -> bytes:
    return _ZLIB + zlib.compress(body, 1)


def _unpack(body: bytes) -> bytes:
    return zlib.decompress(body[len(_ZLIB) :]) if body[: len(_ZLIB)] == _ZLIB else body


class Journal:
    """Append and read events. One instance per process; not shared across threads."""

    def __init__(self, conn: sqlite3.Connection, path: Path):
        self.conn = conn
        self.path = path
        self._root: str | None | bool = False  # False: not looked for yet
        self._metric_columns: set[str] | None = None  # the metrics table's, once looked up
        self.readonly: StorageError | None = None  # opened read-only: the storage refuses writes

    # ------------------------------------------------------------------ workspace paths
    @property
    def root(self) -> str | None:
        """Where the workspace was when this journal recorded absolute paths (an ftctl before
        relative paths wrote it), or None: every path it holds is already relative to the workspace.
        Events read through this journal have those paths made relative (events.types.relocate)."""
        if self._root is False:
            self._root = self._recorded_root()
        return self._root

    def _recorded_root(self) -> str | None:
        # A journal created since paths are relative says so; an older one shows its root in the first
        # event with a path only ftctl writes (its first checkpoint, usually within its first events).
        if self.conn.execute("SELECT 1 FROM meta WHERE key = 'paths'").fetchone():
            return None
        rows = self.conn.execute(
            f"SELECT body FROM events WHERE type IN ({', '.join('?' * len(ROOT_TAGS))}) ORDER BY seq",
            ROOT_TAGS,
        )
        for (body,) in rows:
            try:
                root = recorded_root(decode(body))
            except DecodeError:
                continue
            if root is not None:
                return root or None
        return None

    # ------------------------------------------------------------------ open / create
    @classmethod
    def create(cls, path: Path) -> "Journal":
        try:
            return cls._create(Path(path))
        except sqlite3.Error as e:  # the disk, not the caller: say so as a journal problem
            raise JournalError(f"cannot create the journal {path}: {e}") from e

    @classmethod
    def _create(cls, path: Path) -> "Journal":
        if path.exists():
            raise JournalError(f"{path} already exists; refusing to overwrite a journal")
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
        # Schema and identity are written in rollback-journal mode, straight into the main file,
        # so its header says "ftctl journal" from the first commit; then the file switches to WAL.
        conn = sqlite3.connect(path, isolation_level=None, timeout=10.0, check_same_thread=False)
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(
            "BEGIN IMMEDIATE;" + _SCHEMA
        )  # the transaction first: no implicit COMMIT
        conn.executemany(
            "INSERT INTO meta (key, value) VALUES (?, ?)",
            [
                ("application", "ftctl"),
                ("created", utc_now()),
                ("paths", "relative"),  # every path it records: see Journal.root
            ],
        )
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
        conn.close()
        return cls(cls._connect(path), path)

    @classmethod
    def open(cls, path: Path) -> "Journal":
        path = Path(path)
        if not path.exists():
            raise NotAJournal(
                f"no journal at {path}: run `ftctl init` (or pass --home to the right workspace)"
            )
        _check_header(path)
        conn = None
        try:
            # Look at the tables before _connect's journal_mode=WAL, which rewrites the header.
            conn = sqlite3.connect(
                path, isolation_level=None, timeout=10.0, check_same_thread=False
            )
            tables = {
                r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
        except sqlite3.DatabaseError as e:
            if conn is not None:
                conn.close()
            raise _damaged_by_sqlite(path, e) from None
        missing = {"events", "snapshots", "metrics", "meta"} - tables
        if missing:
            conn.close()
            raise NotAJournal(
                f"{path}: the journal lacks tables {sorted(missing)}. Nothing was changed; it was "
                "not made by `ftctl init`."
            )
        conn.close()
        problem = storage_problem(
            path
        )  # SQLite opens a read-only file "fine" and fails at the first write
        if isinstance(problem, (ReadOnly, NoPermission)):
            raise problem
        try:
            return cls(cls._connect(path), path)
        except sqlite3.DatabaseError as e:
            raise _damaged_by_sqlite(path, e) from None

    @classmethod
    def open_readonly(cls, path: Path) -> "Journal":
        """For a viewer (`ftctl serve`, and the queries on storage ftctl cannot write): checked as
        ``open`` checks, then connected with SQLite's ``mode=ro``, so that nothing it does can write
        to the journal (an append raises). On a read-only file system SQLite cannot make the WAL's
        shared-memory file a reader needs: when the journal has no WAL content there (a stopped
        daemon leaves none), it is read as the immutable file it then is. ``readonly`` says why."""
        path = Path(path)
        if not path.exists():
            raise NotAJournal(
                f"no journal at {path}: run `ftctl init` (or pass --home to the right workspace)"
            )
        _check_header(path)
        problem = storage_problem(path)
        wal = path.with_name(path.name + "-wal")
        settled = not (wal.exists() and wal.stat().st_size > 0)
        modes = ["mode=ro"] + (["immutable=1"] if problem is not None and settled else [])
        for n, mode in enumerate(modes):
            try:
                conn = sqlite3.connect(
                    f"file:{quote(str(path.resolve()))}?{mode}",
                    uri=True,
                    isolation_level=None,
                    timeout=10.0,
                    check_same_thread=False,
                )
                conn.execute("PRAGMA busy_timeout=10000")
                tables = {
                    r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
                }
                break
            except sqlite3.DatabaseError as e:
                if n + 1 < len(modes):
                    continue
                raise _damaged_by_sqlite(path, e) from None
        missing = {"events", "snapshots", "metrics", "meta"} - tables
        if missing:
            conn.close()
            raise NotAJournal(
                f"{path}: the journal lacks tables {sorted(missing)}. Nothing was changed; it was "
                "not made by `ftctl init`."
            )
        j = cls(conn, path)
        j.readonly = problem
        return j

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        conn = sqlite3.connect(path, isolation_level=None, timeout=10.0, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=10000")
        for suffix in ("-wal", "-shm"):
            side = path.with_name(path.name + suffix)
            if side.exists():
                try:
                    os.chmod(side, 0o600)
                except OSError:
                    pass
        return conn

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ writing
    def append(
        self, stream: str, events: Sequence[EventBase], expected_version: int | None = None
    ) -> list[Recorded]:
        """Append events to one stream atomically. ``expected_version`` is the version the
        caller last saw (0 for a new stream); ``None`` skips the check."""
        return self.append_batch([(stream, events, expected_version)])

    def append_batch(
        self, batch: Sequence[tuple[str, Sequence[EventBase], int | None]]
    ) -> list[Recorded]:
        """Append to several streams in one transaction: all or nothing."""
        conn = self.conn
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            raise storage_problem(self.path, e) or JournalBusy(
                f"{self.path}: the journal is locked by another writer ({e}); nothing was appended — retry"
            ) from None
        out: list[Recorded] = []
        try:
            ts = utc_now()
            rows: list[tuple[str, int, str, str, str]] = []
            # a stream may come twice in one batch: its versions go on
            versions: dict[str, int] = {}
            for stream, events, expected in batch:
                version = versions.get(stream)
                if version is None:
                    row = conn.execute(
                        "SELECT max(version) FROM events WHERE stream = ?", (stream,)
                    ).fetchone()
                    version = row[0] or 0
                if expected is not None and version != expected:
                    raise ConcurrencyError(stream, expected, version)
                for ev in events:
                    version += 1
                    rows.append((stream, version, ts, _TAG[type(ev)], _encode(ev).decode()))
                versions[stream] = version
            # A body that cannot be read back would make the journal unreplayable: every body is
            # decoded again before the commit, all in one call (one by one to name the culprit).
            if rows and not _reads_back(rows):
                for (stream, _, _, _, body), ev in zip(
                    rows, (e for _, evs, _ in batch for e in evs)
                ):
                    try:
                        decode(body)
                    except DecodeError as e:
                        raise JournalError(
                            f"refusing to append a {type(ev).kind()!r} event to {stream!r}: it would not read back "
                            f"(a NaN/inf float or a field of the wrong type?): {e}. Nothing was appended."
                        ) from None
            conn.executemany(
                "INSERT INTO events (stream, version, ts, type, body) VALUES (?, ?, ?, ?, ?)", rows
            )
            # Inserted under the write lock into an INTEGER PRIMARY KEY: consecutive sequence numbers.
            seq = conn.execute("SELECT last_insert_rowid()").fetchone()[0] - len(rows)
            evs = (e for _, events, _ in batch for e in events)
            for (stream, version, _, _, _), ev in zip(rows, evs):
                seq += 1
                out.append(Recorded(seq, stream, version, ts, ev))
            conn.execute("COMMIT")
        except sqlite3.IntegrityError:
            conn.execute("ROLLBACK")
            actual = (
                conn.execute(
                    "SELECT max(version) FROM events WHERE stream = ?", (batch[0][0],)
                ).fetchone()[0]
                or 0
            )
            raise ConcurrencyError(
                batch[0][0], batch[0][2] if batch[0][2] is not None else -1, actual
            ) from None
        except sqlite3.OperationalError as e:  # a full disk, a read-only remount: the storage's
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise storage_problem(self.path, e) or e from None
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return out

    # ------------------------------------------------------------------ reading
    def last_seq(self) -> int:
        return self.conn.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0]

    def job_ids(self) -> list[str]:
        """Every job id, in submission order, from the (stream, version) index alone: no event is
        decoded (`ftctl _jobs`, what shell completion calls)."""
        rows = self.conn.execute(
            "SELECT substr(stream, 5) FROM events WHERE stream >= 'job:' AND stream < 'job;' "
            "AND version = 1 ORDER BY seq"
        )
        return [r[0] for r in rows]

    def stream_version(self, stream: str) -> int:
        return self.conn.execute(
            "SELECT coalesce(max(version), 0) FROM events WHERE stream = ?", (stream,)
        ).fetchone()[0]

    def read(
        self, after: int = 0, to: int | None = None, stream: str | None = None, chunk: int = 20000
    ) -> Iterator[Recorded]:
        """Events with ``after < seq <= to`` in sequence order, optionally of one stream.

        Rows are read in chunks that SQLite itself turns into one JSON array per column,
        decoded by msgspec in one call each: replay costs about a microsecond per event."""
        to = self.last_seq() if to is None else to
        where = "seq > ? AND seq <= ?" + (" AND stream = ?" if stream is not None else "")
        sql = (
            "SELECT '[' || group_concat(seq) || ']', '[' || group_concat(json_quote(stream)) || ']', "
            "'[' || group_concat(version) || ']', '[\"' || group_concat(ts, '\",\"') || '\"]', "
            "'[' || group_concat(body) || ']', max(seq) FROM ("
            f"SELECT seq, stream, version, ts, body FROM events WHERE {where} ORDER BY seq LIMIT ?)"
        )
        lo = after
        while lo < to:
            params = (lo, to, stream, chunk) if stream is not None else (lo, to, chunk)
            *columns, hi = self.conn.execute(sql, params).fetchone()
            if hi is None:
                return
            yield from decode_columns(*columns, root=self.root)
            lo = hi

    def tagged(self, stream: str, tag: str) -> list[Recorded]:
        """The stream's events with type ``tag`` (e.g. a job's crashes), in order: the stream's index
        finds them without reading the rest of a long journal."""
        r = self.conn.execute(
            "SELECT '[' || group_concat(seq) || ']', '[' || group_concat(json_quote(stream)) || ']', "
            "'[' || group_concat(version) || ']', '[\"' || group_concat(ts, '\",\"') || '\"]', "
            "'[' || group_concat(body) || ']' FROM (SELECT seq, stream, version, ts, body FROM events "
            "WHERE stream = ? AND type = ? ORDER BY version)",
            (stream, tag),
        ).fetchone()
        return decode_columns(*r, root=self.root) if r[0] is not None else []

    def rows(
        self, after: int = 0, to: int | None = None, chunk: int = 20000
    ) -> Iterator[tuple[int, str, EventBase]]:
        """(seq, ts, event) for ``after < seq <= to``: the replay path. Only bodies and times are
        concatenated by SQLite; sequence numbers are contiguous (events are never deleted), which
        each chunk checks against its count before relying on it."""
        to = self.last_seq() if to is None else to
        sql = (
            "SELECT '[\"' || group_concat(ts, '\",\"') || '\"]', '[' || group_concat(body) || ']', max(seq), count(*) "
            "FROM (SELECT seq, ts, body FROM events WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?)"
        )
        lo = after
        while lo < to:
            ts, bodies, hi, n = self.conn.execute(sql, (lo, to, chunk)).fetchone()
            if hi is None:
                return
            stamps, events = decode_bodies(ts, bodies, root=self.root)
            if hi - lo == n:
                seqs = range(lo + 1, hi + 1)
            else:  # a gap (never written by ftctl, but never assumed away either)
                seqs = [
                    r[0]
                    for r in self.conn.execute(
                        "SELECT seq FROM events WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?",
                        (lo, to, chunk),
                    )
                ]
            yield from zip(seqs, stamps, events)
            lo = hi

    # ------------------------------------------------------------------ snapshots
    def save_snapshot(
        self,
        seq: int,
        fmt: int,
        body: bytes,
        *,
        interval: int = 0,
        milestones: int = 0,
        compress: bool = False,
    ) -> None:
        """Store a snapshot and apply the retention rule, in one transaction:

        * the two newest snapshots of the format are kept as they are (a load starts from the newest);
        * older ones are kept as *milestones* at least ``interval`` events apart (none if 0), so
          that any point of the past is a milestone plus at most about ``interval`` events away
          (time travel); each is stored zlib-compressed once it is no longer among the newest two;
        * at most ``milestones`` are kept: past that, every other one goes (the spacing doubles),
          which bounds their disk use at ``milestones`` compressed projections.
        """
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(
                "INSERT OR REPLACE INTO snapshots (seq, format, ts, body) VALUES (?, ?, ?, ?)",
                (seq, fmt, utc_now(), _pack(body) if compress else body),
            )
            older = [
                r[0]
                for r in conn.execute(
                    "SELECT seq FROM snapshots WHERE format = ? ORDER BY seq DESC LIMIT -1 OFFSET 2",
                    (fmt,),
                )
            ]
            older.reverse()
            kept, last = [], 0
            if interval > 0:
                for s in older:
                    if s - last >= interval:
                        kept.append(s)
                        last = s
                while milestones > 0 and len(kept) > milestones:
                    kept = kept[1::2]
            drop = sorted(set(older) - set(kept))
            conn.executemany(
                "DELETE FROM snapshots WHERE format = ? AND seq = ?", [(fmt, s) for s in drop]
            )
            for s in kept:  # compress a milestone once, when it leaves the newest two
                (head,) = conn.execute(
                    "SELECT substr(body, 1, ?) FROM snapshots WHERE format = ? AND seq = ?",
                    (len(_ZLIB), fmt, s),
                ).fetchone()
                if bytes(head) != _ZLIB:
                    (raw,) = conn.execute(
                        "SELECT body FROM snapshots WHERE format = ? AND seq = ?", (fmt, s)
                    ).fetchone()
                    conn.execute(
                        "UPDATE snapshots SET body = ? WHERE format = ? AND seq = ?",
                        (_pack(raw), fmt, s),
                    )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def latest_snapshot(self, fmt: int, at_most: int | None = None) -> tuple[int, bytes] | None:
        sql = "SELECT seq, body FROM snapshots WHERE format = ?" + (
            " AND seq <= ?" if at_most is not None else ""
        )
        params = (fmt, at_most) if at_most is not None else (fmt,)
        row = self.conn.execute(sql + " ORDER BY seq DESC LIMIT 1", params).fetchone()
        return None if row is None else (row[0], _unpack(row[1]))

    def snapshot_seqs(self, fmt: int) -> list[tuple[int, int]]:
        """(seq, stored bytes) of every snapshot of the format, oldest first."""
        return self.conn.execute(
            "SELECT seq, length(body) FROM snapshots WHERE format = ? ORDER BY seq", (fmt,)
        ).fetchall()

    # ------------------------------------------------------------------ metrics
    def _metric_select(self) -> str:
        """The metrics columns in Metrics' order; a column an older journal lacks reads as null."""
        if self._metric_columns is None:
            rows = self.conn.execute("PRAGMA table_info(metrics)").fetchall()
            self._metric_columns = {r[1] for r in rows}
        return ", ".join(f if f in self._metric_columns else f"NULL AS {f}" for f in _METRIC_FIELDS)

    def record_metric(self, job: str, m: Metrics) -> None:
        """Training reports go to their own table, with autocommit: they are measurements."""
        self._metric_select()
        for f, kind in _ADDED_METRICS.items():
            if f not in self._metric_columns:
                self.conn.execute(f"ALTER TABLE metrics ADD COLUMN {f} {kind}")
                self._metric_columns.add(f)
        self.conn.execute(
            f"INSERT INTO metrics (job, ts, {', '.join(_METRIC_FIELDS)}) VALUES (?, ?{', ?' * len(_METRIC_FIELDS)})",
            (job, utc_now(), *(getattr(m, f) for f in _METRIC_FIELDS)),
        )

    def last_metrics(self) -> dict[str, dict]:
        """The latest report of every job: {job: {"job", "step", "global_step", "loss", …, "ts"}}."""
        rows = self.conn.execute(
            f"SELECT job, {self._metric_select()}, ts FROM metrics WHERE id IN (SELECT max(id) "
            "FROM metrics GROUP BY job)"
        )
        return {r[0]: dict(zip(("job", *_METRIC_FIELDS, "ts"), r)) for r in rows}

    def recent_metrics(self, job: str, since_ts: str = "", limit: int = 10) -> list[dict]:
        """The job's last ``limit`` reports recorded at or after ``since_ts``, oldest first."""
        rows = self.conn.execute(
            f"SELECT job, {self._metric_select()}, ts FROM metrics WHERE job = ? AND ts >= ? "
            "ORDER BY id DESC LIMIT ?",
            (job, since_ts, limit),
        )
        return [dict(zip(("job", *_METRIC_FIELDS, "ts"), r)) for r in reversed(rows.fetchall())]

    def metric_rows(self, job: str, after_id: int = 0) -> list[tuple]:
        """Every report of the job with an id above ``after_id``, in the order recorded:
        (id, ts, then Metrics' fields in order: step, global_step, loss, lr, tokens_per_s, peak_mem_gb,
        trained_tokens, the preference pair figures, the device and its readings)."""
        return self.conn.execute(
            f"SELECT id, ts, {self._metric_select()} FROM metrics WHERE job = ? AND id > ? ORDER BY id",
            (job, after_id),
        ).fetchall()

    def metric_summary(self, jobs: Sequence[str]) -> dict[str, dict]:
        """Per job, its reports in aggregate, computed by SQLite (no row comes to Python): how many,
        mean tokens/s, peak memory, and the last report's step and loss (`ftctl compare`)."""
        out: dict[str, dict] = {}
        for k in range(0, len(jobs), 500):  # SQLite takes at most 999 parameters
            part = list(jobs[k : k + 500])
            marks = ", ".join("?" * len(part))
            rows = self.conn.execute(
                "SELECT m.job, a.n, a.tps, a.mem, m.step, m.loss FROM (SELECT job, count(*) AS n, "
                "avg(tokens_per_s) AS tps, max(peak_mem_gb) AS mem, max(id) AS last FROM metrics "
                f"WHERE job IN ({marks}) GROUP BY job) AS a JOIN metrics AS m ON m.id = a.last",
                part,
            )
            for job, n, tps, mem, step, loss in rows:
                out[job] = {
                    "reports": n,
                    "tokens_per_s": tps,
                    "peak_mem_gb": mem,
                    "last_step": step,
                    "last_loss": loss,
                }
        return out

    def last_metric_id(self) -> int:
        return self.conn.execute("SELECT coalesce(max(id), 0) FROM metrics").fetchone()[0]

    def last_ts(self, stream: str | None = None, tag: str | None = None) -> str | None:
        """When the newest event (of ``stream``, with tag ``tag``) was appended; with no filter, the
        newest event or metrics row: the journal's last sign of life."""
        if stream is None and tag is None:
            # The newest row of each table by its key (a lookup, not a scan of a million rows).
            return self.conn.execute(
                "SELECT max(ts) FROM (SELECT (SELECT ts FROM events ORDER BY seq DESC LIMIT 1) AS ts "
                "UNION ALL SELECT (SELECT ts FROM metrics ORDER BY id DESC LIMIT 1))"
            ).fetchone()[0]
        where = " AND ".join(
            c for c, v in (("stream = ?", stream), ("type = ?", tag)) if v is not None
        )
        params = tuple(v for v in (stream, tag) if v is not None)
        row = self.conn.execute(
            f"SELECT ts FROM events WHERE {where} ORDER BY seq DESC LIMIT 1", params
        ).fetchone()
        return row[0] if row else None

    def seq_before(self, ts: str) -> int:
        """The last sequence number appended before time ``ts`` (0 if none): events after it are
        the ones at or after ``ts``."""
        row = self.conn.execute("SELECT min(seq) FROM events WHERE ts >= ?", (ts,)).fetchone()
        return (row[0] - 1) if row[0] is not None else self.last_seq()

    # ------------------------------------------------------------------ notification cursors
    # Per notification target, the last event sequence number it was given (or that was recorded as
    # failed for it), kept in the meta table as "notify:<target>" -> {"seq", "ok_seq", "ok_ts"} (ok_*: the
    # last one delivered, and when). Written only after
    # a delivery: a crash between an event's commit and its delivery leaves the cursor before it, so
    # the next daemon sends it again (at least once).
    _NOTIFY = "notify:"

    def notify_cursors(self) -> dict[str, dict]:
        rows = self.conn.execute(
            "SELECT key, value FROM meta WHERE key >= ? AND key < ?", (self._NOTIFY, "notify;")
        )
        out = {}
        for key, value in rows:
            try:
                out[key[len(self._NOTIFY) :]] = msgspec.json.decode(value)
            except msgspec.DecodeError:
                continue
        return out

    def set_notify_cursor(self, target: str, seq: int, delivered: bool = True) -> None:
        """Move ``target``'s cursor to ``seq`` (autocommit, like a metrics row); ``delivered`` also
        stamps when it last succeeded."""
        old = self.notify_cursors().get(target, {})
        value = (
            {"seq": seq, "ok_seq": seq, "ok_ts": utc_now()}
            if delivered
            else {"seq": seq, "ok_seq": old.get("ok_seq"), "ok_ts": old.get("ok_ts")}
        )
        self.conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
            (self._NOTIFY + target, msgspec.json.encode(value).decode()),
        )

    def read_kinds(self, after: int, tags: Sequence[str], limit: int = 500) -> list[Recorded]:
        """Events after ``after`` whose stored tag is in ``tags``, oldest first (at most ``limit``)."""
        if not tags:
            return []
        rows = self.conn.execute(
            "SELECT seq, stream, version, ts, body FROM events WHERE seq > ? AND type IN "
            f"({', '.join('?' * len(tags))}) "
            "ORDER BY seq LIMIT ?",
            (after, *tags, limit),
        ).fetchall()
        return [
            Recorded(seq, stream, version, ts, decode(body, self.root))
            for seq, stream, version, ts, body in rows
        ]

    def integrity_check(self) -> str:
        return self.conn.execute("PRAGMA integrity_check").fetchone()[0]
