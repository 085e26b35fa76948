"""The blob store: packs on a backend plus their index in the catalog, written in the order design.md §Write ordering requires.

The coordinator is zero-knowledge: this module moves ciphertext, ids and
unkeyed checksums only (it must not import core.envelope, core.keys or
core.chunkid; an import-linter contract enforces it).
"""

from __future__ import annotations

import bisect
import itertools
import re
import shutil
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType

from coordinator.catalog import Catalog
from coordinator.pack import (
    MISNAMED,
    PackEntry,
    PackWriter,
    checksum,
    pack_id_from_path,
    pack_path,
    read_envelopes,
    read_pack_header,
)
from coordinator.snaprecord import decode_record, encode_record, record_path, sorted_refs
from coordinator.storage import Backend
from core import clock as clock_mod
from core.errors import (
    AlreadyExists,
    IntegrityError,
    NotFound,
    RepositoryMissing,
    UsageError,
)
from core.format import ENVELOPE_KEY_ID, ID_SIZE, KEY_ID_SIZE, MAX_BLOB_SIZE, RepoConfig
from protos.clawback.v1 import common_pb2

DEFAULT_PACK_SIZE = 32 * 1024 * 1024  # design.md §Packs: closed at 32 MiB (configurable)
MIN_ENVELOPE = 48  # design.md §Blob envelope: 32-byte header + 16-byte tag
BLOB_TYPES = (common_pb2.BLOB_TYPE_DATA, common_pb2.BLOB_TYPE_TREE)
CONFIG_PATH = "config"
SNAPSHOT_ID = re.compile(r"[0-9a-f]{32}")
REFS_CACHE = 4  # reference lists can be large: keep only a few
RECOVER_BATCH = 1000  # pack files checked against the catalog per query at start


@dataclass(frozen=True)
class UploadStats:
    blobs_stored: int = 0
    blobs_duplicate: int = 0
    bytes_stored: int = 0
    packs_written: int = 0


@dataclass(frozen=True)
class RecoveryStats:
    """What `recover` did; `problems` lists files it could not index (check reports them too)."""

    staging_removed: int = 0
    packs_indexed: int = 0
    snapshots_indexed: int = 0
    keys_indexed: int = 0
    problems: tuple[str, ...] = field(default_factory=tuple)


def _batched(items: Iterable[str], n: int) -> Iterator[list[str]]:
    it = iter(items)
    while batch := list(itertools.islice(it, n)):
        yield batch


def check_snapshot_id(snapshot_id: str) -> str:
    if not SNAPSHOT_ID.fullmatch(snapshot_id):
        raise UsageError(f"invalid snapshot id {snapshot_id!r} (32 lowercase hex digits)")
    return snapshot_id


