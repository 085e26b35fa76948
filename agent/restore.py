"""The restore pipeline: fetch a snapshot's trees and blobs, authenticate them, and rebuild the files under a target.

Safety (design.md §Threat model): every name is validated, and everything
is done through directory file descriptors opened O_DIRECTORY|O_NOFOLLOW
with the dir_fd=/follow_symlinks=False forms of the os functions, so a
symlink planted in the target (or restored earlier) never redirects a
write outside it. A file is created exclusively under its own name and
removed again if it fails; with overwrite it is written under a temporary
name and renamed over the old entry. Directory metadata is set after the
children.

Stages: (1) trees, breadth first, one request per level; (2) directories,
symlinks, FIFOs, devices; (3) file content: every unique blob is requested
once and streamed back in the coordinator's pack order, received ahead of
the workers; the blobs of each DownloadResponse are opened (authenticated,
decrypted, decompressed, id re-checked) by a worker thread into a reused
buffer of bounded size, then written (pwrite at every offset the plan
lists, all-zero chunks of sparse files skipped); a file is created on its
first blob and finished on its last; (4) hard links; (5) directory
metadata, deepest first. All file-system work of stages 2-5 runs in one
writer thread, in order; the download of stage 3 starts while stage 2 runs
(its writes queue behind it). A blob that is missing or fails
authentication fails only the files that need it; everything else is
restored and the failures are listed.

In directories this restore created, files are created with their final
mode and owner where the result is the same (`fast_meta`), saving an fchmod
and an fchown per file.

Memory (one record per file of the snapshot, so it is kept small): the
decoded trees are not kept; each file becomes a `_File` as its directory is
decoded (metadata packed, chunk ids in one bytes value until planned), other
entries keep a copy of their node. One dict, `uses`, is the download order,
every blob's size and the plan; a blob that is a whole file maps to the file
itself. A file is let go once its last blob is written.

Durability: like cp or tar, a restore leaves the data in the page cache for
the kernel to write back; it does not fsync (design.md §Trees).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import resource
import shutil
import stat
import struct
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.backup import check_key
from agent.gil import switch_interval
from agent.progress import ProgressReporter
from agent.repo import RepoClient
from agent.tree import (
    BLOCKDEV,
    CHARDEV,
    DIR,
    FIFO,
    FILE,
    SOCKET,
    SYMLINK,
)
from core.chunkid import IdHasher
from core.clock import SYSTEM, Clock
from core.envelope import OVERHEAD, SealingKey, open_, open_into
from core.errors import ClawbackError, IntegrityError, KeyMaterialError, UsageError
from core.format import ENVELOPE_KEY_ID, ID_SIZE, RepoConfig
from core.keys import KeyProvider
from core.tree import decode_tree
from protos.clawback.v1 import common_pb2, repo_pb2

log = logging.getLogger("clawback.agent.restore")

DATA = common_pb2.BLOB_TYPE_DATA
TREE = common_pb2.BLOB_TYPE_TREE

INFLIGHT_BATCHES = 4  # groups of content blobs being opened or written at once
# Plaintext per group: one reused buffer each, a private anonymous mmap outside the malloc
# heap of which only the pages written count in RSS (groups are mostly far smaller).
ARENA_BYTES = 8 * 1024 * 1024
READ_AHEAD = 8  # DownloadResponses (~1 MiB each) received ahead of the workers
# While restoring, the GIL is handed over every 0.5 ms instead of Python's 5 ms: the writer
# thread releases it for every system call and would otherwise wait up to 5 ms to get it
# back from a thread busy in Python (docs/performance.md).
SWITCH_INTERVAL = 0.0005
FALLBACK_BATCH = 4 * 1024 * 1024  # envelope bytes per batch from a client without batches
MAX_OPEN_FILES = 256  # partly written files whose descriptors stay open between their blobs
# Directories are opened once each and kept open while the restore writes into them, up to a
# quarter of the process's descriptor limit (64 to 4096; agent/main.py raises the limit): the
# coordinator's pack order visits directories in turn, and with 64 kept a 2G restore of 1.5k
# directories opened them 19.5k times, every miss reopening its ancestors too.
MIN_IDLE_DIR_FDS, MAX_IDLE_DIR_FDS = 64, 4096
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_REOPEN_FLAGS = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC

Rel = tuple[bytes, ...]


@dataclass
class RestoreResult:
    """What a restore wrote; `errors` lists every entry that failed (the rest was restored)."""

    files: int = 0
    dirs: int = 0
    bytes: int = 0
    errors: list[str] = field(default_factory=list)
    skipped: list[str] = field(
        default_factory=list
    )  # entries not recreated by design (sockets, devices as non-root)


def _process_umask() -> int | None:
    """The process's umask, read without changing it (os.umask sets it, racing other
    threads that create files); None where the kernel does not report it."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _has_default_acl(fd: int) -> bool:
    """Whether the directory has a default ACL (new entries then take their mode from it,
    not from the umask)."""
    try:
        os.getxattr(fd, "system.posix_acl_default")
    except OSError:
        return False  # ENODATA: none; ENOTSUP: the file system has no ACLs
    return True


def _show(rel: Rel) -> str:
    return os.fsdecode(b"/".join(rel) or b".").encode("utf-8", "backslashreplace").decode("utf-8")


def normalize_path(p: bytes | str) -> Rel:
    """A restore path as components; refuses absolute paths, '..' and NUL (UsageError)."""
    b = os.fsencode(p)
    if b.startswith(b"/"):
        raise UsageError(f"restore path {p!r} is absolute; paths are relative to the snapshot root")
    if b"\0" in b:
        raise UsageError(f"restore path {p!r} contains NUL")
    parts = tuple(c for c in b.split(b"/") if c and c != b".")
    if b".." in parts:
        raise UsageError(f"restore path {p!r} contains '..'")
    return parts


