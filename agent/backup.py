"""The backup pipeline: walk a directory, chunk and id its files, upload what the repository lacks, commit a snapshot.

Stages (restic's scanner / file saver / tree saver split):

1. walk: one thread lstats every entry (bytes names, directories opened
   with O_NOFOLLOW|O_NOATIME) and builds the Nodes, giving totals for progress;
2. files: `workers` + 1 threads take units of work from a shared list and
   carry each through on their own: read and chunk files (or confirm the ids
   the files cache gave), dedup ids within the run, ask the coordinator which
   are missing, seal those with the snapshot's one data key and send them on
   1-2 upload streams. The event loop only reports progress meanwhile: no
   hop through it per unit. A large file's batches are sealed in parts that
   every thread helps with while its reader reads on;
3. trees: every directory's Tree, bottom-up, sealed and uploaded the same way,
   then the root (a one-node Tree named '.');
4. commit: close the streams (blobs durable), store the wrapped key, commit
   the snapshot with its reference list, then save the files cache.

Memory stays bounded: each thread holds at most one read budget of chunks
while it waits for MissingBlobs, sealing and the upload stream's
back-pressure; a large file at most BIG_FILE_INFLIGHT batches. Unreadable entries become warnings (partial snapshot).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import hashlib
import itertools
import logging
import os
import socket
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agent.client import UploadBuilder
from agent.filescache import NO_XATTRS, SPARSE, CacheHit, FilesCache
from agent.progress import ProgressReporter
from agent.repo import RepoClient, UploadStream
from agent.tree import (
    DIR,
    FILE,
    SYMLINK,
    Owners,
    add_xattrs,
    node_from_stat,
    read_xattrs,
)
from core.chunker import ChunkPolicy
from core.chunkid import IdHasher
from core.clock import SYSTEM, Clock
from core.compression import Compressor
from core.envelope import OVERHEAD, Prepared, SealingKey, seal_into
from core.errors import ClawbackError, KeyMaterialError, NotFound, TransportError, UsageError
from core.format import MAX_IDS_PER_QUERY, TREE_PART_SIZE, RepoConfig
from core.keys import KeyProvider
from core.tree import ROOT_NAME, encode_root, encode_serialized
from core.wire import varint
from protos.clawback.v1 import common_pb2, repo_pb2

DATA = common_pb2.BLOB_TYPE_DATA
TREE = common_pb2.BLOB_TYPE_TREE

MISSING_BATCH = min(4096, MAX_IDS_PER_QUERY)  # ids per MissingBlobs request
READ_BUDGET = 4 * 1024 * 1024  # plaintext bytes a file task gathers before dedup/seal/upload
# Plaintext bytes per sealing thread call: a batch is split over the workers.
SEAL_PART = 1024 * 1024
BIG_FILE_INFLIGHT = 2  # batches of one large file being stored while the next is read
# Large files read at once. With BIG_FILE_INFLIGHT, this bounds the read blocks that chunk
# views pin (docs/performance.md §Agent memory). One is enough: every stage-2 thread helps
# seal its batches, and the other threads read small files meanwhile.
BIG_FILES_AT_ONCE = 1
PROGRESS_TICK = 0.25  # seconds between the event loop's looks at stage 2's counters
# Sealing parts of one large file that may be pending when its next batch is read.
_PARTS_IN_FLIGHT = (BIG_FILE_INFLIGHT - 1) * (READ_BUDGET // SEAL_PART)
HITS_BATCH = 2048  # files-cache hits whose ids are confirmed together
SMALL_GROUP_FILES = 256  # small files handled per thread call
# Large files the files cache knows that are looked at before the walk (_start_known_large).
EARLY_LARGE_FILES = 64
# Envelope bytes per upload message. 1 MiB instead of 2: as fast, and the agent's peak in a full
# 2G backup 197-201 -> 188 MiB (fewer multi-megabyte buffers fragmenting the heap).
UPLOAD_BATCH = 1024 * 1024
MAX_WARNINGS = 1000
# design.md §Files cache: a file whose ctime is this close to the moment it was opened is not
# recorded in the files cache ("racily clean"): a second write within the same timestamp tick
# would leave size, mtime and ctime as they were, and the cache would vouch for stale content
# forever. Local Linux file systems stamp with a clock that ticks every 1-10 ms; FAT and some
# network file systems keep 1-2 s. Such a file is read again next time. The ctime, not the
# mtime: every write sets it, and nobody can set it (an mtime in the future would make a file
# racy forever).
RACY_WINDOW_NS = 2_000_000_000

log = logging.getLogger("clawback.agent.backup")

_O_NOATIME = getattr(os, "O_NOATIME", 0)


@dataclass
class BackupResult:
    """What a backup made: the committed snapshot, skipped entries, and counters."""

    info: common_pb2.SnapshotInfo
    warnings: list[str]
    partial: bool
    progress: common_pb2.Progress = field(default_factory=common_pb2.Progress)
    files_read: int = 0  # files opened and chunked (not taken from the files cache)
    data_blobs_new: int = 0
    tree_blobs_new: int = 0


class _Entry:
    """One walked entry; FILE entries are filled in by the file stage."""

    # No reference back to the parent directory: the walk's tree stays free of cycles, so it
    # is freed when the run ends instead of waiting for a full collection (the agent's memory
    # grew by a tree's worth with every job).
    # No stat result either (656 B each): the node holds what the files cache compares. A
    # file's chunk ids and sizes stay out of its node (protobuf memory that grows on every
    # append, ~1 KiB per file) until its directory's tree is encoded.
    # No absolute path either: `_Backup.path` makes it from the root when needed.
    # A file whose node the files cache holds has none of its own (node None): `body` is that
    # node serialized, name included, and `size` its size.
    __slots__ = (
        "body",
        "cached",
        "early",
        "ids",
        "no_xattrs",
        "node",
        "ok",
        "primary",
        "racy",
        "rel",
        "size",
        "sizes",
    )

    def __init__(self, node: repo_pb2.Node | None, rel: bytes, size: int = 0) -> None:
        self.node = node
        self.rel = rel  # relative to the root: the files cache key
        self.size = size  # a file's size as the walk saw it
        self.body = b""
        self.early = False  # sent to stage 2 before the walk met it (_start_known_large)
        self.ids: Sequence[bytes] = ()  # a list while the file is read, then a tuple
        self.sizes: Sequence[int] = ()
        self.ok = True
        self.cached = False  # content ids taken from the files cache: the file was not read
        self.no_xattrs = False  # known to have no xattrs (listed, or by the files cache)
        self.primary: _Entry | None = None  # hard link: the entry whose content this one shares
        self.racy = False  # changed just before it was opened: not for the files cache


class _Dir(_Entry):
    __slots__ = ("children",)

    def __init__(self, node: repo_pb2.Node, rel: bytes) -> None:
        super().__init__(node, rel)
        self.children: list[_Entry] = []


# A stage-2 work unit from the walk: ("read", files to read) or ("hits", files-cache hits).
_Unit = tuple[str, list["_Entry"]]


def _node(f: _Entry) -> repo_pb2.Node:
    """A file's node, to be read: one the files cache gave as bytes is parsed (its content
    ids dropped: the read sets them)."""
    if f.node is None:
        n = repo_pb2.Node.FromString(f.body)
        del n.content[:]
        del n.content_sizes[:]
        f.node, f.body = n, b""
    return f.node


def _no_emit(unit: _Unit) -> None:
    pass


_RELEASED = repo_pb2.Node()  # an entry's node once its directory's tree is encoded


class _Tally:
    """What one piece of stage-2 work observed; merged into the run's counters under a lock."""

    __slots__ = (
        "blobs_dedup",
        "blobs_new",
        "bytes_done",
        "bytes_uploaded",
        "data_new",
        "failed",
        "files_done",
        "files_read",
        "files_unchanged",
        "notes",
        "tree_new",
    )

    def __init__(self) -> None:
        self.bytes_done = 0  # bytes read, or taken unchanged from the files cache
        self.files_read = 0
        self.files_done = 0
        self.files_unchanged = 0
        self.blobs_dedup = 0
        self.blobs_new = 0
        self.bytes_uploaded = 0
        self.data_new = 0
        self.tree_new = 0
        self.failed: list[str] = []  # entries left out
        self.notes: list[str] = []  # warnings that do not drop the entry