class UploadSession:
    """One upload stream: blobs go into this session's own open pack.

    Each full pack is renamed into `data/` and then indexed in one
    transaction before `add` returns (design.md §Write ordering rules 1, 2);
    `finish` closes the last one. On any error the open pack is discarded and
    the session is aborted; packs completed earlier stay indexed.
    """

    def __init__(self, store: BlobStore) -> None:
        self._store = store
        self._writer: PackWriter | None = None
        self._seen: set[bytes] = set()
        self._pending: list[bytes] = []  # ids in the open pack
        self._key_ids: dict[bytes, bytes] = {}  # id -> data key id named by its envelope
        self._pending_bytes = 0
        self._stored = self._duplicate = self._bytes = self._packs = 0
        self._done = False
        # The gRPC servicer may abort from the event loop while a worker thread adds.
        self._lock = threading.RLock()

    def add(self, id: bytes, type: int, envelope: bytes) -> bool:
        """Add one blob; False if it is already stored (or already in this session)."""
        return self.add_many([(id, type, envelope)])[0]

    def add_many(self, blobs: Sequence[tuple[bytes, int, bytes]]) -> list[bool]:
        """Add blobs in order with one catalog query for all of them; for each, False if it
        was already stored (or already in this session, or earlier in `blobs`)."""
        with self._lock:
            if self._done:
                raise UsageError("upload session is closed")
            for id, type, envelope in blobs:
                self._check(id, type, envelope)
            ask = [b[0] for b in blobs if b[0] not in self._seen]
            stored = (
                {i for i, m in zip(ask, self._store.catalog.missing(ask), strict=True) if not m}
                if ask
                else set()
            )
            return [self._add(id, type, envelope, id in stored) for id, type, envelope in blobs]

    @staticmethod
    def _check(id: bytes, type: int, envelope: bytes) -> None:
        if len(id) != ID_SIZE:
            raise UsageError(f"blob id of {len(id)} bytes (ids are {ID_SIZE})")
        if type not in BLOB_TYPES:
            raise UsageError(f"blob {id.hex()[:16]}: invalid blob type {type}")
        if not MIN_ENVELOPE <= len(envelope) <= MAX_BLOB_SIZE:
            raise UsageError(
                f"blob {id.hex()[:16]}: envelope of {len(envelope)} bytes "
                f"(allowed {MIN_ENVELOPE}..{MAX_BLOB_SIZE})"
            )

    def _add(self, id: bytes, type: int, envelope: bytes, stored: bool) -> bool:
        if self._done:
            raise UsageError("upload session is closed")
        if stored or id in self._seen:
            self._duplicate += 1
            return False
        try:
            if self._writer is None:
                self._writer = PackWriter(self._store.backend)
            self._writer.add(id, type, envelope)
            self._seen.add(id)
            self._pending.append(id)
            self._key_ids[id] = bytes(envelope[ENVELOPE_KEY_ID])
            self._pending_bytes += len(envelope)
            self._stored += 1
            self._bytes += len(envelope)
            if self._writer.size >= self._store.pack_size:
                self._close_pack()
        except BaseException:
            self.abort()
            raise
        return True

    def finish(self) -> UploadStats:
        """Close and index the open pack; afterwards every added blob is stored."""
        with self._lock:
            return self._finish()

    def _finish(self) -> UploadStats:
        if not self._done:
            try:
                if self._writer is not None and self._writer.count:
                    self._close_pack()
            except BaseException:
                self.abort()
                raise
            self.abort()  # drops an empty writer's staging file; marks the session done
        return self.stats

    @property
    def stats(self) -> UploadStats:
        return UploadStats(self._stored, self._duplicate, self._bytes, self._packs)

    def abort(self) -> None:
        """Discard the open pack. Blobs in it are no longer counted as stored."""
        with self._lock:
            self._abort()

    def _abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
        for id in self._pending:
            self._seen.discard(id)
        self._stored -= len(self._pending)
        self._bytes -= self._pending_bytes
        self._pending, self._pending_bytes = [], 0
        self._key_ids = {}
        self._done = True

    def _close_pack(self) -> None:
        assert self._writer is not None
        writer, self._writer = self._writer, None
        result = writer.finish()  # rule 1: durable and renamed before indexing
        # rule 2: one transaction; if it fails the pack stays unindexed until recover()
        self._store.catalog.add_pack(
            result.pack_id, result.size, self._store.clock.now_ns(), result.entries, self._key_ids
        )
        self._pending, self._pending_bytes = [], 0
        self._key_ids = {}
        self._packs += 1

    def __enter__(self) -> UploadSession:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.finish()


