"""The catalog: the coordinator's on-disk index of blobs, packs, snapshots and keys, plus agent and job state (design.md §Catalog).

`packs`, `blobs`, `snapshots` and `keys` are a cache of the repository and
can be rebuilt from the backend (`BlobStore.recover`); `agents` and `jobs`
live only here.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple, Protocol, TypeVar

from google.protobuf import json_format

from coordinator.pack import PackEntry
from core.errors import ClawbackError, NotFound, ResourceExhausted, UsageError
from core.format import ID_SIZE, MAX_IDS_PER_QUERY
from protos.clawback.v1 import admin_pb2, common_pb2

SQL_BATCH = 999  # host parameters per statement: the historic SQLite limit
# Memory per connection (one per thread that uses the catalog): SQLite's page cache, and no
# memory map, so the blob index stays on disk and is read through the OS page cache; the
# coordinator's RSS does not grow with the repository (design.md §Catalog). A larger cache
# was measured not to make MissingBlobs faster at 10M blobs (docs/performance.md).
CACHE_KIB = 2048
# MissingBlobs in one statement per MAX_IDS_PER_QUERY ids: the ids travel as one blob
# (sorted, concatenated) and are cut apart in SQL, instead of 999 bound parameters per
# statement and an IN list SQLite first sorts into a temporary B-tree. Sorted ids let
# consecutive seeks share the upper pages of the narrow `blobs_ids` index (schema 3). The
# answer is one row (the positions of the indexed ids), so the whole lookup runs in SQLite
# without the GIL and concurrent queries use several cores.
# k(i) counts the ids of ?1 (?2 of them); each joins the blob row its ID_SIZE bytes name.
_EACH_ID = "WITH RECURSIVE k(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM k WHERE i + 1 < ?2) "
_ID_OF_K = f"blobs.id = substr(?1, k.i * {ID_SIZE} + 1, {ID_SIZE})"
MISSING_SQL = (
    f"{_EACH_ID}SELECT group_concat(k.i) FROM k JOIN blobs INDEXED BY blobs_ids ON {_ID_OF_K}"
)
# The data keys of a commit's references and how many of them are indexed, in the same
# one-statement form (the wide table: key_id is not in blobs_ids). One pass serves both
# checks of a commit; a NULL key_id group counts blobs indexed without a key.
KEY_IDS_SQL = (
    f"{_EACH_ID}SELECT blobs.key_id, count(*) FROM k JOIN blobs ON {_ID_OF_K} GROUP BY blobs.key_id"
)
T = TypeVar("T")


class BlobLocation(NamedTuple):
    """Where an indexed blob lives."""

    pack: bytes
    offset: int
    length: int
    checksum: bytes
    type: int


class PackRow(NamedTuple):
    id: bytes
    size: int
    blob_count: int
    created_ns: int


class Catalog(Protocol):
    """The coordinator's index and state. Every method is thread-safe.

    Idempotency: every `put_*`/`add_*`/`upsert_*` call may be repeated with the
    same arguments without effect beyond the first (retries after a crash are
    safe). Lookups of something absent raise `NotFound` unless stated.
    A full disk raises `ResourceExhausted`; any other database failure raises
    `ClawbackError`. Implementations: `SqliteCatalog`; PostgreSQL later.
    """

    def close(self) -> None: ...

    # -- blobs and packs ------------------------------------------------
    def missing(self, ids: Sequence[bytes]) -> list[bool]:
        """For each id, True when it is not indexed (design.md §Write ordering rule 2)."""

    def add_pack(
        self,
        pack_id: bytes,
        size: int,
        created_ns: int,
        entries: Sequence[PackEntry],
        key_ids: Mapping[bytes, bytes] | None = None,
    ) -> int:
        """Index a pack and its blobs in ONE transaction (design.md §Write ordering
        rule 2), with the data key id of each blob when known. A blob already
        indexed elsewhere keeps its first location. Returns the number of blobs
        newly indexed. Idempotent."""

    def has_pack(self, pack_id: bytes) -> bool: ...

    def indexed_packs(self, pack_ids: Sequence[bytes]) -> set[bytes]:
        """The indexed packs among `pack_ids`."""

    def list_pack_ids(self) -> list[bytes]: ...

    def iter_packs(self) -> Iterator[PackRow]:
        """Every indexed pack, in id order."""

    def pack_blobs(self, pack_id: bytes) -> list[PackEntry]:
        """The blobs indexed as living in `pack_id`, in offset order."""

    def blob_locations(self, ids: Sequence[bytes]) -> dict[bytes, BlobLocation]:
        """Locations of the indexed ids among `ids`; absent ids are left out."""

    def count_blobs(self) -> int: ...

    # -- snapshots -------------------------------------------------------
    def put_snapshot(self, info: common_pb2.SnapshotInfo) -> bool:
        """Make a snapshot visible. Returns False if the id was already present
        (the first row is kept). Idempotent."""

    def get_snapshot(self, id_or_prefix: str) -> common_pb2.SnapshotInfo:
        """By full id or unique prefix: NotFound if none, UsageError "ambiguous prefix" if several."""

    def list_snapshots(
        self, agent: str | None = None, source: str | None = None
    ) -> list[common_pb2.SnapshotInfo]:
        """Ordered by start time (then id), oldest first."""

    def latest_snapshot(self, agent: str, source: str) -> common_pb2.SnapshotInfo | None: ...

    # -- keys ------------------------------------------------------------
    def put_keys(self, keys: Iterable[common_pb2.WrappedKey], now_ns: int) -> None:
        """Store wrapped keys; a key id already present keeps its first form. Idempotent."""

    def replace_keys(self, keys: Iterable[common_pb2.WrappedKey]) -> int:
        """Replace the wrapped form of already stored keys; returns how many changed."""

    def list_keys(self) -> list[common_pb2.WrappedKey]: ...

    def blob_key_ids(self, ids: Sequence[bytes]) -> set[bytes]:
        """The distinct data keys recorded for these blobs."""

    def ref_keys(self, ids: Sequence[bytes]) -> tuple[int, set[bytes]]:
        """How many of the distinct ids are indexed, and their distinct data keys: a commit's
        two checks in one pass."""

    def get_keys(self, key_ids: Iterable[bytes]) -> dict[bytes, common_pb2.WrappedKey]:
        """The stored keys among `key_ids`; absent ones are left out."""

    # -- agents ----------------------------------------------------------
    def upsert_agent(
        self,
        name: str,
        hostname: str,
        version: str,
        sources: Sequence[common_pb2.SourceSpec],
        capabilities: Sequence[str],
        now_ns: int,
    ) -> None:
        """Record an agent's latest Hello; first_seen_ns is set once; revocation is kept."""

    def list_agents(self) -> list[admin_pb2.AgentInfo]:
        """All known agents by name (`connected` and `address` are left for the registry)."""

    def set_revoked(self, name: str, revoked: bool) -> admin_pb2.AgentInfo:
        """NotFound for an unknown agent. Idempotent."""

    def is_revoked(self, name: str) -> bool:
        """False for an agent never seen."""

    # -- jobs ------------------------------------------------------------
    def put_job(self, job: common_pb2.JobInfo) -> None:
        """Insert or replace a job by id. Idempotent."""

    def get_job(self, id_or_prefix: str) -> common_pb2.JobInfo:
        """By full id or unique prefix, as `get_snapshot`."""

    def list_jobs(self, agent: str | None = None, limit: int = 100) -> list[common_pb2.JobInfo]:
        """Newest first."""


