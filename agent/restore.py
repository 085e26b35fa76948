"""The restore pipeline: fetch a snapshot's trees and blobs, authenticate them, and rebuild the files under a target.

Safety (design.md §Threat model): every name is validated, and everything
is done through directory file descriptors opened O_DIRECTORY|O_NOFOLLOW
with the dir_fd=/follow_symlinks=False forms of the os functions, so a
symlink planted in the target (or restored earlier) never redirects a
write outside it. Files are written under a temporary name and linked or
renamed into place; directory metadata is set after their children.

Stages: (1) trees, breadth first, in batches; (2) directories, symlinks,
FIFOs, devices, empty files; (3) file content in windows of ~8 MiB of
unique blobs (download, open + id re-check in threads, pwrite, sparse
chunks skipped); (4) hard links; (5) directory metadata, deepest first.
A blob that is missing or fails authentication fails only the files that
need it; everything else is restored and the failures are listed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import stat
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.backup import check_key
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
from core.envelope import SealingKey, key_id_of, open_
from core.errors import ClawbackError, IntegrityError, KeyMaterialError, UsageError
from core.format import RepoConfig
from core.keys import KeyProvider
from core.tree import decode_tree
from protos.clawback.v1 import common_pb2, repo_pb2

DATA = common_pb2.BLOB_TYPE_DATA
TREE = common_pb2.BLOB_TYPE_TREE

WINDOW_BYTES = 8 * 1024 * 1024  # unique plaintext fetched per content window
WINDOW_FILES = 128  # files touched per window (each holds an fd until finished)
TREE_BATCH = 64  # tree blobs per download request
BLOB_CACHE_BYTES = 16 * 1024 * 1024  # recently used plaintexts kept across windows
MAX_IDLE_DIR_FDS = 64
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

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


class _DirFds:
    """Reference-counted directory fds, each opened from its parent with O_NOFOLLOW (never by path)."""

    def __init__(self, top: int) -> None:
        self.top = top
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
            while len(self._idle) > MAX_IDLE_DIR_FDS:
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


class _File:
    """A file whose content is being restored."""

    __slots__ = ("dfd", "errors", "failed", "fd", "node", "offsets", "rel", "remaining", "tmp")

    def __init__(self, rel: Rel, node: repo_pb2.Node) -> None:
        self.rel = rel
        self.node = node
        self.fd: int | None = None
        self.dfd = -1  # its directory's fd, held (acquired) from open until finished
        self.tmp = b""
        self.failed = ""
        self.errors: list[str] = []
        self.remaining = len(node.content)
        offs = []
        off = 0
        for s in node.content_sizes:
            offs.append(off)
            off += s
        self.offsets = offs


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
        self.pool = ThreadPoolExecutor(
            max_workers=self.workers, thread_name_prefix="clawback-restore"
        )
        self.keyring: dict[bytes, SealingKey] = {}
        self.key_errors: dict[bytes, str] = {}
        self.result = RestoreResult()
        self.reporter = ProgressReporter(on_progress, clock)
        self.p = self.reporter.p
        self.cache: OrderedDict[bytes, bytes] = OrderedDict()
        self.cache_bytes = 0
        # The plan, filled by stage 1.
        self.dirs: list[tuple[Rel, repo_pb2.Node]] = []  # breadth first: parents before children
        self.entries: dict[Rel, list[repo_pb2.Node]] = {}  # a directory's non-dir children
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

    def _open_blob(self, blob_id: bytes, btype: int, envelope: bytes) -> bytes:
        """Thread: authenticate, decrypt, decompress, and re-derive the id (design.md §Blob envelope)."""
        plain = open_(self._lookup, blob_id, btype, envelope)
        if self.hasher.blob_id(plain) != blob_id:
            raise IntegrityError(f"blob {blob_id.hex()[:16]}: content does not match its id")
        return plain

    async def fetch(self, ids: Sequence[bytes], btype: int) -> dict[bytes, bytes | ClawbackError]:
        """Download, open and verify `ids`; each maps to its plaintext or the error that stopped it."""
        out: dict[bytes, bytes | ClawbackError] = {}
        if not ids:
            return out
        envs: list[tuple[bytes, bytes]] = []
        key_ids: set[bytes] = set()
        wanted = set(ids)
        async for blob in self.repo.download(self.job_id, list(ids)):
            if blob.id not in wanted or blob.id in out:
                continue
            if blob.error or blob.envelope is None:
                out[blob.id] = IntegrityError(
                    f"blob {blob.id.hex()[:16]}: {blob.error or 'no data'}"
                )
                continue
            try:
                key_ids.add(key_id_of(blob.envelope))
            except IntegrityError as exc:
                out[blob.id] = exc
                continue
            envs.append((blob.id, blob.envelope))
        await self._load_keys(key_ids)

        def open_all(batch: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes | ClawbackError]]:
            res: list[tuple[bytes, bytes | ClawbackError]] = []
            for bid, env in batch:
                try:
                    res.append((bid, self._open_blob(bid, btype, env)))
                except ClawbackError as exc:
                    res.append((bid, exc))
            return res

        n = self.workers
        slices = [envs[i::n] for i in range(n) if envs[i::n]]
        envs = []
        for part in await asyncio.gather(*(self.run_cpu(open_all, s) for s in slices)):
            out.update(part)
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
        found: set[Rel] = set()
        while level:
            ids = list(dict.fromkeys(i for _, n in level for i in n.subtree))
            blobs: dict[bytes, bytes | ClawbackError] = {}
            for i in range(0, len(ids), TREE_BATCH):
                blobs.update(await self.fetch(ids[i : i + TREE_BATCH], TREE))
            nxt: list[tuple[Rel, repo_pb2.Node]] = []
            for rel, node in level:
                kids: list[repo_pb2.Node] = []
                self.entries[rel] = kids
                parts = [blobs[i] for i in node.subtree]
                bad = next((b for b in parts if isinstance(b, ClawbackError)), None)
                if bad is not None:
                    self.error(f"{_show(rel)}: directory contents not restored: {bad}")
                    continue
                try:
                    children = decode_tree(parts).nodes  # type: ignore[arg-type]
                except IntegrityError as exc:
                    self.error(f"{_show(rel)}: directory contents not restored: {exc}")
                    continue
                for child in children:
                    crel = (*rel, child.name)
                    take, _ = self._wanted(crel)
                    if not take:
                        continue
                    found.add(crel)
                    if child.type == DIR:
                        self.dirs.append((crel, child))
                        nxt.append((crel, child))
                    else:
                        kids.append(child)
                        if child.type == FILE:
                            self.p.files_total += 1
                            self.p.bytes_total += child.size
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

    def make_structure(self, fds: _DirFds) -> tuple[list[_File], list[tuple[Rel, repo_pb2.Node]]]:
        """Thread: create directories and non-file entries; returns the files to fill and the hard links to make."""
        files: list[_File] = []
        links: list[tuple[Rel, repo_pb2.Node]] = []
        primaries: set[tuple[int, int]] = set()
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
                    if self._clear(pfd, rel[-1], rel, want_dir=True):
                        with contextlib.suppress(FileExistsError):
                            os.mkdir(rel[-1], 0o700, dir_fd=pfd)
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
            try:
                for node in self.entries.get(rel, ()):
                    crel = (*rel, node.name)
                    if node.type == FILE:
                        if node.nlink > 1:
                            key = (node.device, node.inode)
                            if key in primaries:
                                links.append((crel, node))
                                continue
                            primaries.add(key)
                        try:
                            if not self._clear(dfd, node.name, crel, want_dir=False):
                                continue
                        except OSError as exc:
                            self.error(f"{_show(crel)}: {exc.strerror}")
                            continue
                        files.append(_File(crel, node))
                    else:
                        self._make_special(dfd, crel, node)
            finally:
                fds.release(rel)
        return files, links

    def _make_special(self, dfd: int, rel: Rel, node: repo_pb2.Node) -> None:
        name = rel[-1]
        kind = node.type
        if kind in (CHARDEV, BLOCKDEV) and not self.is_root:
            self.result.skipped.append(f"{_show(rel)}: device not recreated (needs root)")
            return
        try:
            if not self._clear(dfd, name, rel, want_dir=False):
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

    def _windows(self, files: list[_File]) -> Iterator[list[tuple[_File, int, int]]]:
        """Windows of (file, first chunk, end chunk) with about WINDOW_BYTES of unique blobs."""
        win: list[tuple[_File, int, int]] = []
        uniq: set[bytes] = set()
        size = 0
        for f in files:
            content, sizes = f.node.content, f.node.content_sizes
            start = 0
            i = 0
            n = len(content)
            while i < n:
                cid = content[i]
                if cid not in uniq:
                    uniq.add(cid)
                    size += sizes[i]
                i += 1
                if size >= WINDOW_BYTES:
                    win.append((f, start, i))
                    yield win
                    win, uniq, size, start = [], set(), 0, i
            if start < n or n == 0:
                win.append((f, start, n))
            if len(win) >= WINDOW_FILES:
                yield win
                win, uniq, size = [], set(), 0
        if win:
            yield win

    def _cache_put(self, bid: bytes, data: bytes) -> None:
        if len(data) > BLOB_CACHE_BYTES // 4 or bid in self.cache:
            return
        self.cache[bid] = data
        self.cache_bytes += len(data)
        while self.cache_bytes > BLOB_CACHE_BYTES:
            _, old = self.cache.popitem(last=False)
            self.cache_bytes -= len(old)

    @staticmethod
    def _open_tmp(f: _File) -> None:
        """Create the file under a temporary name in its directory (f.dfd); sets f.fd or f.failed."""
        for _ in range(8):
            tmp = b".clawback-restore-" + os.urandom(8).hex().encode()
            try:
                f.fd = os.open(
                    tmp,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o600,
                    dir_fd=f.dfd,
                )
                f.tmp = tmp
                return
            except FileExistsError:
                continue
            except OSError as exc:
                f.failed = f"cannot create: {exc.strerror}"
                return
        f.failed = "cannot pick a temporary name"

    @staticmethod
    def _write_part(
        f: _File,
        first: int,
        end: int,
        blobs: dict[bytes, bytes | ClawbackError],
        zero: dict[bytes, bool],
    ) -> None:
        """Thread: write chunks [first, end) of a file; a missing blob fails the file."""
        if f.failed:
            return
        node, fd = f.node, f.fd
        assert fd is not None
        sparse = node.sparse
        try:
            for i in range(first, end):
                cid = node.content[i]
                data = blobs[cid]
                if isinstance(data, ClawbackError):
                    f.failed = str(data)
                    return
                if len(data) != node.content_sizes[i]:
                    f.failed = f"chunk {i} has {len(data)} bytes where the tree says {node.content_sizes[i]}"
                    return
                if sparse:
                    z = zero.get(cid)
                    if z is None:
                        z = zero[cid] = not data or (data[0] == 0 and data == bytes(len(data)))
                    if z:
                        continue  # leave a hole (design.md §Trees: sparse)
                view = memoryview(data)
                off = f.offsets[i]
                while view:
                    w = os.pwrite(fd, view, off)
                    view, off = view[w:], off + w
        except OSError as exc:
            f.failed = f"write error: {exc.strerror}"

    def _finish_file(self, f: _File) -> bool:
        """Thread: size, owner, mode, xattrs, times, then move into place. False if the file failed."""
        node, fd, name, fds_dfd = f.node, f.fd, f.rel[-1], f.dfd
        if fd is None:
            return False
        f.fd = None
        try:
            if f.failed:
                return False
            try:
                os.ftruncate(fd, node.size)
                if self.is_root:
                    os.fchown(fd, node.uid, node.gid)
                os.fchmod(fd, node.mode)  # after chown, which clears setuid/setgid
            except OSError as exc:
                f.failed = f"cannot set size/owner/mode: {exc.strerror}"
                return False
            for x in node.xattrs:
                try:
                    os.setxattr(fd, x.name, x.value)
                except OSError as exc:
                    f.errors.append(
                        f"{_show(f.rel)}: xattr {x.name!r} not restored: {exc.strerror}"
                    )
            try:
                os.utime(fd, ns=(node.atime_ns, node.mtime_ns))
            except OSError as exc:
                f.errors.append(f"{_show(f.rel)}: cannot set times: {exc.strerror}")
        finally:
            os.close(fd)
            if f.failed:
                with contextlib.suppress(OSError):
                    os.unlink(f.tmp, dir_fd=fds_dfd)
        try:
            if self.overwrite:
                try:
                    os.rename(f.tmp, name, src_dir_fd=fds_dfd, dst_dir_fd=fds_dfd)
                except IsADirectoryError:
                    shutil.rmtree(name, dir_fd=fds_dfd)
                    os.rename(f.tmp, name, src_dir_fd=fds_dfd, dst_dir_fd=fds_dfd)
            else:
                # link() never replaces: an entry that appeared meanwhile is not clobbered.
                os.link(f.tmp, name, src_dir_fd=fds_dfd, dst_dir_fd=fds_dfd, follow_symlinks=False)
                os.unlink(f.tmp, dir_fd=fds_dfd)
        except FileExistsError:
            f.failed = "already exists in the target (use overwrite)"
        except OSError as exc:
            f.failed = f"cannot move into place: {exc.strerror}"
        if f.failed:
            with contextlib.suppress(OSError):
                os.unlink(f.tmp, dir_fd=fds_dfd)
            return False
        return True

    def _done(self, fds: _DirFds, f: _File, ok: bool, restored: dict[tuple[int, int], Rel]) -> None:
        """Event loop: account for a finished (or failed) file and let go of its directory fd."""
        if f.dfd >= 0:
            f.dfd = -1
            fds.release(f.rel[:-1])
        for e in f.errors:
            self.error(e)
        self.p.files_done += 1
        if ok:
            self.result.files += 1
            self.result.bytes += f.node.size
            if f.node.nlink > 1:
                restored[(f.node.device, f.node.inode)] = f.rel
        else:
            self.error(f"{_show(f.rel)}: not restored: {f.failed}")

    def _acquire_dir(self, fds: _DirFds, f: _File) -> bool:
        if f.dfd < 0:
            try:
                f.dfd = fds.acquire(f.rel[:-1])
            except OSError as exc:
                f.failed = f"cannot open its directory: {exc.strerror}"
                return False
        return True

    async def _window(
        self, fds: _DirFds, win: list[tuple[_File, int, int]], restored: dict[tuple[int, int], Rel]
    ) -> None:
        need: list[bytes] = []
        blobs: dict[bytes, bytes | ClawbackError] = {}
        for f, first, end in win:
            if f.failed:
                continue
            for cid in f.node.content[first:end]:
                if cid in blobs:
                    continue
                hit = self.cache.get(cid)
                if hit is not None:
                    self.cache.move_to_end(cid)
                    blobs[cid] = hit
                else:
                    blobs[cid] = b""
                    need.append(cid)
        fetched = await self.fetch(need, DATA)
        blobs.update(fetched)
        for cid, data in fetched.items():
            if isinstance(data, bytes):
                self._cache_put(cid, data)
        # A file wholly inside this window is created, written and finished by one thread call;
        # a file spread over several windows is opened here once and finished by the last one.
        whole: list[_File] = []
        parts: list[tuple[_File, int, int]] = []
        for f, a, b in win:
            if a == 0 and b == len(f.node.content):
                if self._acquire_dir(fds, f):
                    whole.append(f)
                else:
                    self._done(fds, f, False, restored)
                continue
            if f.fd is None and not f.failed and self._acquire_dir(fds, f):
                self._open_tmp(f)
            parts.append((f, a, b))
        zero: dict[bytes, bool] = {}

        def work(items: list[tuple[_File, int, int]], files: list[_File]) -> list[bool]:
            for f, a, b in items:
                if f.fd is not None:
                    self._write_part(f, a, b, blobs, zero)
            oks = []
            for f in files:
                self._open_tmp(f)
                if f.fd is not None:
                    self._write_part(f, 0, len(f.node.content), blobs, zero)
                oks.append(self._finish_file(f))
            return oks

        n = self.workers
        jobs = [(parts[i::n], whole[i::n]) for i in range(n) if parts[i::n] or whole[i::n]]
        results = await asyncio.gather(*(self.run_cpu(work, a, b) for a, b in jobs))
        for (_, files), oks in zip(jobs, results, strict=True):
            for f, ok in zip(files, oks, strict=True):
                self.p.bytes_done += f.node.size
                self._done(fds, f, ok, restored)
        for f, a, b in parts:
            f.remaining -= b - a
            self.p.bytes_done += sum(f.node.content_sizes[a:b])
            if f.remaining == 0:
                ok = await self.run_cpu(self._finish_file, f)
                self._done(fds, f, ok, restored)
        self.progress()

    async def restore_content(
        self, fds: _DirFds, files: list[_File], restored: dict[tuple[int, int], Rel]
    ) -> None:
        windows = self._windows(files)
        try:

            async def task() -> None:
                for win in windows:
                    await self._window(fds, win, restored)

            async with asyncio.TaskGroup() as tg:
                # Two windows per thread: one downloads while the other is opened and written.
                for _ in range(self.workers * 2):
                    tg.create_task(task())
        finally:
            for f in files:  # only after a failure: close what is still open
                if f.fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(f.fd)
                    with contextlib.suppress(OSError):
                        os.unlink(f.tmp, dir_fd=f.dfd)

    # -- stage 4: hard links, stage 5: directory metadata -----------------------------------------

    def make_links(
        self,
        fds: _DirFds,
        links: list[tuple[Rel, repo_pb2.Node]],
        restored: dict[tuple[int, int], Rel],
    ) -> None:
        """Thread: link each later hard link to the first restored path of its inode."""
        for rel, node in links:
            first = restored.get((node.device, node.inode))
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
        try:
            await self._load_keys(set(self.snapshot.key_ids))
            await self.load_trees()
            self.progress(force=True)
            top = await asyncio.to_thread(self._open_target)
            fds = _DirFds(top)
            try:
                files, links = await self.run_cpu(self.make_structure, fds)
                self.result.dirs = len(self.dirs) - len(self.failed_dirs)
                restored: dict[tuple[int, int], Rel] = {}
                await self.restore_content(fds, files, restored)
                await self.run_cpu(self.make_links, fds, links, restored)
                await self.run_cpu(self.dir_metadata, fds)
            finally:
                fds.close_all()
                os.close(top)
        finally:
            self.pool.shutdown(wait=False, cancel_futures=True)
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
        return os.open(self.target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


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