class BlobStore:
    """Repository operations of the coordinator: config, uploads, reads, keys, snapshots.

    Thread-safe: upload sessions are independent; the catalog serializes writes.
    Disk full anywhere raises `ResourceExhausted` and leaves nothing half-visible.
    """

    def __init__(
        self,
        backend: Backend,
        catalog: Catalog,
        pack_size: int = DEFAULT_PACK_SIZE,
        clock: clock_mod.Clock = clock_mod.SYSTEM,
    ) -> None:
        if pack_size <= 0:
            raise UsageError(f"pack size must be positive, not {pack_size}")
        self.backend = backend
        self.catalog = catalog
        self.pack_size = pack_size
        self.clock = clock
        self._config: RepoConfig | None = None
        self._refs: OrderedDict[str, frozenset[bytes]] = OrderedDict()
        self._lock = threading.Lock()

    # -- repository config -------------------------------------------------
    def init_repository(self, cfg: RepoConfig) -> RepoConfig:
        """Write `config`; AlreadyExists if the repository is initialised."""
        try:
            self.backend.stat(CONFIG_PATH)
        except NotFound:
            pass
        else:
            raise AlreadyExists("a repository already exists here")
        self.backend.put(CONFIG_PATH, cfg.to_json())
        self._config = cfg
        return cfg

    def update_config(self, change: Callable[[RepoConfig], RepoConfig]) -> RepoConfig:
        """Rewrite `config` with `change` applied to the one stored (read afresh, not the
        cached one), atomically; the new config. Only settings that leave stored data valid may
        change (`change` decides which); the repository id and key check never do."""
        with self._lock:
            current = self._read_config()
            new = change(current)
            if new.repo_id != current.repo_id or new.key_check != current.key_check:
                raise UsageError("a repository's id and key check cannot change")
            if new != current:
                self.backend.put(CONFIG_PATH, new.to_json())
            self._config = new
            return new

    def config(self) -> RepoConfig:
        """The repository config (cached); RepositoryMissing if not initialised."""
        if self._config is None:
            self._config = self._read_config()
        return self._config

    def _read_config(self) -> RepoConfig:
        try:
            data = self.backend.get(CONFIG_PATH)
        except NotFound as exc:
            raise RepositoryMissing(
                f"no repository at {self.backend!r}: run `clawback repo init`"
            ) from exc
        return RepoConfig.from_json(data)

    # -- crash recovery ----------------------------------------------------
    def recover(self) -> RecoveryStats:
        """design.md §Write ordering rule 5, run at start before serving: empty the
        staging area, index packs the catalog lacks, and insert rows for
        snapshot records (and keys) the catalog lacks."""
        removed = 0
        staging = self.backend.staging_dir()
        for entry in staging.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink(missing_ok=True)
            removed += 1

        problems: list[str] = []
        packs = snaps = keys = 0
        # Checked against the catalog in batches: memory does not grow with the repository.
        for unchecked in _batched(self.backend.list("data/"), RECOVER_BATCH):
            named: dict[bytes, str] = {}
            for path in unchecked:
                pack_id = pack_id_from_path(path)
                if pack_id is None:
                    problems.append(f"{path}: not a pack name")
                else:
                    named[pack_id] = path
            known = self.catalog.indexed_packs(list(named))
            for pack_id, path in named.items():
                if pack_id not in known:
                    packs += self._index_pack(pack_id, path, problems)

        for path in self.backend.list("keys/"):
            name = path.split("/", 1)[1]
            try:
                key_id = bytes.fromhex(name)
            except ValueError:
                problems.append(f"{path}: not a key id")
                continue
            if self.catalog.get_keys([key_id]):
                continue
            key = common_pb2.WrappedKey()
            try:
                key.ParseFromString(self.backend.get(path))
            except Exception as exc:  # protobuf's DecodeError and friends
                problems.append(f"{path}: unreadable wrapped key: {exc}")
                continue
            if key.key_id != key_id:
                problems.append(f"{path}: holds key {key.key_id.hex()}")
                continue
            self.catalog.put_keys([key], self.clock.now_ns())
            keys += 1

        have = {s.id for s in self.catalog.list_snapshots()}
        for path in self.backend.list("snapshots/"):
            name = path.split("/", 1)[1]
            if name in have:
                continue
            try:
                record = decode_record(self.backend.get(path), f"snapshot record {path}")
            except IntegrityError as exc:
                problems.append(str(exc))
                continue
            if record.info.id != name:
                problems.append(f"{path}: holds snapshot {record.info.id!r}")
                continue
            self.catalog.put_snapshot(record.info)
            snaps += 1
        return RecoveryStats(removed, packs, snaps, keys, tuple(problems))

    def _index_pack(self, pack_id: bytes, path: str, problems: list[str]) -> int:
        """Index one pack the catalog lacks from its own header; 1 if indexed, else 0."""
        try:
            size = self.backend.stat(path)
            header = read_pack_header(self.backend, path, size)
        except IntegrityError as exc:
            problems.append(str(exc))
            return 0
        if header.names(pack_id) is False:
            problems.append(f"pack {pack_id.hex()}: {MISNAMED} (not indexed)")
            return 0
        entries = header.entries
        key_ids = {
            e.id: self.backend.get(path, e.offset + ENVELOPE_KEY_ID.start, KEY_ID_SIZE)
            for e in entries
        }
        self.catalog.add_pack(pack_id, size, self.clock.now_ns(), entries, key_ids)
        return 1

    # -- blobs ---------------------------------------------------------------
    def missing(self, ids: Sequence[bytes]) -> list[bool]:
        """For each id, True when it is not stored (answered from the index)."""
        return self.catalog.missing(ids)

    def upload(self) -> UploadSession:
        return UploadSession(self)

    def read_blobs(
        self, ids: Iterable[bytes], *, verify: bool = True
    ) -> Iterator[tuple[bytes, int, bytes | None, str]]:
        """Yield (id, type, envelope, "") or (id, type, None, error) for each id,
        grouped by pack in offset order. A blob that is not stored, comes back short or
        (with `verify`) fails its checksum comes back with an error instead of raising, so
        a restore can fail just the affected files. Without `verify` the reader must
        authenticate every envelope itself (an agent's restore does: design.md §Wire
        protocol, DownloadBlobs)."""
        wanted = list(dict.fromkeys(ids))
        where = self.catalog.blob_locations(wanted)
        by_pack: dict[bytes, list[PackEntry]] = {}
        for blob_id in wanted:
            loc = where.get(blob_id)
            if loc is None:
                yield blob_id, 0, None, "not stored"
                continue
            by_pack.setdefault(loc.pack, []).append(
                PackEntry(blob_id, loc.type, loc.offset, loc.length, loc.checksum)
            )
        for pack_id, entries in by_pack.items():
            where_ = f"in pack {pack_id.hex()[:16]}"
            answered: set[bytes] = set()
            try:
                for entry, envelope in read_envelopes(self.backend, pack_path(pack_id), entries):
                    answered.add(entry.id)
                    if len(envelope) != entry.length:
                        yield (
                            entry.id,
                            entry.type,
                            None,
                            f"blob {entry.id.hex()[:16]} {where_}: short read",
                        )
                    elif verify and checksum(envelope) != entry.checksum:
                        yield (
                            entry.id,
                            entry.type,
                            None,
                            f"blob {entry.id.hex()[:16]} {where_}: checksum mismatch",
                        )
                    else:
                        yield entry.id, entry.type, envelope, ""
            except NotFound:
                # A missing pack fails its own blobs, not the whole read.
                for entry in entries:
                    if entry.id not in answered:
                        yield (
                            entry.id,
                            entry.type,
                            None,
                            f"blob {entry.id.hex()[:16]} {where_}: pack missing",
                        )

    # -- keys ----------------------------------------------------------------
    def put_keys(self, keys: Iterable[common_pb2.WrappedKey]) -> None:
        """Store wrapped keys: keys/<hex> durably, then the catalog (design.md §Keys,
        §Write ordering rule 3). Idempotent; a stored key id keeps its first form."""
        keys = list(keys)
        for key in keys:
            if len(key.key_id) != KEY_ID_SIZE:
                raise UsageError(f"key id of {len(key.key_id)} bytes (key ids are {KEY_ID_SIZE})")
        have = self.catalog.get_keys(k.key_id for k in keys)
        new = [k for k in keys if k.key_id not in have]
        for key in new:
            self.backend.put(f"keys/{key.key_id.hex()}", key.SerializeToString(deterministic=True))
        if new:
            self.catalog.put_keys(new, self.clock.now_ns())

    def replace_keys(self, keys: Iterable[common_pb2.WrappedKey]) -> int:
        """Replace the wrapped form of stored keys after a rewrap (no data is rewritten):
        keys/<hex> first, then the catalog. Unknown key ids are refused (NotFound)."""
        keys = list(keys)
        have = self.catalog.get_keys(k.key_id for k in keys)
        unknown = [k.key_id.hex() for k in keys if k.key_id not in have]
        if unknown:
            raise NotFound(f"{len(unknown)} keys are not stored (first: {unknown[0]})")
        for key in keys:
            self.backend.put(f"keys/{key.key_id.hex()}", key.SerializeToString(deterministic=True))
        return self.catalog.replace_keys(keys)

    def list_keys(self) -> list[common_pb2.WrappedKey]:
        return self.catalog.list_keys()

    def get_keys(self, key_ids: Iterable[bytes]) -> list[common_pb2.WrappedKey]:
        """The stored keys among `key_ids` (absent ones are left out), in request order."""
        wanted = list(dict.fromkeys(key_ids))
        have = self.catalog.get_keys(wanted)
        return [have[k] for k in wanted if k in have]

    # -- snapshots -----------------------------------------------------------
    def commit_snapshot(self, info: common_pb2.SnapshotInfo, refs: Iterable[bytes]) -> bool:
        """Make a snapshot visible; returns True if it was already committed.

        design.md §Write ordering rules 3 and 4: every reference must be indexed
        and every named key stored (else NotFound, mapped to FAILED_PRECONDITION);
        the record is durable before the catalog row that makes it visible.
        """
        snapshot_id = check_snapshot_id(info.id)
        try:
            self.catalog.get_snapshot(snapshot_id)
        except NotFound:
            pass
        else:
            return True
        ordered = sorted_refs(refs)
        if len(info.root) != ID_SIZE:
            raise UsageError(f"snapshot {snapshot_id}: root id of {len(info.root)} bytes")
        i = bisect.bisect_left(ordered, info.root)
        if i == len(ordered) or ordered[i] != info.root:
            raise UsageError(f"snapshot {snapshot_id}: the root tree is not in the reference list")
        # Every key needed to read the snapshot: its own, and those of the older blobs it
        # deduplicated against (from the envelopes' clear key ids). Restores fetch exactly these.
        # The same pass counts the references that are indexed.
        found, blob_keys = self.catalog.ref_keys(ordered)
        if found != len(ordered):
            missing = [r for r, m in zip(ordered, self.catalog.missing(ordered), strict=True) if m]
            raise NotFound(
                f"snapshot {snapshot_id}: {len(missing)} referenced blobs are not stored "
                f"(first: {missing[0].hex() if missing else '?'})"
            )
        key_ids = sorted(set(info.key_ids) | blob_keys)
        del info.key_ids[:]
        info.key_ids.extend(key_ids)
        have = self.catalog.get_keys(key_ids)
        absent = [k for k in key_ids if k not in have]
        if absent:
            raise NotFound(
                f"snapshot {snapshot_id}: {len(absent)} data keys are not stored "
                f"(first: {absent[0].hex()}); PutKeys must come first"
            )
        self.backend.put(record_path(snapshot_id), encode_record(info, ordered))
        return not self.catalog.put_snapshot(info)

    def snapshot_refs(self, snapshot_id: str) -> frozenset[bytes]:
        """Every blob id the snapshot references, read from its record (cached)."""
        check_snapshot_id(snapshot_id)
        with self._lock:
            cached = self._refs.get(snapshot_id)
            if cached is not None:
                self._refs.move_to_end(snapshot_id)
                return cached
        path = record_path(snapshot_id)
        try:
            data = self.backend.get(path)
        except NotFound as exc:
            raise NotFound(f"snapshot {snapshot_id}: not found") from exc
        record = decode_record(data, f"snapshot record {path}")
        if record.info.id != snapshot_id:
            raise IntegrityError(f"snapshot record {path}: holds snapshot {record.info.id!r}")
        refs = frozenset(record.refs)
        with self._lock:
            self._refs[snapshot_id] = refs
            while len(self._refs) > REFS_CACHE:
                self._refs.popitem(last=False)
        return refs

    def get_snapshot(self, id_or_prefix: str) -> common_pb2.SnapshotInfo:
        return self.catalog.get_snapshot(id_or_prefix)

    def list_snapshots(
        self, agent: str | None = None, source: str | None = None
    ) -> list[common_pb2.SnapshotInfo]:
        return self.catalog.list_snapshots(agent, source)