# Forward-only: entry i takes the schema from user_version i to i+1. Never edit a
# released entry; append a new one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE blobs (
        id BLOB PRIMARY KEY,
        type INTEGER NOT NULL,
        pack BLOB NOT NULL,
        "offset" INTEGER NOT NULL,
        length INTEGER NOT NULL,
        checksum BLOB NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX blobs_by_pack ON blobs (pack, "offset");
    CREATE TABLE packs (
        id BLOB PRIMARY KEY,
        size INTEGER NOT NULL,
        blob_count INTEGER NOT NULL,
        created_ns INTEGER NOT NULL
    );
    CREATE TABLE snapshots (
        id TEXT PRIMARY KEY,
        agent TEXT NOT NULL,
        source TEXT NOT NULL,
        started_ns INTEGER NOT NULL,
        finished_ns INTEGER NOT NULL,
        parent TEXT NOT NULL,
        root BLOB NOT NULL,
        info BLOB NOT NULL
    );
    CREATE INDEX snapshots_by_source ON snapshots (agent, source, started_ns);
    CREATE INDEX snapshots_by_time ON snapshots (started_ns, id);
    CREATE TABLE keys (
        key_id BLOB PRIMARY KEY,
        provider TEXT NOT NULL,
        wrapped BLOB NOT NULL,
        created_ns INTEGER NOT NULL
    );
    CREATE TABLE agents (
        name TEXT PRIMARY KEY,
        hostname TEXT NOT NULL,
        version TEXT NOT NULL,
        sources TEXT NOT NULL,
        capabilities TEXT NOT NULL,
        first_seen_ns INTEGER NOT NULL,
        last_seen_ns INTEGER NOT NULL,
        revoked INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        kind INTEGER NOT NULL,
        agent TEXT NOT NULL,
        source TEXT NOT NULL,
        state INTEGER NOT NULL,
        info BLOB NOT NULL,
        created_ns INTEGER NOT NULL,
        updated_ns INTEGER NOT NULL
    );
    CREATE INDEX jobs_by_time ON jobs (created_ns);
    CREATE INDEX jobs_by_agent ON jobs (agent, created_ns);
    """,
    # 2: the data key that sealed each blob (read from its envelope header), so a
    # commit can name every key a snapshot needs, including keys of deduplicated blobs.
    """
    ALTER TABLE blobs ADD COLUMN key_id BLOB;
    """,
    # 3: the ids alone, for MissingBlobs. A blobs row is ~110 bytes and a WITHOUT ROWID table
    # keeps whole rows in its interior pages too (~31 per 4 KiB page: 5 levels at 10M blobs);
    # this index holds ~110 ids per page (4 levels), so a lookup reads ~1.2 pages from the OS
    # instead of ~1.9 and compares fewer keys (docs/performance.md §Coordinator scale).
    """
    CREATE INDEX blobs_ids ON blobs (id);
    """,
)


def _translate(exc: sqlite3.Error) -> ClawbackError:
    if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
        return ResourceExhausted(f"coordinator disk full: catalog: {exc}")
    return ClawbackError(f"catalog: {exc}")


def _snapshot(blob: bytes) -> common_pb2.SnapshotInfo:
    info = common_pb2.SnapshotInfo()
    info.ParseFromString(blob)
    return info


def _job(blob: bytes) -> common_pb2.JobInfo:
    job = common_pb2.JobInfo()
    job.ParseFromString(blob)
    return job


def _chunks(seq: Sequence[T], n: int) -> Iterator[Sequence[T]]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


class SqliteCatalog:
    """The v1 catalog: one SQLite file in WAL mode, synchronous=FULL, one connection per thread."""

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._closed = False
        self._migrate()

    # -- plumbing ----------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            if self._closed:
                raise ClawbackError("catalog is closed")
            try:
                # Autocommit mode: every write below opens its own BEGIN IMMEDIATE.
                conn = sqlite3.connect(
                    self.path, isolation_level=None, check_same_thread=False, timeout=60
                )
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")  # design.md §Catalog
                conn.execute("PRAGMA foreign_keys=ON")
                conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
                conn.execute("PRAGMA mmap_size=0")
            except sqlite3.Error as exc:
                raise _translate(exc) from exc
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return fn(self._conn())
        except sqlite3.Error as exc:
            raise _translate(exc) from exc

    def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:  # SQLite may have rolled back already (e.g. disk full)
                    conn.execute("ROLLBACK")
                raise
            return result
        except sqlite3.Error as exc:
            raise _translate(exc) from exc

    def _migrate(self) -> None:
        def run(conn: sqlite3.Connection) -> None:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise ClawbackError(
                    f"catalog {self.path}: schema version {version} is newer than this "
                    f"build ({len(MIGRATIONS)})"
                )
            for number in range(version, len(MIGRATIONS)):
                for statement in MIGRATIONS[number].split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {number + 1}")

        self._write(run)

    def schema_version(self) -> int:
        return self._read(lambda c: int(c.execute("PRAGMA user_version").fetchone()[0]))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns, self._all = self._all, []
        for conn in conns:
            conn.close()
        self._local = threading.local()

    # -- blobs and packs ---------------------------------------------------
    def missing(self, ids: Sequence[bytes]) -> list[bool]:
        # Only ID_SIZE-byte ids can be indexed (and MISSING_SQL cuts the blob at that size).
        unique = sorted({i for i in ids if len(i) == ID_SIZE})

        def run(conn: sqlite3.Connection) -> set[bytes]:
            present: set[bytes] = set()
            for chunk in _chunks(unique, MAX_IDS_PER_QUERY):
                (found,) = conn.execute(MISSING_SQL, (b"".join(chunk), len(chunk))).fetchone()
                if found:
                    present.update(chunk[int(i)] for i in found.split(","))
            return present

        present = self._read(run)
        return [i not in present for i in ids]

    def add_pack(
        self,
        pack_id: bytes,
        size: int,
        created_ns: int,
        entries: Sequence[PackEntry],
        key_ids: Mapping[bytes, bytes] | None = None,
    ) -> int:
        keys = key_ids or {}
        # In id order: the inserts walk the id-keyed B-trees front to back (~10 % less CPU
        # than in pack order, whose ids are random).
        rows = sorted(
            (e.id, e.type, pack_id, e.offset, e.length, e.checksum, keys.get(e.id)) for e in entries
        )

        def run(conn: sqlite3.Connection) -> int:
            conn.execute(
                "INSERT OR IGNORE INTO packs (id, size, blob_count, created_ns) VALUES (?, ?, ?, ?)",
                (pack_id, size, len(rows), created_ns),
            )
            before = conn.total_changes
            # design.md §Write ordering: a blob stored twice is indexed once (first wins).
            conn.executemany(
                'INSERT OR IGNORE INTO blobs (id, type, pack, "offset", length, checksum, key_id) '
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            return conn.total_changes - before

        return self._write(run)

    def has_pack(self, pack_id: bytes) -> bool:
        return self._read(
            lambda c: (
                c.execute("SELECT 1 FROM packs WHERE id = ?", (pack_id,)).fetchone() is not None
            )
        )

    def indexed_packs(self, pack_ids: Sequence[bytes]) -> set[bytes]:
        def run(conn: sqlite3.Connection) -> set[bytes]:
            out: set[bytes] = set()
            for chunk in _chunks(list(dict.fromkeys(pack_ids)), SQL_BATCH):
                sql = f"SELECT id FROM packs WHERE id IN ({','.join('?' * len(chunk))})"
                out.update(r[0] for r in conn.execute(sql, chunk))
            return out

        return self._read(run)

    def list_pack_ids(self) -> list[bytes]:
        return self._read(lambda c: [r[0] for r in c.execute("SELECT id FROM packs ORDER BY id")])

    def iter_packs(self) -> Iterator[PackRow]:
        rows = self._read(
            lambda c: c.execute(
                "SELECT id, size, blob_count, created_ns FROM packs ORDER BY id"
            ).fetchall()
        )
        return (PackRow(*r) for r in rows)

    def pack_blobs(self, pack_id: bytes) -> list[PackEntry]:
        return self._read(
            lambda c: [
                PackEntry(*r)
                for r in c.execute(
                    'SELECT id, type, "offset", length, checksum FROM blobs WHERE pack = ? '
                    'ORDER BY "offset"',
                    (pack_id,),
                )
            ]
        )

    def blob_locations(self, ids: Sequence[bytes]) -> dict[bytes, BlobLocation]:
        def run(conn: sqlite3.Connection) -> dict[bytes, BlobLocation]:
            out: dict[bytes, BlobLocation] = {}
            for chunk in _chunks(list(dict.fromkeys(ids)), SQL_BATCH):
                sql = (
                    'SELECT id, pack, "offset", length, checksum, type FROM blobs '
                    f"WHERE id IN ({','.join('?' * len(chunk))})"
                )
                for row in conn.execute(sql, chunk):
                    out[row[0]] = BlobLocation(*row[1:])
            return out

        return self._read(run)

    def count_blobs(self) -> int:
        return self._read(lambda c: int(c.execute("SELECT count(*) FROM blobs").fetchone()[0]))

    # -- snapshots ---------------------------------------------------------
    def put_snapshot(self, info: common_pb2.SnapshotInfo) -> bool:
        row = (
            info.id,
            info.agent,
            info.source,
            info.started_ns,
            info.finished_ns,
            info.parent,
            info.root,
            info.SerializeToString(deterministic=True),
        )
        return self._write(
            lambda c: (
                c.execute(
                    "INSERT OR IGNORE INTO snapshots (id, agent, source, started_ns, finished_ns, "
                    "parent, root, info) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    row,
                ).rowcount
                == 1
            )
        )

    def get_snapshot(self, id_or_prefix: str) -> common_pb2.SnapshotInfo:
        return _snapshot(self._by_id_or_prefix("snapshots", "snapshot", id_or_prefix))

    def _by_id_or_prefix(self, table: str, what: str, id_or_prefix: str) -> bytes:
        """The info column of the row of `table` whose id is `id_or_prefix` or starts with it
        (and no other's does)."""
        prefix = id_or_prefix.strip().lower()
        if not prefix:
            raise UsageError(f"empty {what} id")

        def run(conn: sqlite3.Connection) -> list[bytes]:
            exact = conn.execute(f"SELECT info FROM {table} WHERE id = ?", (prefix,)).fetchone()
            if exact is not None:
                return [exact[0]]
            # BINARY collation compares UTF-8 bytes; U+10FFFF sorts after any id character.
            return [
                r[0]
                for r in conn.execute(
                    f"SELECT info FROM {table} WHERE id >= ? AND id < ? ORDER BY id LIMIT 2",
                    (prefix, prefix + "\U0010ffff"),
                )
            ]

        found = self._read(run)
        if not found:
            raise NotFound(f"{what} {id_or_prefix}: not found")
        if len(found) > 1:
            raise UsageError(f"{what} {id_or_prefix}: ambiguous prefix")
        return found[0]

    def list_snapshots(
        self, agent: str | None = None, source: str | None = None
    ) -> list[common_pb2.SnapshotInfo]:
        where: list[str] = []
        args: list[str] = []
        if agent is not None:
            where.append("agent = ?")
            args.append(agent)
        if source is not None:
            where.append("source = ?")
            args.append(source)
        sql = "SELECT info FROM snapshots"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY started_ns, id"
        return self._read(lambda c: [_snapshot(r[0]) for r in c.execute(sql, args)])

    def latest_snapshot(self, agent: str, source: str) -> common_pb2.SnapshotInfo | None:
        row = self._read(
            lambda c: c.execute(
                "SELECT info FROM snapshots WHERE agent = ? AND source = ? "
                "ORDER BY started_ns DESC, id DESC LIMIT 1",
                (agent, source),
            ).fetchone()
        )
        return None if row is None else _snapshot(row[0])

    # -- keys --------------------------------------------------------------
    def put_keys(self, keys: Iterable[common_pb2.WrappedKey], now_ns: int) -> None:
        rows = [(k.key_id, k.provider, k.wrapped, now_ns) for k in keys]
        self._write(
            lambda c: c.executemany(
                "INSERT OR IGNORE INTO keys (key_id, provider, wrapped, created_ns) "
                "VALUES (?, ?, ?, ?)",
                rows,
            )
        )

    def replace_keys(self, keys: Iterable[common_pb2.WrappedKey]) -> int:
        """Replace the wrapped form of stored keys (after a rewrap); unknown ids are left out."""
        rows = [(k.wrapped, k.provider, k.key_id) for k in keys]

        def run(conn: sqlite3.Connection) -> int:
            before = conn.total_changes
            conn.executemany("UPDATE keys SET wrapped = ?, provider = ? WHERE key_id = ?", rows)
            return conn.total_changes - before

        return self._write(run)

    def list_keys(self) -> list[common_pb2.WrappedKey]:
        return self._read(
            lambda c: [
                common_pb2.WrappedKey(key_id=k, provider=p, wrapped=w)
                for k, p, w in c.execute(
                    "SELECT key_id, provider, wrapped FROM keys ORDER BY key_id"
                )
            ]
        )

    def blob_key_ids(self, ids: Sequence[bytes]) -> set[bytes]:
        """The distinct data keys that sealed these blobs (blobs indexed without one are skipped)."""
        return self.ref_keys(ids)[1]

    def ref_keys(self, ids: Sequence[bytes]) -> tuple[int, set[bytes]]:
        # Linear on ids in order already (a commit's sorted references).
        unique = [i for i in dict.fromkeys(sorted(ids)) if len(i) == ID_SIZE]

        def run(conn: sqlite3.Connection) -> tuple[int, set[bytes]]:
            found = 0
            keys: set[bytes] = set()
            for chunk in _chunks(unique, MAX_IDS_PER_QUERY):
                for key_id, n in conn.execute(KEY_IDS_SQL, (b"".join(chunk), len(chunk))):
                    found += n
                    if key_id is not None:
                        keys.add(key_id)
            return found, keys

        return self._read(run)

    def get_keys(self, key_ids: Iterable[bytes]) -> dict[bytes, common_pb2.WrappedKey]:
        wanted = list(dict.fromkeys(key_ids))

        def run(conn: sqlite3.Connection) -> dict[bytes, common_pb2.WrappedKey]:
            out: dict[bytes, common_pb2.WrappedKey] = {}
            for chunk in _chunks(wanted, SQL_BATCH):
                sql = (
                    "SELECT key_id, provider, wrapped FROM keys "
                    f"WHERE key_id IN ({','.join('?' * len(chunk))})"
                )
                for key_id, provider, wrapped in conn.execute(sql, chunk):
                    out[key_id] = common_pb2.WrappedKey(
                        key_id=key_id, provider=provider, wrapped=wrapped
                    )
            return out

        return self._read(run)

    # -- agents ------------------------------------------------------------
    def upsert_agent(
        self,
        name: str,
        hostname: str,
        version: str,
        sources: Sequence[common_pb2.SourceSpec],
        capabilities: Sequence[str],
        now_ns: int,
    ) -> None:
        sources_json = json.dumps(
            [json_format.MessageToDict(s, preserving_proto_field_name=True) for s in sources]
        )
        caps_json = json.dumps(list(capabilities))
        self._write(
            lambda c: c.execute(
                "INSERT INTO agents (name, hostname, version, sources, capabilities, "
                "first_seen_ns, last_seen_ns, revoked) VALUES (?, ?, ?, ?, ?, ?, ?, 0) "
                "ON CONFLICT (name) DO UPDATE SET hostname = excluded.hostname, "
                "version = excluded.version, sources = excluded.sources, "
                "capabilities = excluded.capabilities, last_seen_ns = excluded.last_seen_ns",
                (name, hostname, version, sources_json, caps_json, now_ns, now_ns),
            )
        )

    _AGENT_COLUMNS = (
        "name, hostname, version, sources, capabilities, first_seen_ns, last_seen_ns, revoked"
    )

    @staticmethod
    def _agent(row: tuple[object, ...]) -> admin_pb2.AgentInfo:
        name, hostname, version, sources, caps, first, last, revoked = row
        info = admin_pb2.AgentInfo(
            name=str(name),
            hostname=str(hostname),
            version=str(version),
            first_seen_ns=int(first),  # type: ignore[call-overload]
            last_seen_ns=int(last),  # type: ignore[call-overload]
            revoked=bool(revoked),
            capabilities=json.loads(str(caps)),
        )
        for spec in json.loads(str(sources)):
            json_format.ParseDict(spec, info.sources.add())
        return info

    def list_agents(self) -> list[admin_pb2.AgentInfo]:
        sql = f"SELECT {self._AGENT_COLUMNS} FROM agents ORDER BY name"
        return self._read(lambda c: [self._agent(r) for r in c.execute(sql)])

    def set_revoked(self, name: str, revoked: bool) -> admin_pb2.AgentInfo:
        def run(conn: sqlite3.Connection) -> tuple[object, ...] | None:
            conn.execute("UPDATE agents SET revoked = ? WHERE name = ?", (int(revoked), name))
            return conn.execute(  # type: ignore[no-any-return]
                f"SELECT {self._AGENT_COLUMNS} FROM agents WHERE name = ?", (name,)
            ).fetchone()

        row = self._write(run)
        if row is None:
            raise NotFound(f"agent {name}: not found")
        return self._agent(row)

    def is_revoked(self, name: str) -> bool:
        row = self._read(
            lambda c: c.execute("SELECT revoked FROM agents WHERE name = ?", (name,)).fetchone()
        )
        return bool(row and row[0])

    # -- jobs --------------------------------------------------------------
    def put_job(self, job: common_pb2.JobInfo) -> None:
        row = (
            job.id,
            int(job.kind),
            job.agent,
            job.source,
            int(job.state),
            job.SerializeToString(deterministic=True),
            job.created_ns,
            job.updated_ns,
        )
        self._write(
            lambda c: c.execute(
                "INSERT OR REPLACE INTO jobs (id, kind, agent, source, state, info, created_ns, "
                "updated_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            )
        )

    def get_job(self, id_or_prefix: str) -> common_pb2.JobInfo:
        return _job(self._by_id_or_prefix("jobs", "job", id_or_prefix))

    def list_jobs(self, agent: str | None = None, limit: int = 100) -> list[common_pb2.JobInfo]:
        args: list[object]
        if agent is None:
            sql, args = "SELECT info FROM jobs ORDER BY created_ns DESC, id DESC LIMIT ?", [limit]
        else:
            sql = "SELECT info FROM jobs WHERE agent = ? ORDER BY created_ns DESC, id DESC LIMIT ?"
            args = [agent, limit]
        return self._read(lambda c: [_job(r[0]) for r in c.execute(sql, args)])