# The walk looks for the run's error before each directory and every 1,024 entries in one.
STOP_CHECK_MASK = 1023


class _Stop(Exception):
    """Raised in a stage-2 thread that waits while the run has failed: unwinds it quietly."""


class _WorkList:
    """Stage 2's work, shared by its threads (no event loop in the way).

    Units from the walk run in order; urgent work (the sealing parts of large
    files, which hold read blocks) runs first. A thread that must wait (a large
    file with all its parts in flight) runs urgent work meanwhile, so waiting
    never starves the sealing it waits for. The first failure stops every
    thread; `take` returns None once the list is closed and drained.
    """

    def __init__(self) -> None:
        self.cv = threading.Condition(threading.Lock())
        self._urgent: deque[Callable[[], None]] = deque()
        self._units: deque[Callable[[], None]] = deque()
        self._running = 0
        self._closed = False
        self.error: BaseException | None = None

    def add(self, fn: Callable[[], None], urgent: bool = False) -> None:
        with self.cv:
            (self._urgent if urgent else self._units).append(fn)
            self.cv.notify()

    def close(self) -> None:
        """No more units will be added (urgent work may still be, by running work)."""
        with self.cv:
            self._closed = True
            self.cv.notify_all()

    def fail(self, exc: BaseException) -> None:
        with self.cv:
            if isinstance(exc, _Stop):
                pass
            elif self.error is None or (
                # A refusal (disk full, permission) over a broken transport, which is often only
                # the echo of the refusal on another stream of the same job.
                isinstance(self.error, TransportError)
                and isinstance(exc, ClawbackError)
                and not isinstance(exc, TransportError)
            ):
                self.error = exc
            self._urgent.clear()
            self._units.clear()
            self.cv.notify_all()

    def run(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except BaseException as exc:  # delivered to the run by `error`
            self.fail(exc)

    def take(self) -> Callable[[], None] | None:
        with self.cv:
            while True:
                if self.error is not None:
                    return None
                if self._urgent:
                    fn = self._urgent.popleft()
                elif self._units:
                    fn = self._units.popleft()
                elif self._closed and not self._running:
                    self.cv.notify_all()
                    return None
                else:
                    self.cv.wait()
                    continue
                self._running += 1
                return fn

    def done(self) -> None:
        with self.cv:
            self._running -= 1
            if not self._running:
                self.cv.notify_all()

    def wait_until(self, ready: Callable[[], bool]) -> None:
        """Block until `ready()` (evaluated under `cv`), running urgent work meanwhile; raises
        _Stop once the run has failed. Whoever makes `ready` true must notify `cv`."""
        with self.cv:
            while True:
                # First: a reader that is never held back (its chunks all known) must still
                # stop when the run has failed or was cancelled.
                if self.error is not None:
                    raise _Stop
                if ready():
                    return
                if self._urgent:
                    fn = self._urgent.popleft()
                    self.cv.release()
                    try:
                        self.run(fn)
                    finally:
                        self.cv.acquire()
                    continue
                self.cv.wait()

    def thread_main(self) -> None:
        while (fn := self.take()) is not None:
            try:
                self.run(fn)
            finally:
                self.done()


class _Uploader:
    """Seals blobs straight into ~UPLOAD_BATCH messages, one builder per upload stream.

    A sealing thread compresses outside any lock (envelope.Prepared), then
    encrypts into the next builder in turn under its lock; a full message
    goes to that builder's stream. A stream that takes messages from a thread
    (`put_message`, agent/client.py's _ThreadUpload) gets them directly and
    blocks the sealer while it is congested; any other stream is sent to
    through the event loop.
    """

    def __init__(self, repo: RepoClient, job_id: str, n_streams: int, max_envelope: int) -> None:
        self._repo, self._job_id, self._n = repo, job_id, n_streams
        self._capacity = UPLOAD_BATCH + max_envelope + 1024  # a full batch, then one more blob
        self._streams: list[UploadStream] = []
        self._builders: list[tuple[threading.Lock, UploadBuilder]] = []
        self._turn = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for _ in range(self._n):
            self._streams.append(await self._repo.open_upload(self._job_id))
            self._builders.append((threading.Lock(), UploadBuilder(self._capacity)))

    def seal_and_add(
        self,
        key: SealingKey,
        blob_id: bytes,
        btype: int,
        plaintext: memoryview | bytes,
        compressor: Compressor,
    ) -> int:
        """Thread: seal one blob into a message; its envelope's size."""
        blob = Prepared(key, blob_id, btype, plaintext, compressor)
        i = next(self._turn) % len(self._builders)
        lock, builder = self._builders[i]
        with lock:
            seal_into(key, blob, builder.reserve(blob_id, btype, blob.size))
            msg = builder.take() if builder.fill >= UPLOAD_BATCH else None
        if msg is not None:
            self._send_from_thread(i, msg)
        return blob.size

    def _send_from_thread(self, i: int, msg: bytes) -> None:
        stream = self._streams[i]
        put: Callable[[bytes], None] | None = getattr(stream, "put_message", None)
        if put is not None:
            put(msg)
        else:
            assert self._loop is not None
            asyncio.run_coroutine_threadsafe(stream.send_message(msg), self._loop).result()

    def _flush_from_thread(self) -> None:
        for i, (lock, builder) in enumerate(self._builders):
            with lock:
                msg = builder.take() if builder.fill else None
            if msg is not None:
                self._send_from_thread(i, msg)

    async def close(self) -> None:
        await asyncio.to_thread(self._flush_from_thread)
        # Closing waits for the coordinator to make the stream's blobs durable: all at once.
        await asyncio.gather(*(s.close() for s in self._streams))
        self._streams = []
        self._builders = []

    async def abort(self) -> None:
        for s in self._streams:
            with contextlib.suppress(Exception):
                await s.abort()
        self._streams = []
        self._builders = []


class _Backup:
    def __init__(
        self,
        repo: RepoClient,
        keys: KeyProvider,
        cfg: RepoConfig,
        root: Path,
        *,
        job_id: str,
        cache: FilesCache,
        on_progress: Callable[[common_pb2.Progress], None] | None,
        workers: int,
        clock: Clock,
    ) -> None:
        self.repo, self.cfg, self.job_id, self.cache, self.clock = repo, cfg, job_id, cache, clock
        self.root = os.fsencode(root)
        self.workers = max(1, workers)
        self.hasher = IdHasher(keys.id_key())
        self.chunking = ChunkPolicy(cfg)  # which chunker cuts which file
        self.compressor = Compressor(cfg.compression)
        self.owners = Owners()
        self.sealing: SealingKey | None = None
        self.warnings: list[str] = []
        self.errors = 0
        self.noatime = _O_NOATIME
        # Dedup within the run: an id is claimed by the first task that meets it with
        # its data (or that confirms it stored); the claimer makes sure it is stored.
        self.claimed: set[bytes] = set()
        self.dirs: list[_Dir] = []
        self.files: list[_Entry] = []
        self.links: list[_Entry] = []  # hard links sharing a primary's content
        # Stage-2 units being gathered by the walk's thread (_route).
        self._emit: Callable[[_Unit], None] = _no_emit
        self._group: list[_Entry] = []
        self._group_size = 0
        self._hits: list[_Entry] = []
        self._early: dict[bytes, _Entry] = {}  # large files read before the walk met them
        self._early_failed: dict[bytes, str] = {}  # their failures, until the walk meets them
        self._warn_lock = threading.Lock()
        self._lock = threading.Lock()  # the counters and `claimed`, shared by stage 2's threads
        self.work = _WorkList()
        self._big_active = 0  # large files being read (guarded by work.cv)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.reporter = ProgressReporter(on_progress, clock)
        self.p = self.reporter.p
        self.files_read = 0
        self.data_new = 0
        self.tree_new = 0
        self.bytes_ok = 0  # the snapshot's file bytes, summed as the trees are built

    # -- helpers -----------------------------------------------------------------

    def warn(self, msg: str) -> None:
        with self._warn_lock:  # the walk's thread warns while the event loop does
            self.errors += 1
            self.p.errors = self.errors
            if len(self.warnings) < MAX_WARNINGS:
                self.warnings.append(msg)

    def progress(self, force: bool = False) -> None:
        self.reporter.report(force)

    # -- stage 1: walk -----------------------------------------------------------

    def path(self, e: _Entry) -> bytes:
        """An entry's absolute path (for opening and for messages)."""
        return self.root + b"/" + e.rel if e.rel else self.root

    def _open_dir(self, path: bytes) -> int:
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        if self.noatime:
            try:
                return os.open(path, flags | self.noatime)
            except PermissionError:
                self.noatime = 0
        return os.open(path, flags)

    def check_root(self) -> os.stat_result:
        try:
            st = os.lstat(self.root)
        except FileNotFoundError:
            raise NotFound(f"source directory {os.fsdecode(self.root)} does not exist") from None
        if not stat.S_ISDIR(st.st_mode):
            raise UsageError(f"source {os.fsdecode(self.root)} is not a directory")
        return st

    def walk(self, emit: Callable[[_Unit], None]) -> _Dir:
        """Thread: walk the tree, handing full work units to stage 2 as they are found (`emit`).

        Each file is looked up in the files cache right after its lstat: a hit
        joins a batch of ids to confirm, a miss a read unit (a large file alone,
        small files in groups), so reading starts long before the walk ends.
        The units not yet full when the walk ends are left for `_flush_units`.
        """
        # The walk only allocates (no cycles to collect): the collector's passes over the
        # growing tree would be pure overhead.
        enabled = gc.isenabled()
        gc.disable()
        self._emit = emit
        try:
            return self._walk()
        finally:
            if enabled:
                gc.enable()
            self._early = {}  # not met by the walk: read for nothing, left out

    def _route(self, f: _Entry, hit: CacheHit | None) -> None:
        """Walk thread: send one regular file (not a second hard link) on to stage 2."""
        if hit is not None:
            f.ids, f.sizes = hit[0], hit[1]
            self._hits.append(f)
            if len(self._hits) >= HITS_BATCH:
                self._emit(("hits", self._hits))
                self._hits = []
            return
        size = f.size
        if size >= READ_BUDGET:
            self._emit(("read", [f]))
            return
        self._group.append(f)
        self._group_size += size
        if self._group_size >= READ_BUDGET or len(self._group) >= SMALL_GROUP_FILES:
            self._emit(("read", self._group))
            self._group, self._group_size = [], 0

    def _flush_units(self) -> None:
        if self._group:
            self._emit(("read", self._group))
            self._group, self._group_size = [], 0
        if self._hits:
            self._emit(("hits", self._hits))
            self._hits = []

    def _start_known_large(self) -> None:
        """Walk thread, before the walk: the large files the files cache knows that have
        changed are sent to stage 2 now, not when the walk reaches them. In a re-backup a
        changed large file (a database) is the longest unit, and the walk took ~0.5 s of a 2 s
        run to reach it. The walk attaches each to its directory when it lists it; one it does
        not meet (gone since) is read for nothing and left out of the snapshot."""
        for rel in self.cache.largest(READ_BUDGET, EARLY_LARGE_FILES):
            est = self._lstat_below(rel)
            if (
                est is None
                or not stat.S_ISREG(est.st_mode)
                or est.st_nlink != 1
                or est.st_size < READ_BUDGET
                or self.cache.unchanged(
                    rel, est.st_size, est.st_mtime_ns, est.st_ctime_ns, est.st_ino, est.st_dev
                )
            ):
                continue  # the walk handles it as usual
            n = node_from_stat(rel.rpartition(b"/")[2], est, self.owners)
            # No file has this ctime: the xattrs are listed from the opened file (_open_file).
            n.ctime_ns = -1
            ent = _Entry(n, rel, est.st_size)
            ent.early = True
            self._early[rel] = ent
            self._emit(("read", [ent]))

    def _lstat_below(self, rel: bytes) -> os.stat_result | None:
        """lstat of `rel` under the root through its directories, none of them a symlink
        (as the walk would find it); None if it cannot be reached so."""
        *dirs, name = rel.split(b"/")
        try:
            fd = self._open_dir(self.root)
        except OSError:
            return None
        try:
            for comp in dirs:
                nfd = os.open(
                    comp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd
                )
                os.close(fd)
                fd = nfd
            return os.stat(name, dir_fd=fd, follow_symlinks=False)
        except (OSError, ValueError):
            return None
        finally:
            os.close(fd)

    def _walk(self) -> _Dir:
        st = self.check_root()
        node = node_from_stat(ROOT_NAME, st, self.owners)
        self._xattrs(node, self.root)
        top = _Dir(node, b"")
        stack = [top]
        inodes: dict[tuple[int, int], _Entry] = {}
        owners, files, p = self.owners, self.files, self.p
        cache_hit = self.cache.hit
        nodes_ok = self._cached_names_hold()
        is_file = stat.S_ISREG
        self._start_known_large()
        early = self._early
        work = self.work
        while stack:
            if work.error is not None:  # the run failed or was cancelled: stop walking
                raise _Stop
            d = stack.pop()
            self.dirs.append(d)
            try:
                dpath = self.path(d)
                fd = self._open_dir(dpath)
            except OSError as exc:
                self._drop_dir(d, f"{_show(dpath)}: cannot open directory: {exc.strerror}")
                continue
            try:
                with os.scandir(fd) as it:
                    listing = [(os.fsencode(e.name), e) for e in it]
                for i, (name, e) in enumerate(listing):
                    if not i & STOP_CHECK_MASK and i and work.error is not None:
                        raise _Stop  # within a large directory too
                    try:
                        est = e.stat(follow_symlinks=False)
                    except OSError as exc:
                        self.warn(f"{_show(dpath + b'/' + name)}: {exc.strerror}")
                        continue
                    rel = d.rel + b"/" + name if d.rel else name
                    if early and is_file(est.st_mode):
                        ent = early.pop(rel, None)
                        if ent is not None:  # being read already (_start_known_large)
                            with self._lock:
                                ent.early = False
                                failed = self._early_failed.pop(rel, None)
                            if failed is not None:
                                self.warn(failed)
                            d.children.append(ent)
                            p.files_total += 1
                            files.append(ent)
                            p.bytes_total += ent.size
                            continue
                    hit = (
                        cache_hit(
                            rel,
                            est.st_size,
                            est.st_mtime_ns,
                            est.st_ctime_ns,
                            est.st_ino,
                            est.st_dev,
                        )
                        if is_file(est.st_mode)
                        else None
                    )
                    if (
                        hit is not None
                        and hit[4]
                        and nodes_ok
                        and hit[3] == est.st_atime_ns
                        and est.st_nlink == 1
                        and bool(hit[2] & SPARSE) == (est.st_blocks * 512 < est.st_size)
                    ):
                        # The node the files cache holds is the one this lstat would give,
                        # byte for byte: every other field it has moves the ctime (design.md
                        # §Files cache). Not built again; no xattrs listed.
                        ent = _Entry(None, rel, est.st_size)
                        ent.body = b"\x0a" + varint(len(name)) + name + hit[4]
                        d.children.append(ent)
                        p.files_total += 1
                        files.append(ent)
                        p.bytes_total += est.st_size
                        self._route(ent, hit)
                        continue
                    path = dpath + b"/" + name
                    n = node_from_stat(name, est, owners)
                    kind = n.type
                    if kind == repo_pb2.NODE_TYPE_UNSPECIFIED:
                        self.warn(f"{_show(path)}: unknown file type, skipped")
                        continue
                    if kind == SYMLINK:
                        try:
                            n.link_target = os.readlink(name, dir_fd=fd)
                        except OSError as exc:
                            self.warn(f"{_show(path)}: cannot read link: {exc.strerror}")
                            continue
                    # A file the files cache knows, with no xattrs then and the same ctime
                    # now, has none now: setting or removing one changes the ctime.
                    if hit is not None and hit[2] & NO_XATTRS:
                        listed: bool | None = True
                    else:
                        listed = self._xattrs(n, path)
                        if listed is None:
                            continue
                    if kind == DIR:
                        sub = _Dir(n, rel)
                        stack.append(sub)
                        d.children.append(sub)
                        continue
                    ent = _Entry(n, rel, n.size)
                    ent.no_xattrs = listed is True and not n.xattrs
                    d.children.append(ent)
                    if kind == FILE:
                        p.files_total += 1
                        if est.st_nlink > 1:
                            key = (est.st_dev, est.st_ino)
                            first = inodes.get(key)
                            if first is not None:
                                ent.primary = first
                                self.links.append(ent)
                                continue
                            inodes[key] = ent
                        files.append(ent)
                        p.bytes_total += est.st_size
                        self._route(ent, hit)
            except OSError as exc:
                self._drop_dir(d, f"{_show(dpath)}: cannot list directory: {exc.strerror}")
            finally:
                os.close(fd)
        return top

    def _cached_names_hold(self) -> bool:
        """Whether the owner names in the files cache's nodes are what they resolve to now
        (the lookups also seed `owners`, whose map is saved with the cache)."""
        users, groups = self.cache.names
        ok = True
        for uid, user in users.items():
            ok = self.owners.user(uid) == user and ok
        for gid, group in groups.items():
            ok = self.owners.group(gid) == group and ok
        return ok

    def _drop_dir(self, d: _Dir, msg: str) -> None:
        self.warn(msg)
        d.ok = False
        d.children = []
        if not d.rel:  # the root itself
            raise NotFound(msg)

    def _xattrs(self, node: repo_pb2.Node, path: bytes, fd: int | None = None) -> bool | None:
        """Add the entry's xattrs (of `fd` when given) to `node`: True if listed, False if they
        could not be (warned), None if the entry vanished (warned: leave it out)."""
        try:
            xs = read_xattrs(path if fd is None else fd)
        except OSError as exc:
            if exc.errno == errno.ENOENT and fd is None:
                self.warn(f"{_show(path)}: vanished")
                return None
            self.warn(f"{_show(path)}: cannot read extended attributes: {exc.strerror}")
            return False
        if xs:
            add_xattrs(node, xs)
        return True

    def _open_file(self, f: _Entry, t: _Tally) -> int | None:
        """Open a file for reading, or warn and return None (vanished, unreadable, changed type)."""
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            if self.noatime:
                try:
                    fd = os.open(self.path(f), flags | self.noatime)
                except PermissionError:
                    self.noatime = 0
                    fd = os.open(self.path(f), flags)
            else:
                fd = os.open(self.path(f), flags)
        except OSError as exc:
            what = "vanished" if exc.errno == errno.ENOENT else exc.strerror
            if exc.errno == errno.ELOOP:
                what = "changed type (now a symlink)"
            self._fail(t, f, f"{_show(self.path(f))}: {what}")
            return None
        try:
            st = os.fstat(fd)
        except OSError as exc:
            os.close(fd)
            self._fail(t, f, f"{_show(self.path(f))}: {exc.strerror}")
            return None
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            self._fail(t, f, f"{_show(self.path(f))}: changed type while backing up")
            return None
        # A file replaced since the walk is backed up as it is now (fstat of what was opened).
        n = _node(f)
        if st.st_ctime_ns != n.ctime_ns:
            # Changed since the walk listed its xattrs: list them again, from what was opened.
            del n.xattrs[:]
            f.no_xattrs = self._xattrs(n, self.path(f), fd) is True and not n.xattrs
        n.size = st.st_size
        n.mode, n.uid, n.gid = st.st_mode & 0o7777, st.st_uid, st.st_gid
        n.mtime_ns, n.atime_ns, n.ctime_ns = st.st_mtime_ns, st.st_atime_ns, st.st_ctime_ns
        n.inode, n.device, n.nlink = st.st_ino, st.st_dev, st.st_nlink
        n.sparse = st.st_blocks * 512 < st.st_size
        # File times are the kernel's wall clock, not the job's clock: compared with time_ns.
        f.racy = st.st_ctime_ns > time.time_ns() - RACY_WINDOW_NS
        return fd

    def _fail(self, t: _Tally, f: _Entry, msg: str) -> None:
        f.ok = False
        self.cache.forget(f.rel)
        with self._lock:
            if f.early:  # reported only if the walk meets it: it may have gone since
                self._early_failed[f.rel] = msg
                return
        t.failed.append(msg)

    def _read_fd(
        self,
        t: _Tally,
        f: _Entry,
        fd: int,
        chunks: Iterator[memoryview],
        out: list[tuple[bytes, memoryview]],
        budget: int,
    ) -> bool:
        """Pull chunks of an open file into `out` until `budget` bytes; True when the file is done (fd closed)."""
        n = _node(f)
        ids, sizes = f.ids, f.sizes
        assert isinstance(ids, list) and isinstance(sizes, list)  # set by _begin_read
        blob_id = self.hasher.blob_id
        got = 0
        try:
            for c in chunks:
                cid = blob_id(c)
                ln = len(c)
                ids.append(cid)
                sizes.append(ln)
                out.append((cid, c))
                got += ln
                if got >= budget:
                    t.bytes_done += got
                    return False
        except OSError as exc:
            t.bytes_done += got
            os.close(fd)
            self._fail(t, f, f"{_show(self.path(f))}: read error: {exc.strerror}")
            return True
        t.bytes_done += got
        os.close(fd)
        f.ids, f.sizes = tuple(ids), tuple(sizes)
        size = sum(sizes)
        stat_size = n.size  # as fstat saw it when the file was opened
        if size != stat_size:
            t.notes.append(
                f"{_show(self.path(f))}: file shrank while being read ({stat_size} -> {size} bytes)"
            )
        n.size = size
        if size == stat_size and not f.racy:
            self.cache.record(
                f.rel,
                (size, n.mtime_ns, n.ctime_ns, n.inode, n.device, f.ids, f.sizes),
                NO_XATTRS if f.no_xattrs else 0,
            )
        return True

    def _small_group(self, t: _Tally, group: list[_Entry]) -> list[tuple[bytes, memoryview]]:
        """Thread: read and chunk a group of small files (the walk looked them up already)."""
        out: list[tuple[bytes, memoryview]] = []
        for f in group:
            n = _node(f)
            if n.size == 0:
                f.ids, f.sizes = (), ()
                self.cache.record(
                    f.rel,
                    (0, n.mtime_ns, n.ctime_ns, n.inode, n.device, (), ()),
                    NO_XATTRS if f.no_xattrs else 0,
                )
                t.files_read += 1
                continue
            f.ids, f.sizes = [], []
            fd = self._open_file(f, t)
            if fd is None:
                continue
            t.files_read += 1
            try:
                chunks = self.chunking.for_fd(f.rel, fd, n.size).chunks_of_fd(fd, n.size)
            except BaseException:
                os.close(fd)
                raise
            self._read_fd(t, f, fd, chunks, out, 1 << 62)
        return out

    def _big_open(self, t: _Tally, f: _Entry) -> int | None:
        """Thread: open a large file for reading (None: it failed, and is warned about)."""
        f.ids, f.sizes = [], []
        fd = self._open_file(f, t)
        if fd is not None:
            t.files_read += 1
        return fd

    def _merge(self, t: _Tally) -> None:
        """Move what a piece of work observed into the run's counters (any thread)."""
        with self._lock:
            for m in t.failed:
                self.warn(m)
            for m in t.notes:
                if len(self.warnings) < MAX_WARNINGS:
                    self.warnings.append(m)
            p = self.p
            p.bytes_done += t.bytes_done
            p.files_done += t.files_done
            p.files_unchanged += t.files_unchanged
            p.blobs_dedup += t.blobs_dedup
            p.blobs_new += t.blobs_new
            p.bytes_uploaded += t.bytes_uploaded
            self.files_read += t.files_read
            self.data_new += t.data_new
            self.tree_new += t.tree_new

    def _missing(self, ids: list[bytes]) -> list[bool]:
        """Thread: MissingBlobs in requests of MISSING_BATCH ids, on the client's thread-side
        call when it has one."""
        call: Callable[[Sequence[bytes]], list[bool]] | None = getattr(
            self.repo, "missing_from_thread", None
        )
        out: list[bool] = []
        for i in range(0, len(ids), MISSING_BATCH):
            part = ids[i : i + MISSING_BATCH]
            if call is not None:
                out += call(part)
            else:
                assert self._loop is not None
                out += asyncio.run_coroutine_threadsafe(
                    self.repo.missing(part), self._loop
                ).result()
        return out

    def _to_store(
        self, t: _Tally, chunks: Sequence[tuple[bytes, memoryview | bytes]]
    ) -> list[tuple[bytes, memoryview | bytes]]:
        """Thread: the chunks this call must store. Dedup within the run (an id is claimed by
        the first call that meets it with its data), then ask MissingBlobs for the rest."""
        mine = self._claim(t, chunks)
        return self._answer(t, mine, self._missing(list(mine))) if mine else []

    def _claim(
        self, t: _Tally, chunks: Sequence[tuple[bytes, memoryview | bytes]]
    ) -> dict[bytes, memoryview | bytes]:
        """Thread: the chunks no other call of this run has met: this one stores them if the
        coordinator has not."""
        mine: dict[bytes, memoryview | bytes] = {}
        with self._lock:
            claimed = self.claimed
            for cid, data in chunks:
                if cid in claimed:
                    t.blobs_dedup += 1
                    continue
                claimed.add(cid)
                mine[cid] = data
        return mine

    @staticmethod
    def _answer(
        t: _Tally, mine: dict[bytes, memoryview | bytes], missing: list[bool]
    ) -> list[tuple[bytes, memoryview | bytes]]:
        todo: list[tuple[bytes, memoryview | bytes]] = []
        for (cid, data), m in zip(mine.items(), missing, strict=True):
            if m:
                todo.append((cid, data))
            else:
                t.blobs_dedup += 1
        return todo

    def _ask(self, ids: list[bytes]) -> Callable[[], list[bool]]:
        """Thread: MissingBlobs for `ids` sent now where the client can (one request), the
        answer read by calling what is returned."""
        send: Callable[[Sequence[bytes]], Callable[[], list[bool]]] | None = getattr(
            self.repo, "missing_future", None
        )
        if send is not None and len(ids) <= MISSING_BATCH:
            return send(ids)
        flags = self._missing(ids)
        return lambda: flags

    def _seal_and_send(
        self, t: _Tally, todo: Sequence[tuple[bytes, memoryview | bytes]], btype: int
    ) -> None:
        """Thread: seal blobs under the snapshot's data key into the upload streams' messages."""
        key, comp, add = self.sealing, self.compressor, self.uploader.seal_and_add
        assert key is not None
        nbytes = 0
        for cid, data in todo:
            nbytes += add(key, cid, btype, data, comp)
        t.blobs_new += len(todo)
        t.bytes_uploaded += nbytes
        if btype == DATA:
            t.data_new += len(todo)
        else:
            t.tree_new += len(todo)

    def _store_now(self, chunks: Sequence[tuple[bytes, memoryview | bytes]], btype: int) -> None:
        """Thread: make sure every chunk is stored, sealing in this thread."""
        t = _Tally()
        todo = self._to_store(t, chunks)
        if todo:
            self._seal_and_send(t, todo, btype)
        self._merge(t)

    def _small_unit(self, group: list[_Entry]) -> None:
        """Thread: read a group of small files and store their chunks."""
        t = _Tally()
        out = self._small_group(t, group)
        t.files_done += len(group)
        self._merge(t)
        self._store_now(out, DATA)

    def _big_unit(self, f: _Entry) -> None:
        """Thread: read one large file batch by batch; each batch's sealing is split into
        urgent parts that every stage-2 thread helps with, while this one reads on."""
        cv = self.work.cv
        while True:  # wait for a turn, then take it under the lock (another may have taken it)
            self.work.wait_until(lambda: self._big_active < BIG_FILES_AT_ONCE)
            with cv:
                if self._big_active < BIG_FILES_AT_ONCE:
                    self._big_active += 1
                    break
        try:
            t = _Tally()
            fd = self._big_open(t, f)
            self._merge(t)
            if fd is not None:
                self._big_file(f, fd)
        finally:
            with cv:
                self._big_active -= 1
                cv.notify_all()
        t = _Tally()
        t.files_done = 1
        self._merge(t)

    def _big_file(self, f: _Entry, fd: int) -> None:
        cv = self.work.cv
        inflight = [0]  # parts of this file queued or being sealed

        def seal_part(part: list[tuple[bytes, memoryview | bytes]]) -> None:
            try:
                t = _Tally()
                self._seal_and_send(t, part, DATA)
                self._merge(t)
            finally:
                with cv:
                    inflight[0] -= 1
                    cv.notify_all()

        def queue(t: _Tally, todo: list[tuple[bytes, memoryview | bytes]]) -> None:
            parts: list[list[tuple[bytes, memoryview | bytes]]] = []
            size = SEAL_PART
            for item in todo:
                if size >= SEAL_PART:
                    parts.append([])
                    size = 0
                parts[-1].append(item)
                size += len(item[1])
            del todo[:]
            self._merge(t)
            for part in parts:
                with cv:
                    inflight[0] += 1
                self.work.add(lambda part=part: seal_part(part), urgent=True)  # type: ignore[misc]

        # The coordinator answers about one batch while the next is read: (tally, claimed
        # chunks, answer) of the batch read last.
        asked: tuple[_Tally, dict[bytes, memoryview | bytes], Callable[[], list[bool]]] | None
        asked = None
        done = False
        try:
            size = _node(f).size
            chunks = self.chunking.for_fd(f.rel, fd, size).chunks_of_fd(fd, size)
            while not done:
                # At most BIG_FILE_INFLIGHT batches stored at once: this one and what is left
                # of the previous ones (and the one being asked about).
                self.work.wait_until(lambda: inflight[0] <= _PARTS_IN_FLIGHT)
                out: list[tuple[bytes, memoryview]] = []
                t = _Tally()
                done = self._read_fd(t, f, fd, chunks, out, READ_BUDGET)
                mine = self._claim(t, out)
                del out
                now = (t, mine, self._ask(list(mine))) if mine else None
                if now is None:
                    self._merge(t)
                if asked is not None:
                    queue(asked[0], self._answer(asked[0], asked[1], asked[2]()))
                asked = now
                del mine, now
            if asked is not None:
                queue(asked[0], self._answer(asked[0], asked[1], asked[2]()))
        except BaseException:
            if not done:
                with contextlib.suppress(OSError):
                    os.close(fd)
            raise

    def _hits_unit(self, hits: list[_Entry]) -> None:
        """Thread: confirm the ids of files taken from the cache are stored; re-read the
        files whose ids are not."""
        t = _Tally()
        ask: list[bytes] = []
        with self._lock:
            claimed = self.claimed
            seen: set[bytes] = set()
            for f in hits:
                for cid in f.ids:
                    if cid not in claimed and cid not in seen:
                        seen.add(cid)
                        ask.append(cid)
        flags = self._missing(ask)
        lost = {cid for cid, m in zip(ask, flags, strict=True) if m}
        with self._lock:
            self.claimed.update(cid for cid, m in zip(ask, flags, strict=True) if not m)
        reread: list[_Entry] = []
        for f in hits:
            if lost and any(cid in lost for cid in f.ids):
                self.cache.forget(f.rel)
                reread.append(f)
            else:
                f.cached = True
                t.files_unchanged += 1
                t.files_done += 1
                t.blobs_dedup += len(f.ids)
                t.bytes_done += f.size
        self._merge(t)
        small = [f for f in reread if f.size < READ_BUDGET]
        for f in reread:
            if f.size >= READ_BUDGET:
                self._big_unit(f)
        for i in range(0, len(small), SMALL_GROUP_FILES):
            self._small_unit(small[i : i + SMALL_GROUP_FILES])

    def _unit(self, unit: _Unit) -> Callable[[], None]:
        kind, entries = unit
        if kind == "hits":
            return lambda: self._hits_unit(entries)
        if len(entries) == 1 and entries[0].size >= READ_BUDGET:
            return lambda: self._big_unit(entries[0])
        return lambda: self._small_unit(entries)

    async def _walk_and_read(self) -> _Dir:
        """Stages 1 and 2 together: the walk's thread adds units to the work list that the
        stage-2 threads drain; the event loop only reports progress meanwhile."""
        self._loop = loop = asyncio.get_running_loop()
        work = self.work = _WorkList()
        finished = asyncio.Event()
        n_threads = self.workers + 1  # one more: there is often one waiting on the network
        left = [n_threads]

        def thread_main() -> None:
            try:
                work.thread_main()
            finally:
                with self._lock:
                    left[0] -= 1
                    last = not left[0]
                if last:
                    loop.call_soon_threadsafe(finished.set)

        for i in range(n_threads):
            threading.Thread(target=thread_main, name=f"clawback-backup_{i}", daemon=True).start()

        def emit(unit: _Unit) -> None:
            work.add(self._unit(unit))

        top: _Dir | None = None
        try:
            try:
                # A thread of its own: the stage-2 threads read while the walk goes on.
                top = await asyncio.to_thread(self.walk, emit)
            except _Stop:
                pass  # the run failed while walking: its error is raised below
            else:
                self.phases["walk"] = self.clock.monotonic() - self.t0
                # The units not yet full follow the walk's final progress report: on a small
                # tree, nothing is read before the walk is complete.
                self.progress(force=True)
                self._flush_units()
            work.close()
            while not finished.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(finished.wait(), PROGRESS_TICK)
                self.progress()
        except BaseException as exc:
            work.fail(exc)  # the stage-2 threads stop at their next unit
            raise
        finally:
            self._emit = _no_emit  # `emit` refers to self: leave no cycle behind
        err, work.error = work.error, None  # its traceback refers to this run: no cycle
        if err is not None:
            raise err
        assert top is not None  # the walk stops early only once the run has an error
        return top

    # -- stage 3: trees ------------------------------------------------------------

    def _build_trees(self, top: _Dir) -> tuple[bytes, list[tuple[bytes, bytes]], set[bytes]]:
        """Thread: serialize every directory bottom-up; (root id, unique tree parts, data ids referenced)."""
        blob_id = self.hasher.blob_id
        parts_out: dict[bytes, bytes] = {}
        data_refs: set[bytes] = set()
        for link in self.links:
            prim = link.primary
            assert prim is not None
            if not prim.ok:
                link.ok = False
                self.warn_later.append(
                    f"{_show(self.path(link))}: hard link to an unreadable file, skipped"
                )
                continue
            n, pn = link.node, prim.node
            assert n is not None and pn is not None  # hard links always build their nodes
            link.ids, link.sizes = prim.ids, prim.sizes
            n.size, n.sparse = pn.size, pn.sparse
        keep_node = self.cache.keep_node
        # self.dirs is in walk (pre-)order: reversed, every directory comes after its children.
        for d in reversed(self.dirs):
            if not d.ok and d is not top:
                continue
            keyed: list[tuple[bytes, bytes]] = []
            for c in d.children:
                if not c.ok:
                    continue
                n = c.node
                if n is None:  # the files cache's node, serialized already
                    data_refs.update(c.ids)
                    c.ids = c.sizes = ()
                    self.bytes_ok += c.size
                    keyed.append((c.rel.rpartition(b"/")[2], c.body))
                    c.body = b""
                    continue
                if n.type == FILE:
                    # The ids join the node only now (see _Entry), and leave the entry.
                    data_refs.update(c.ids)
                    n.content.extend(c.ids)
                    n.content_sizes.extend(c.sizes)
                    c.ids = c.sizes = ()
                    self.bytes_ok += n.size
                    body = n.SerializeToString(deterministic=True)
                    if n.nlink == 1:
                        # For the next run's walk (design.md §Files cache): the node without
                        # its name, which comes first (field 1).
                        head = b"\x0a" + varint(len(n.name)) + n.name
                        if body.startswith(head):
                            keep_node(
                                c.rel,
                                (n.size, n.mtime_ns, n.ctime_ns, n.inode, n.device),
                                n.atime_ns,
                                n.sparse,
                                body[len(head) :],
                            )
                else:
                    body = n.SerializeToString(deterministic=True)
                keyed.append((n.name, body))
                # Encoded and needed no more: a node that holds its ids is ~1 KiB larger, and
                # all of them at once were the run's peak.
                c.node = _RELEASED
            parts = encode_serialized(keyed)
            del keyed
            ids = [blob_id(p) for p in parts]
            for i, p in zip(ids, parts, strict=True):
                parts_out.setdefault(i, p)
            assert d.node is not None
            del d.node.subtree[:]
            d.node.subtree.extend(ids)
        assert top.node is not None
        root = encode_root(top.node)
        root_id = blob_id(root)
        parts_out.setdefault(root_id, root)
        return root_id, list(parts_out.items()), data_refs

    # -- the run -------------------------------------------------------------------

    async def run(self, info: common_pb2.SnapshotInfo, keys: KeyProvider) -> BackupResult:
        self.warn_later: list[str] = []
        self.phases: dict[str, float] = {}
        self.t0 = t0 = self.clock.monotonic()
        max_envelope = max(self.chunking.max_size, TREE_PART_SIZE) + OVERHEAD
        self.uploader = _Uploader(
            self.repo, self.job_id, 1 if self.workers < 2 else 2, max_envelope
        )
        try:
            await asyncio.to_thread(self.check_root)
            dk = await asyncio.to_thread(keys.new_data_key)
            self.sealing = SealingKey(dk.key_id, dk.key)
            wrapped = common_pb2.WrappedKey(
                key_id=dk.key_id, wrapped=dk.wrapped, provider=dk.provider
            )
            del dk
            await self.uploader.start()
            top = await self._walk_and_read()
            # Hard links share their first link's content: unchanged when it was.
            self.p.files_done += len(self.links)
            self.p.files_unchanged += sum(1 for f in self.links if f.primary and f.primary.cached)
            self.phases["files"] = self.clock.monotonic() - t0
            root_id, parts, data_refs = await asyncio.to_thread(self._build_trees, top)
            self.phases["tree-build"] = self.clock.monotonic() - t0
            for m in self.warn_later:
                self.warn(m)
            await asyncio.to_thread(self._store_now, parts, TREE)
            self.phases["tree-upload"] = self.clock.monotonic() - t0
            await self.uploader.close()
            self.phases["trees"] = self.clock.monotonic() - t0
            refs = list(data_refs.union(i for i, _ in parts))  # any order: the coordinator sorts
            del parts
            info.root = root_id
            info.key_ids.append(wrapped.key_id)
            info.finished_ns = self.clock.now_ns()
            p = self.p
            s = info.stats
            s.files = (
                p.files_total
                - sum(1 for f in self.files if not f.ok)
                - sum(1 for f in self.links if not f.ok)
            )
            s.dirs = sum(1 for d in self.dirs if d.ok)
            s.bytes = self.bytes_ok
            s.blobs_new = p.blobs_new
            s.bytes_new = p.bytes_uploaded
            s.files_unchanged = p.files_unchanged
            s.errors = self.errors
            s.duration_s = self.clock.monotonic() - t0
            await self.repo.put_keys([wrapped])  # design.md §Write ordering 3: key before snapshot
            self.phases["key"] = self.clock.monotonic() - t0
            await self.repo.commit(info, refs)
            self.phases["commit"] = self.clock.monotonic() - t0
        except BaseException:
            await self.uploader.abort()
            raise
        finally:
            self.sealing = None  # drop the data key with the run
        self.cache.names = self.owners.known()  # the names the saved nodes carry
        try:
            await asyncio.to_thread(self.cache.save)
        except OSError as exc:
            self.warnings.append(f"files cache not saved: {exc}")
        self.phases["cache"] = self.clock.monotonic() - t0
        log.info(
            "backup %s phases (s since start): %s",
            info.id,
            " ".join(f"{k} {v:.3f}" for k, v in self.phases.items()),
        )
        self.progress(force=True)
        return BackupResult(
            info=info,
            warnings=self.warnings,
            partial=self.errors > 0,
            progress=self.p,
            files_read=self.files_read,
            data_blobs_new=self.data_new,
            tree_blobs_new=self.tree_new,
        )


def _show(path: bytes) -> str:
    return os.fsdecode(path).encode("utf-8", "backslashreplace").decode("utf-8")


def cache_scope(cfg: RepoConfig, hasher: IdHasher) -> str:
    """What files-cache ids are valid for: this repository, its chunkers, this id key."""
    scope = f"{cfg.repo_id}/{cfg.chunker}/{hasher.key_check().hex()}"
    if cfg.paged_chunker and (cfg.paged_files or cfg.paged_formats):
        patterns = hashlib.sha256("\0".join(cfg.paged_files).encode()).hexdigest()[:16]
        scope += f"/{cfg.paged_chunker}:{patterns}"
        if cfg.paged_formats:
            scope += "+" + ",".join(cfg.paged_formats)
    return scope


def check_key(cfg: RepoConfig, hasher: IdHasher) -> None:
    """Refuse an id key that is not the repository's (design.md §Blob ids: key check)."""
    if cfg.key_check and hasher.key_check().hex() != cfg.key_check:
        raise KeyMaterialError(
            f"the id key does not match repository {cfg.repo_id} (key check differs): wrong key file?"
        )


async def run_backup(
    repo: RepoClient,
    keys: KeyProvider,
    cfg: RepoConfig,
    root: Path,
    *,
    agent: str,
    source: str,
    job_id: str,
    cache_dir: Path,
    parent: str = "",
    tags: Sequence[str] = (),
    hostname: str = "",
    on_progress: Callable[[common_pb2.Progress], None] | None = None,
    workers: int = 2,
    clock: Clock = SYSTEM,
) -> BackupResult:
    """Back up directory `root` as a new snapshot of (agent, source) and commit it.

    Raises KeyMaterialError if the key does not match the repository,
    NotFound/UsageError if `root` is not a readable directory, and the
    RepoClient's errors (the run is then abandoned, nothing committed, the
    files cache untouched). Entries that cannot be read are left out and
    reported in `warnings` (`partial` is then True).
    """
    # Key providers are synchronous (Vault is HTTP): keep them off the event loop. The id
    # key is cached by the provider, so _Backup's own id_key() call below is instant.
    hasher = IdHasher(await asyncio.to_thread(keys.id_key))
    check_key(cfg, hasher)
    cache = await asyncio.to_thread(
        FilesCache.open, Path(cache_dir), source, cache_scope(cfg, hasher)
    )
    info = common_pb2.SnapshotInfo(
        id=os.urandom(16).hex(),
        agent=agent,
        source=source,
        started_ns=clock.now_ns(),
        parent=parent,
        hostname=hostname or socket.gethostname(),
        tags=list(tags),
        crash_consistent=False,
    )
    b = _Backup(
        repo,
        keys,
        cfg,
        root,
        job_id=job_id,
        cache=cache,
        on_progress=on_progress,
        workers=workers,
        clock=clock,
    )
    return await b.run(info, keys)