def _dir_fd_budget() -> int:
    """How many idle directory fds a restore keeps (MAX_IDLE_DIR_FDS)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_IDLE_DIR_FDS
    return max(MIN_IDLE_DIR_FDS, min(MAX_IDLE_DIR_FDS, soft // 4))


class _DirFds:
    """Reference-counted directory fds, each opened from its parent with O_NOFOLLOW (never by path)."""

    def __init__(self, top: int) -> None:
        self.top = top
        self.max_idle = _dir_fd_budget()
        self._fds: dict[Rel, int] = {}
        self._refs: dict[Rel, int] = {}
        self._idle: OrderedDict[Rel, None] = OrderedDict()

    def acquire(self, rel: Rel) -> int:
        if not rel:
            return self.top
        fd = self._fds.get(rel)
        if fd is not None:
            self._refs[rel] += 1
            self._idle.pop(rel, None)
            return fd
        parent = self.acquire(rel[:-1])
        try:
            fd = os.open(rel[-1], _DIR_FLAGS, dir_fd=parent)
        finally:
            self.release(rel[:-1])
        self._fds[rel] = fd
        self._refs[rel] = 1
        return fd

    def release(self, rel: Rel) -> None:
        if not rel:
            return
        self._refs[rel] -= 1
        if self._refs[rel] == 0:
            self._idle[rel] = None
            while len(self._idle) > self.max_idle:
                old, _ = self._idle.popitem(last=False)
                del self._refs[old]
                os.close(self._fds.pop(old))

    def close_all(self) -> None:
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
        self._refs.clear()
        self._idle.clear()


_META = struct.Struct("<IIIqq")  # a file's mode, uid, gid, atime_ns, mtime_ns


class _File:
    """A file to restore: what stages 2-3 need of its node, taken from the tree as it is
    decoded (the decoded tree is not kept), and its state while written (the writer's).

    Compact on purpose, one per file of the snapshot (docs/performance.md §Agent memory):
    the metadata packed in one bytes value, the chunk ids in another, dropped once planned."""

    __slots__ = (
        "dfd",
        "dir",
        "errors",
        "failed",
        "fd",
        "fresh",
        "ids",
        "link",
        "meta",
        "mode_set",
        "name",
        "owner_set",
        "remaining",
        "size",
        "sizes",
        "sparse",
        "tmp",
        "truncate",
        "xattrs",
    )

    def __init__(self, dir: Rel, node: repo_pb2.Node) -> None:
        self.dir = dir  # its directory (a tuple shared by the directory's files)
        self.name: bytes = node.name
        self.size: int = node.size
        self.meta = _META.pack(node.mode, node.uid, node.gid, node.atime_ns, node.mtime_ns)
        self.sparse: bool = node.sparse
        # Hard links: the (device, inode) its links share (design.md §Trees).
        self.link = (node.device, node.inode) if node.nlink > 1 else None
        self.xattrs = tuple((x.name, x.value) for x in node.xattrs) or None
        # Its chunks until the plan (_plan) takes them: the ids concatenated, and their sizes
        # (None for a single chunk: its size is the file's).
        content = node.content
        self.ids: bytes | None = b"".join(content)
        self.sizes: tuple[int, ...] | None = (
            tuple(node.content_sizes) if len(content) != 1 else None
        )
        self.fresh = False  # its directory was created by this restore (see _Restore.fast_meta)
        self.mode_set = False  # created with its final mode: no fchmod needed
        self.owner_set = False  # created with its final owner: no fchown needed
        self.fd: int | None = None
        self.dfd = -1  # its directory's fd, held (acquired) while fd is open and until finished
        self.tmp = b""  # the name it was created under: its own, or a temporary one (overwrite)
        self.failed = ""
        self.errors: list[str] | None = None
        self.remaining = 0  # blobs still to write (set by the plan)
        self.truncate = False

    @property
    def rel(self) -> Rel:
        return (*self.dir, self.name)

    def note(self, msg: str) -> None:
        """A problem that does not fail the file (reported when it is done)."""
        if self.errors is None:
            self.errors = []
        self.errors.append(msg)


_Use = tuple[_File, int, int, int]  # file, chunk index, offset, size
# What the plan holds per content blob (_Restore.uses): its size (from the trees) until a file
# stage 2 kept needs it, then the file itself when that is the blob's only use as a file's
# only chunk (most files), one use, or a list of uses.
_Uses = int | _File | _Use | list[_Use]
_Downloaded = tuple[bytes, int, bytes | memoryview | None, str]  # id, type, envelope, error


def _use_size(v: _Uses) -> int:
    """The plaintext size the plan gives a blob."""
    if isinstance(v, int):
        return v
    if isinstance(v, _File):
        return v.size
    if isinstance(v, list):
        return v[0][3]
    return v[3]


class _Restore:
    def __init__(
        self,
        repo: RepoClient,
        keys: KeyProvider,
        snapshot: common_pb2.SnapshotInfo,
        target: Path,
        *,
        job_id: str,
        paths: Sequence[bytes],
        overwrite: bool,
        on_progress: Callable[[common_pb2.Progress], None] | None,
        workers: int,
        clock: Clock,
    ) -> None:
        self.repo, self.keys, self.snapshot, self.job_id = repo, keys, snapshot, job_id
        self.target = Path(target)
        self.selected = [normalize_path(p) for p in paths]
        self.overwrite = overwrite
        self.workers = max(1, workers)
        self.clock = clock
        self.hasher = IdHasher(keys.id_key())
        self.is_root = os.geteuid() == 0
        self.euid, self.egid = os.geteuid(), os.getegid()
        # Files in directories this restore created can be created with their final mode
        # and owner, saving an fchmod and an fchown each: set by _open_target when the target
        # was created here with nothing that changes how new entries get their mode and
        # group (a setgid bit, a default ACL), and the umask is known.
        self.fast_meta = False
        self.umask = _process_umask()
        self.pool = ThreadPoolExecutor(
            max_workers=self.workers, thread_name_prefix="clawback-restore"
        )
        # All file-system work of stages 2-5 happens in this one thread: no locks around the
        # directory fds and the per-file state, and the kernel serializes it anyway.
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clawback-restore-w")
        self.keyring: dict[bytes, SealingKey] = {}
        self.key_errors: dict[bytes, str] = {}
        self.result = RestoreResult()
        self.reporter = ProgressReporter(on_progress, clock)
        self.p = self.reporter.p
        self.fds = _DirFds(-1)  # replaced by the target's, in run()
        # Every content blob still to write, and where (or only its size: see _Uses), in the
        # order the download asks for them: one dict for the plan, the order and the sizes.
        self.uses: dict[bytes, _Uses] = {}
        self.arenas: list[mmap.mmap] = []  # idle plaintext buffers of content batches
        self.open_files: OrderedDict[_File, None] = OrderedDict()  # partly written, fd open
        self.restored: dict[tuple[int, int], Rel] = {}  # (device, inode) -> first restored path
        self.tmp_prefix = os.urandom(6).hex().encode()
        self.tmp_seq = 0
        # The plan, filled by stage 1.
        # Directories breadth first (parents before children), each with a copy of its node:
        # a node of the decoded tree would keep the whole tree in memory.
        self.dirs: list[tuple[Rel, repo_pb2.Node]] = []
        # A directory's non-dir children: files compact, other entries (few) as node copies.
        self.entries: dict[Rel, list[_File | repo_pb2.Node]] = {}
        self.failed_dirs: set[Rel] = set()
        self.created_target = False

    # -- helpers ---------------------------------------------------------------------

    def error(self, msg: str) -> None:
        self.result.errors.append(msg)
        self.p.errors = len(self.result.errors)

    def progress(self, force: bool = False) -> None:
        self.reporter.report(force)

    async def run_cpu(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    # -- keys and blobs ------------------------------------------------------------------

    async def _load_keys(self, key_ids: set[bytes]) -> None:
        want = [k for k in key_ids if k not in self.keyring and k not in self.key_errors]
        if not want:
            return
        got = await self.repo.get_keys(self.job_id, want)
        for wk in got:
            try:
                plain = await asyncio.to_thread(self.keys.unwrap, wk.key_id, wk.wrapped)
                self.keyring[wk.key_id] = SealingKey(wk.key_id, plain)
            except ClawbackError as exc:
                self.key_errors[wk.key_id] = str(exc)
        for k in want:
            if k not in self.keyring and k not in self.key_errors:
                self.key_errors[k] = f"data key {k.hex()} is not stored in the repository"

    def _lookup(self, key_id: bytes) -> SealingKey:
        key = self.keyring.get(key_id)
        if key is None:
            raise KeyMaterialError(
                self.key_errors.get(key_id, f"data key {key_id.hex()} is not available")
            )
        return key

    def _open_blob(self, blob_id: bytes, btype: int, envelope: bytes | memoryview) -> bytes:
        """Thread: authenticate, decrypt, decompress, and re-derive the id (design.md §Blob envelope)."""
        plain = open_(self._lookup, blob_id, btype, envelope)
        if self.hasher.blob_id(plain) != blob_id:
            raise IntegrityError(f"blob {blob_id.hex()[:16]}: content does not match its id")
        return plain

    async def _download(self, ids: Sequence[bytes]) -> AsyncIterator[list[_Downloaded]]:
        """Sealed blobs in batches: the client's raw DownloadResponses where it offers them
        (agent/client.py `download_batches`: envelopes are views, no per-blob objects)."""
        batches = getattr(self.repo, "download_batches", None)
        if batches is not None:
            async for raw in batches(self.job_id, ids):
                yield raw
            return
        batch: list[_Downloaded] = []
        size = 0
        async for blob in self.repo.download(self.job_id, list(ids)):
            batch.append((blob.id, blob.type, blob.envelope, blob.error))
            size += len(blob.envelope or b"") + 64
            if size >= FALLBACK_BATCH:
                yield batch
                batch, size = [], 0
        if batch:
            yield batch

    async def _read_ahead(
        self, ids: Sequence[bytes], incoming: asyncio.Queue[list[_Downloaded] | None]
    ) -> None:
        """Receive batches of `ids` into `incoming` (bounded), then None, also after a failure
        (whose error is this task's)."""
        try:
            async for batch in self._download(ids):
                await self._load_batch_keys(batch)
                await incoming.put(batch)
        except asyncio.CancelledError:
            raise
        except BaseException:
            await incoming.put(None)
            raise
        await incoming.put(None)

    async def _load_batch_keys(self, batch: list[_Downloaded]) -> None:
        """Unwrap the data keys a batch names that are not loaded yet (usually none: the
        snapshot lists its keys and they are loaded first)."""
        need: set[bytes] = set()
        for _, _, env, _ in batch:
            if env is not None and len(env) >= OVERHEAD:
                kid = bytes(env[ENVELOPE_KEY_ID])
                if kid not in self.keyring and kid not in self.key_errors:
                    need.add(kid)
        if need:
            await self._load_keys(need)

    def _groups(self, batch: list[_Downloaded]) -> Iterator[tuple[list[_Downloaded], int]]:
        """A batch cut into groups of at most ARENA_BYTES of plaintext (by the sizes the trees
        give), with the bytes each needs: memory stays bounded however well blobs compress."""
        uses = self.uses
        group: list[_Downloaded] = []
        need = 0
        for blob in batch:
            v = uses.get(blob[0])
            size = 0 if v is None else _use_size(v)
            if group and need + size > ARENA_BYTES:
                yield group, need
                group, need = [], 0
            group.append(blob)
            need += size
        if group:
            yield group, need

    def _arena(self, need: int) -> mmap.mmap:
        """An idle plaintext buffer of at least `need` bytes (reused: its pages are touched once;
        a buffer dropped is unmapped when its last view goes)."""
        for i, arena in enumerate(self.arenas):
            if len(arena) >= need:
                return self.arenas.pop(i)
        if self.arenas:
            self.arenas.pop(0)  # too small: let it go rather than keep one more
        return mmap.mmap(-1, max(need, ARENA_BYTES), flags=mmap.MAP_PRIVATE)

    def _open_into(
        self, group: list[_Downloaded], arena: mmap.mmap
    ) -> list[tuple[bytes, bytes | memoryview | ClawbackError]]:
        """Thread: open content blobs into `arena`, each at its own offset; a blob maps to a
        view of its plaintext or the error that stopped it (design.md §Blob envelope)."""
        out: list[tuple[bytes, bytes | memoryview | ClawbackError]] = []
        view = memoryview(arena)
        uses, lookup, blob_id = self.uses, self._lookup, self.hasher.blob_id
        off = 0
        for bid, _, env, err in group:
            if err or env is None:
                out.append((bid, IntegrityError(f"blob {bid.hex()[:16]}: {err or 'no data'}")))
                continue
            v = uses.get(bid)
            try:
                if v is None:  # not asked for (or written already): opened the ordinary way
                    out.append((bid, self._open_blob(bid, DATA, env)))
                    continue
                size = _use_size(v)
                n = open_into(lookup, bid, DATA, env, view[off : off + size])
                plain = view[off : off + n]
                if blob_id(plain) != bid:
                    raise IntegrityError(f"blob {bid.hex()[:16]}: content does not match its id")
            except ClawbackError as exc:
                out.append((bid, exc))
                continue
            out.append((bid, plain))
            off += n
        return out

    def _open_batch(
        self, batch: list[_Downloaded], btype: int
    ) -> list[tuple[bytes, bytes | ClawbackError]]:
        """Thread: open each blob of a batch; a blob maps to its plaintext or the error that stopped it."""
        out: list[tuple[bytes, bytes | ClawbackError]] = []
        for bid, _, env, err in batch:
            if err or env is None:
                out.append((bid, IntegrityError(f"blob {bid.hex()[:16]}: {err or 'no data'}")))
                continue
            try:
                out.append((bid, self._open_blob(bid, btype, env)))
            except ClawbackError as exc:
                out.append((bid, exc))
        return out

    async def fetch(self, ids: Sequence[bytes], btype: int) -> dict[bytes, bytes | ClawbackError]:
        """Download, open and verify `ids`; each maps to its plaintext or the error that stopped it."""
        out: dict[bytes, bytes | ClawbackError] = {}
        if not ids:
            return out
        batches: list[list[_Downloaded]] = []
        async for batch in self._download(ids):
            await self._load_batch_keys(batch)
            batches.append(batch)
        wanted = set(ids)
        for part in await asyncio.gather(
            *(self.run_cpu(self._open_batch, b, btype) for b in batches)
        ):
            for bid, data in part:
                if bid in wanted and bid not in out:
                    out[bid] = data
        for bid in ids:
            if bid not in out:
                out[bid] = IntegrityError(f"blob {bid.hex()[:16]}: not returned by the coordinator")
        return out

    # -- stage 1: trees --------------------------------------------------------------------

    def _wanted(self, rel: Rel) -> tuple[bool, bool]:
        """(restore this entry, descend into it) for a path filter."""
        if not self.selected:
            return True, True
        for sel in self.selected:
            if rel[: len(sel)] == sel:  # inside a selected path
                return True, True
            if sel[: len(rel)] == rel:  # an ancestor of a selected path
                return True, True
        return False, False

    async def load_trees(self) -> repo_pb2.Node:
        root_id = self.snapshot.root
        got = (await self.fetch([root_id], TREE))[root_id]
        if isinstance(got, ClawbackError):
            raise got
        root = decode_tree([got], root=True).nodes[0]
        self.dirs.append(((), root))
        level: list[tuple[Rel, repo_pb2.Node]] = [((), root)]
        found: set[Rel] = set()  # selected paths seen (with a path filter only)
        selected = bool(self.selected)
        while level:
            # A whole level in one request: one round trip per level of the tree.
            ids = list(dict.fromkeys(i for _, n in level for i in n.subtree))
            blobs = await self.fetch(ids, TREE)
            nxt: list[tuple[Rel, repo_pb2.Node]] = []
            for rel, node in level:
                kids: list[_File | repo_pb2.Node] = []
                self.entries[rel] = kids
                parts = [blobs[i] for i in node.subtree]
                del node.subtree[:]  # not needed any more (the node stays for stage 5)
                bad = next((b for b in parts if isinstance(b, ClawbackError)), None)
                if bad is not None:
                    self.error(f"{_show(rel)}: directory contents not restored: {bad}")
                    continue
                try:
                    children = decode_tree(parts).nodes  # type: ignore[arg-type]
                except IntegrityError as exc:
                    self.error(f"{_show(rel)}: directory contents not restored: {exc}")
                    continue
                # Only compact records and node copies are kept: the decoded tree is freed
                # when the next directory's replaces it.
                for child in children:
                    kind = child.type
                    if selected:
                        crel = (*rel, child.name)
                        if not self._wanted(crel)[0]:
                            continue
                        found.add(crel)
                    if kind == FILE:
                        kids.append(_File(rel, child))
                        self.p.files_total += 1
                        self.p.bytes_total += child.size
                        continue
                    copy = repo_pb2.Node()
                    copy.CopyFrom(child)
                    if kind == DIR:
                        crel = (*rel, child.name)
                        self.dirs.append((crel, copy))
                        nxt.append((crel, copy))
                    else:
                        kids.append(copy)
                del children
            del blobs
            level = nxt
        for sel in self.selected:
            if sel and sel not in found:
                self.error(f"{_show(sel)}: not in the snapshot")
        return root

    # -- stage 2: structure ----------------------------------------------------------------

    def _clear(self, dfd: int, name: bytes, rel: Rel, want_dir: bool) -> bool:
        """Make room for an entry: True when `name` is free (or a directory to merge into)."""
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return True
        if want_dir and stat.S_ISDIR(st.st_mode):
            return True
        if not self.overwrite:
            self.error(f"{_show(rel)}: already exists in the target (use overwrite)")
            return False
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(name, dir_fd=dfd)
        else:
            os.unlink(name, dir_fd=dfd)
        return True

    def make_structure(self, fds: _DirFds) -> tuple[list[_File], list[tuple[Rel, tuple[int, int]]]]:
        """Thread: create directories and non-file entries; returns the files to fill and the
        hard links to make (each with the (device, inode) of its first link)."""
        files: list[_File] = []
        links: list[tuple[Rel, tuple[int, int]]] = []
        primaries: set[tuple[int, int]] = set()
        # Directories this restore created are empty: their entries need no check for an
        # existing entry (one that appears meanwhile still fails its exclusive create).
        fresh: set[Rel] = {()} if self.created_target else set()
        for rel, _node in self.dirs:
            if rel:
                if rel[:-1] in self.failed_dirs:
                    self.failed_dirs.add(rel)
                    continue
                try:
                    pfd = fds.acquire(rel[:-1])
                except OSError as exc:
                    self.failed_dirs.add(rel)
                    self.error(f"{_show(rel)}: {exc.strerror}")
                    continue
                try:
                    if rel[:-1] in fresh or self._clear(pfd, rel[-1], rel, want_dir=True):
                        try:
                            os.mkdir(rel[-1], 0o700, dir_fd=pfd)
                            fresh.add(rel)
                        except FileExistsError:
                            pass
                    else:
                        self.failed_dirs.add(rel)
                except OSError as exc:
                    self.failed_dirs.add(rel)
                    self.error(f"{_show(rel)}: cannot create directory: {exc.strerror}")
                finally:
                    fds.release(rel[:-1])
                if rel in self.failed_dirs:
                    continue
            try:
                dfd = fds.acquire(rel)
            except OSError as exc:
                self.failed_dirs.add(rel)
                self.error(f"{_show(rel)}: cannot open directory: {exc.strerror}")
                continue
            empty = rel in fresh
            try:
                for e in self.entries.pop(rel, ()):
                    if e.__class__ is _File:
                        f = e
                        if f.link is not None:
                            if f.link in primaries:
                                links.append(((*rel, f.name), f.link))
                                continue
                            primaries.add(f.link)
                        if not empty:
                            try:
                                if not self._clear(dfd, f.name, f.rel, want_dir=False):
                                    continue
                            except OSError as exc:
                                self.error(f"{_show(f.rel)}: {exc.strerror}")
                                continue
                        f.fresh = empty
                        files.append(f)
                    else:
                        self._make_special(dfd, (*rel, e.name), e, empty)  # type: ignore[arg-type]
            finally:
                fds.release(rel)
        self.entries.clear()  # what is left: directories that failed
        return files, links

    def _make_special(self, dfd: int, rel: Rel, node: repo_pb2.Node, empty: bool) -> None:
        name = rel[-1]
        kind = node.type
        if kind in (CHARDEV, BLOCKDEV) and not self.is_root:
            self.result.skipped.append(f"{_show(rel)}: device not recreated (needs root)")
            return
        try:
            if not empty and not self._clear(dfd, name, rel, want_dir=False):
                return
            if kind == SYMLINK:
                os.symlink(node.link_target, name, dir_fd=dfd)
            elif kind == FIFO:
                os.mkfifo(name, 0o600, dir_fd=dfd)
            elif kind == SOCKET:
                # The socket node itself (no listener): mknod(S_IFSOCK) needs no privilege.
                os.mknod(name, stat.S_IFSOCK | 0o600, dir_fd=dfd)
            else:
                ftype = stat.S_IFCHR if kind == CHARDEV else stat.S_IFBLK
                os.mknod(name, ftype | 0o600, node.rdev, dir_fd=dfd)
        except OSError as exc:
            self.error(f"{_show(rel)}: cannot create: {exc.strerror}")
            return
        # Metadata of the entry itself, never of what a symlink points to.
        try:
            if self.is_root:
                os.chown(name, node.uid, node.gid, dir_fd=dfd, follow_symlinks=False)
            if kind != SYMLINK:
                os.chmod(name, node.mode, dir_fd=dfd, follow_symlinks=False)
        except (OSError, NotImplementedError) as exc:
            self.error(f"{_show(rel)}: cannot set owner/mode: {exc}")
        if node.xattrs:
            # os.setxattr has no dir_fd: reach the entry through the directory fd's /proc link.
            path = f"/proc/self/fd/{dfd}/".encode() + name
            for x in node.xattrs:
                try:
                    os.setxattr(path, x.name, x.value, follow_symlinks=False)
                except OSError as exc:
                    self.error(f"{_show(rel)}: xattr {x.name!r} not restored: {exc.strerror}")
        try:
            os.utime(name, ns=(node.atime_ns, node.mtime_ns), dir_fd=dfd, follow_symlinks=False)
        except OSError as exc:
            self.error(f"{_show(rel)}: cannot set times: {exc.strerror}")

    # -- stage 3: content --------------------------------------------------------------------

    def _order(self) -> list[bytes]:
        """Thread: every unique content blob of the files in the trees, in the order stage 2
        lists the files (the order the download asks for them), entered in `self.uses` with
        the size the tree gives it. Files stage 2 then leaves out (a directory that could not
        be created, an entry in the way) are included: their blobs come back unused."""
        uses = self.uses
        for rel, _ in self.dirs:
            for e in self.entries.get(rel, ()):
                if e.__class__ is not _File:
                    continue
                ids, sizes = e.ids, e.sizes
                if sizes is None:  # one chunk (or none)
                    if ids and ids not in uses:
                        uses[ids] = e.size
                    continue
                for i, size in enumerate(sizes):
                    cid = ids[i * ID_SIZE : (i + 1) * ID_SIZE]  # type: ignore[index]
                    if cid not in uses:
                        uses[cid] = size
        return list(uses)

    def _plan(self, files: list[_File]) -> None:
        """Writer, after stage 2: where each blob goes, in `self.uses` (the blobs are those
        `_order` listed: decode_tree checks that every blob has a size). Each file's chunk
        list is dropped once planned."""
        uses = self.uses
        for f in files:
            ids, sizes = f.ids, f.sizes
            f.ids = f.sizes = None
            if not ids:
                f.remaining = 0
                f.truncate = f.sparse or f.size != 0
                continue
            if sizes is None:  # one chunk: the whole file
                f.remaining = 1
                f.truncate = f.sparse
                v = uses.get(ids)
                if v is None or v.__class__ is int:
                    uses[ids] = f  # its only use (the usual case): nothing else to hold
                else:
                    self._add_use(ids, v, (f, 0, 0, f.size))
                continue
            off = 0
            for i, size in enumerate(sizes):
                cid = ids[i * ID_SIZE : (i + 1) * ID_SIZE]
                v = uses.get(cid)
                use = (f, i, off, size)
                if v is None or v.__class__ is int:
                    uses[cid] = use
                else:
                    self._add_use(cid, v, use)
                off += size
            f.remaining = len(sizes)
            # Trailing holes, or sizes that do not add up: ftruncate sets the recorded size.
            f.truncate = f.sparse or off != f.size

    def _add_use(self, cid: bytes, v: _Uses, use: _Use) -> None:
        if v.__class__ is list:
            v.append(use)
        elif v.__class__ is _File:
            self.uses[cid] = [(v, 0, 0, v.size), use]
        else:
            self.uses[cid] = [v, use]  # type: ignore[list-item]

    def _prepare(self, fds: _DirFds) -> list[tuple[Rel, tuple[int, int]]]:
        """Writer: stage 2, the plan of stage 3, and the files without content. Queued ahead
        of every write of stage 3, so writes always find the plan (the writer runs its work
        in order). Returns the hard links to make. The files are not kept: the plan holds
        each until its last blob is written."""
        files, links = self.make_structure(fds)
        self._plan(files)
        for f in files:
            if f.remaining == 0:  # no content: finished now
                self._done(f, self._finish_file(f))
        return links

    def _create(self, f: _File) -> int | None:
        """Writer: create the file in its directory; None (and f.failed) on error.

        Without overwrite it is created under its own name, exclusively (O_EXCL|O_NOFOLLOW:
        an entry that appeared since stage 2 is never clobbered or followed), and removed
        again if it fails. With overwrite it is written under a temporary name and renamed
        over the old entry when complete, so the old entry stays intact until then."""
        if f.dfd < 0:
            try:
                f.dfd = self.fds.acquire(f.dir)
            except OSError as exc:
                f.failed = f"cannot open its directory: {exc.strerror}"
                return None
        mode = 0o600
        if f.fresh and self.fast_meta:
            perms, uid, gid, _, _ = _META.unpack(f.meta)
            umask = self.umask if self.umask is not None else 0o777
            # Only plain permission bits the umask keeps, and writable by its owner (a parked
            # file is reopened for writing); setuid/setgid/sticky go through fchmod after fchown.
            if not perms & ~0o777 and not perms & umask and (perms & 0o200 or self.is_root):
                mode = perms
                f.mode_set = True
            f.owner_set = uid == self.euid and gid == self.egid
        for _ in range(8):
            if self.overwrite:
                self.tmp_seq += 1
                name = b".clawback-restore-%s-%d" % (self.tmp_prefix, self.tmp_seq)
            else:
                name = f.name
            try:
                fd = os.open(name, _CREATE_FLAGS, mode, dir_fd=f.dfd)
            except FileExistsError:
                if not self.overwrite:
                    f.failed = "already exists in the target (use overwrite)"
                    return None
                continue
            except OSError as exc:
                f.failed = f"cannot create: {exc.strerror}"
                return None
            f.tmp, f.fd = name, fd
            return fd
        f.failed = "cannot pick a temporary name"
        return None

    def _fd(self, f: _File) -> int | None:
        """Writer: the file's descriptor, creating the file or reopening it (after it was parked)."""
        if f.fd is not None:
            self.open_files.move_to_end(f)
            return f.fd
        if not f.tmp:
            fd = self._create(f)
        else:
            try:
                f.dfd = self.fds.acquire(f.dir)
                fd = f.fd = os.open(f.tmp, _REOPEN_FLAGS, dir_fd=f.dfd)
            except OSError as exc:
                f.failed = f"cannot reopen: {exc.strerror}"
                return None
        if fd is not None and f.remaining > 1:
            # More blobs are coming: keep it open, within the budget of descriptors.
            self.open_files[f] = None
            if len(self.open_files) > MAX_OPEN_FILES:
                self._park(next(iter(self.open_files)))
        return fd

    def _park(self, f: _File) -> None:
        """Writer: close a partly written file and let go of its directory until its next blob."""
        self.open_files.pop(f, None)
        if f.fd is not None:
            os.close(f.fd)
            f.fd = None
        if f.dfd >= 0:
            f.dfd = -1
            self.fds.release(f.dir)

    def _write_blobs(self, blobs: list[tuple[bytes, bytes | memoryview | ClawbackError]]) -> None:
        """Writer: put each opened blob everywhere the plan says, finishing files as they complete.
        A blob that failed fails every file that needs it."""
        uses = self.uses
        done = 0
        targets: Sequence[_Use]
        for cid, data in blobs:
            v = uses.pop(cid, None)
            if v is None or v.__class__ is int:
                continue  # not asked for, needed by no file stage 2 kept, or already written
            if v.__class__ is _File:
                targets = ((v, 0, 0, v.size),)
            elif v.__class__ is tuple:
                targets = (v,)
            else:
                targets = v  # type: ignore[assignment]
            zero: bool | None = None
            buf: bytes | memoryview
            if isinstance(data, ClawbackError):
                failed, buf = str(data), b""
            else:
                failed, buf = "", data
            n = len(buf)
            for f, i, off, size in targets:
                if not f.failed:
                    if failed:
                        f.failed = failed
                    elif n != size:
                        f.failed = f"chunk {i} has {n} bytes where the tree says {size}"
                    elif size:
                        if f.sparse:
                            if zero is None:
                                zero = buf[0] == 0 and buf == bytes(size)
                            hole = zero
                        else:
                            hole = False  # a hole is left only in sparse files (design.md §Trees)
                        fd = None if hole else self._fd(f)
                        if fd is not None:
                            try:
                                w = os.pwrite(fd, buf, off)
                                if w < size:  # short writes are rare: finish with a view
                                    view = memoryview(buf)
                                    while w < size:
                                        w += os.pwrite(fd, view[w:], off + w)
                            except OSError as exc:
                                f.failed = f"write error: {exc.strerror}"
                done += size
                f.remaining -= 1
                if f.remaining == 0:
                    self._done(f, self._finish_file(f))
        self.p.bytes_done += done

    def _finish_file(self, f: _File) -> bool:
        """Writer: size, owner, mode, xattrs, times, then move into place. False if the file failed."""
        self.open_files.pop(f, None)
        if not f.failed and f.fd is None:
            self._fd(f)  # a file that was all holes (or empty) has not been created yet
        fd, dfd, name = f.fd, f.dfd, f.name
        if fd is None:  # failed before it was created, or while it was parked
            if f.tmp:
                with contextlib.suppress(OSError):
                    if dfd < 0:
                        dfd = f.dfd = self.fds.acquire(f.dir)
                    os.unlink(f.tmp, dir_fd=dfd)
            return False
        f.fd = None
        try:
            if f.failed:
                return False
            mode, uid, gid, atime_ns, mtime_ns = _META.unpack(f.meta)
            try:
                if f.truncate:
                    os.ftruncate(fd, f.size)
                if self.is_root and not f.owner_set:
                    os.fchown(fd, uid, gid)
                if not f.mode_set:
                    os.fchmod(fd, mode)  # after chown, which clears setuid/setgid
            except OSError as exc:
                f.failed = f"cannot set size/owner/mode: {exc.strerror}"
                return False
            for xname, xvalue in f.xattrs or ():
                try:
                    os.setxattr(fd, xname, xvalue)
                except OSError as exc:
                    f.note(f"{_show(f.rel)}: xattr {xname!r} not restored: {exc.strerror}")
            try:
                os.utime(fd, ns=(atime_ns, mtime_ns))
            except OSError as exc:
                f.note(f"{_show(f.rel)}: cannot set times: {exc.strerror}")
        finally:
            os.close(fd)
            if f.failed:
                with contextlib.suppress(OSError):
                    os.unlink(f.tmp, dir_fd=dfd)
        if f.tmp == name:
            return True  # created under its own name (no overwrite): already in place
        try:
            try:
                os.rename(f.tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            except IsADirectoryError:
                shutil.rmtree(name, dir_fd=dfd)
                os.rename(f.tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except OSError as exc:
            f.failed = f"cannot move into place: {exc.strerror}"
            with contextlib.suppress(OSError):
                os.unlink(f.tmp, dir_fd=dfd)
            return False
        return True

    def _done(self, f: _File, ok: bool) -> None:
        """Writer: account for a finished (or failed) file and let go of its directory fd."""
        if f.dfd >= 0:
            f.dfd = -1
            self.fds.release(f.dir)
        for e in f.errors or ():
            self.error(e)
        self.p.files_done += 1
        if ok:
            self.result.files += 1
            self.result.bytes += f.size
            if f.link is not None:
                self.restored[f.link] = f.rel
        else:
            self.error(f"{_show(f.rel)}: not restored: {f.failed}")

    def _finish_rest(self) -> None:
        """Writer: fail the files whose blobs never came back."""
        for cid, v in list(self.uses.items()):
            if v.__class__ is not int:
                missing = IntegrityError(f"blob {cid.hex()[:16]}: not returned by the coordinator")
                self._write_blobs([(cid, missing)])

    def _abandon(self) -> None:
        """Writer, after a failure that stops the restore: close and remove every partial file
        (each still has a blob to write, so the plan holds it)."""
        files: dict[_File, None] = {}
        for v in self.uses.values():
            if v.__class__ is _File:
                files[v] = None
            elif v.__class__ is tuple:
                files[v[0]] = None
            elif v.__class__ is list:
                files.update((u[0], None) for u in v)
        for f in files:
            if f.fd is not None:
                with contextlib.suppress(OSError):
                    os.close(f.fd)
                f.fd = None
            if f.tmp and f.remaining > 0:
                try:
                    dfd = self.fds.acquire(f.dir)
                except OSError:
                    continue
                with contextlib.suppress(OSError):
                    os.unlink(f.tmp, dir_fd=dfd)
                self.fds.release(f.dir)
        self.open_files.clear()

    async def restore_content(self, order: list[bytes], prepared: asyncio.Future[Any]) -> None:
        """Download every blob of `order` once, in the order the coordinator returns them (pack
        order), and write it wherever the plan needs it: opening (decrypt, decompress, id
        check) runs in the worker threads, all file-system work in the writer thread, where
        `prepared` (stage 2 and the plan) runs first. The download starts at once, so the first
        blobs are received and opened while stage 2 runs."""
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(INFLIGHT_BATCHES)
        # Messages are received ahead of the workers, so the coordinator keeps streaming while
        # they are busy (a stream that is not read stalls on gRPC's flow control).
        incoming: asyncio.Queue[list[_Downloaded] | None] = asyncio.Queue(READ_AHEAD)
        pending: set[asyncio.Future[None]] = set()
        failures: list[BaseException] = []

        async def process(group: list[_Downloaded], need: int) -> None:
            arena = self._arena(need)
            try:
                opened = await self.run_cpu(self._open_into, group, arena)
                await loop.run_in_executor(self.writer, self._write_blobs, opened)
                del opened  # views into the arena: gone before it is reused
                self.progress()
            finally:
                self.arenas.append(arena)
                slots.release()

        def settle(task: asyncio.Future[None]) -> None:
            pending.discard(task)
            if not task.cancelled() and task.exception() is not None:
                failures.append(task.exception())  # type: ignore[arg-type]

        reader = asyncio.ensure_future(self._read_ahead(order, incoming))
        try:
            while (batch := await incoming.get()) is not None:
                for group, need in self._groups(batch):
                    await slots.acquire()
                    if prepared.done() and prepared.exception() is not None:
                        failures.append(prepared.exception())  # type: ignore[arg-type]
                    if failures:
                        slots.release()
                        raise failures[0]
                    task = asyncio.ensure_future(process(group, need))
                    pending.add(task)
                    task.add_done_callback(settle)
            await prepared  # its error, if it failed
            await reader  # its error, if it failed
            await asyncio.gather(*pending)
            await loop.run_in_executor(self.writer, self._finish_rest)
        except BaseException:
            reader.cancel()
            await asyncio.gather(reader, prepared, *pending, return_exceptions=True)
            await loop.run_in_executor(self.writer, self._abandon)
            raise

    # -- stage 4: hard links, stage 5: directory metadata -----------------------------------------

    def make_links(
        self,
        fds: _DirFds,
        links: list[tuple[Rel, tuple[int, int]]],
        restored: dict[tuple[int, int], Rel],
    ) -> None:
        """Thread: link each later hard link to the first restored path of its inode."""
        for rel, inode in links:
            first = restored.get(inode)
            if first is None:
                self.error(f"{_show(rel)}: hard link not restored: its first link failed")
                continue
            try:
                sfd = fds.acquire(first[:-1])
                try:
                    dfd = fds.acquire(rel[:-1])
                    try:
                        if self._clear(dfd, rel[-1], rel, want_dir=False):
                            os.link(
                                first[-1],
                                rel[-1],
                                src_dir_fd=sfd,
                                dst_dir_fd=dfd,
                                follow_symlinks=False,
                            )
                            self.result.files += 1
                            self.p.files_done += 1
                    finally:
                        fds.release(rel[:-1])
                finally:
                    fds.release(first[:-1])
            except OSError as exc:
                self.error(f"{_show(rel)}: hard link not restored: {exc.strerror}")

    def dir_metadata(self, fds: _DirFds) -> None:
        """Thread: directory owner, mode, xattrs and times, children before parents."""
        for rel, node in reversed(self.dirs):
            if rel in self.failed_dirs:
                continue
            if not rel and not self.created_target:
                continue  # an existing target keeps its own metadata
            try:
                fd = fds.acquire(rel)
            except OSError as exc:
                self.error(f"{_show(rel)}: metadata not restored: {exc.strerror}")
                continue
            try:
                try:
                    if self.is_root:
                        os.fchown(fd, node.uid, node.gid)
                    os.fchmod(fd, node.mode)
                except OSError as exc:
                    self.error(f"{_show(rel)}: cannot set owner/mode: {exc.strerror}")
                for x in node.xattrs:
                    try:
                        os.setxattr(fd, x.name, x.value)
                    except OSError as exc:
                        self.error(f"{_show(rel)}: xattr {x.name!r} not restored: {exc.strerror}")
                try:
                    os.utime(fd, ns=(node.atime_ns, node.mtime_ns))
                except OSError as exc:
                    self.error(f"{_show(rel)}: cannot set times: {exc.strerror}")
            finally:
                fds.release(rel)

    # -- the run ---------------------------------------------------------------------------------

    async def run(self) -> RestoreResult:
        with switch_interval(SWITCH_INTERVAL):
            return await self._run()

    async def _run(self) -> RestoreResult:
        loop = asyncio.get_running_loop()
        t0 = self.clock.monotonic()
        phases: dict[str, float] = {}

        def phase(name: str) -> None:
            phases[name] = self.clock.monotonic() - t0

        try:
            await self._load_keys(set(self.snapshot.key_ids))
            await self.load_trees()
            phase("trees")
            self.progress(force=True)
            order = await self.run_cpu(self._order)
            top = await asyncio.to_thread(self._open_target)
            self.fds = fds = _DirFds(top)
            try:
                prepared = loop.run_in_executor(self.writer, self._prepare, fds)
                prepared.add_done_callback(lambda _f: phase("structure"))
                await self.restore_content(order, prepared)
                phase("content")
                links = prepared.result()
                self.result.dirs = len(self.dirs) - len(self.failed_dirs)
                await loop.run_in_executor(self.writer, self.make_links, fds, links, self.restored)
                await loop.run_in_executor(self.writer, self.dir_metadata, fds)
                phase("metadata")
                log.info(
                    "restore of %s phases (s since start): %s",
                    self.snapshot.id,
                    " ".join(f"{k} {v:.3f}" for k, v in phases.items()),
                )
            finally:
                await loop.run_in_executor(self.writer, fds.close_all)
                os.close(top)
        finally:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.writer.shutdown(wait=False, cancel_futures=True)
            self.keyring.clear()
        self.progress(force=True)
        return self.result

    def _open_target(self) -> int:
        try:
            os.mkdir(self.target, 0o700)
            self.created_target = True
        except FileExistsError:
            pass
        except FileNotFoundError:
            self.target.mkdir(parents=True, mode=0o700)
            self.created_target = True
        # The target itself is the operator's choice (it may be reached through a symlink);
        # everything below it is opened with O_NOFOLLOW.
        fd = os.open(self.target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        if self.created_target and self.umask is not None:
            try:
                setgid = os.fstat(fd).st_mode & stat.S_ISGID
                self.fast_meta = not setgid and not _has_default_acl(fd)
            except OSError:
                self.fast_meta = False
        return fd


async def run_restore(
    repo: RepoClient,
    keys: KeyProvider,
    cfg: RepoConfig,
    snapshot: common_pb2.SnapshotInfo,
    target: Path,
    *,
    job_id: str,
    paths: Sequence[bytes] = (),
    overwrite: bool = False,
    on_progress: Callable[[common_pb2.Progress], None] | None = None,
    workers: int = 2,
    clock: Clock = SYSTEM,
) -> RestoreResult:
    """Restore `snapshot` (or only `paths`, relative to its root) under `target`.

    Raises UsageError for an absolute or '..' path, KeyMaterialError for a
    key that does not match the repository, IntegrityError if the root tree
    cannot be authenticated, and the RepoClient's errors. Entries that fail
    are listed in `errors`; everything else is restored.
    """
    # Key providers are synchronous (Vault is HTTP): keep them off the event loop; the id
    # key is cached by the provider, so _Restore's own id_key() call is instant.
    check_key(cfg, IdHasher(await asyncio.to_thread(keys.id_key)))
    r = _Restore(
        repo,
        keys,
        snapshot,
        target,
        job_id=job_id,
        paths=paths,
        overwrite=overwrite,
        on_progress=on_progress,
        workers=workers,
        clock=clock,
    )
    return await r.run()
