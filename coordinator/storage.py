"""Storage backends: where the repository's files live (design.md §Repository layout).

A backend stores opaque files under '/'-separated paths relative to the
repository root. The coordinator writes only whole files; nothing is ever
modified in place (design.md §Write ordering rule 6).
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import threading
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

from core.errors import ClawbackError, NotFound, ResourceExhausted, UsageError

STAGING = "tmp"  # design.md §Repository layout: tmp/ is staging, not repository content
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
DIRECT_IO_SUPPORTED = hasattr(os, "O_DIRECT")
DIRECT_ALIGN = 4096  # offsets, lengths and buffers of O_DIRECT transfers are multiples of this
_O_DIRECT = getattr(os, "O_DIRECT", 0)
READ_BUFFER = 8 * 1024 * 1024 + 2 * DIRECT_ALIGN  # a read window plus alignment slack
DIRECT_MIN = 256 * 1024  # smaller ranges are read through the page cache, with readahead hints
_read_buffers: list[
    mmap.mmap
] = []  # idle page-aligned read buffers, reused so their pages are touched once
_read_buffers_lock = threading.Lock()


def _read_fully(fd: int, view: memoryview, offset: int, length: int, *, aligned: bool) -> int:
    """Read `length` bytes at `offset` into the start of `view`; fewer only at the end of the
    file. With `aligned` (O_DIRECT) the request is rounded up to whole blocks."""
    want = length + (-length % DIRECT_ALIGN if aligned else 0)
    got = 0
    while got < want:
        n = os.preadv(fd, [view[got:want]], offset + got)
        if n == 0:
            break  # end of file
        got += n
        if aligned and got % DIRECT_ALIGN:
            break  # a short O_DIRECT read: the end of the file
    return got


def _take_read_buffer(size: int) -> mmap.mmap:
    with _read_buffers_lock:
        for i, buf in enumerate(_read_buffers):
            if len(buf) >= size:
                return _read_buffers.pop(i)
    return mmap.mmap(-1, max(size, READ_BUFFER))  # anonymous mappings are page-aligned


def _give_read_buffer(buf: mmap.mmap) -> None:
    with _read_buffers_lock:
        if len(_read_buffers) < 4 and len(buf) <= 2 * READ_BUFFER:
            _read_buffers.append(buf)
            return
    with contextlib.suppress(BufferError):  # a caller still holds a view: left to the GC
        buf.close()


class Backend(Protocol):
    """A place to keep repository files.

    Errors, for every method: a missing file raises `NotFound`; a full disk
    or exhausted quota raises `ResourceExhausted` ("coordinator disk full: ...")
    and leaves no partial file visible; any other I/O failure raises
    `ClawbackError` naming the path. A path that is absolute, empty or holds
    a '..' or '.' component raises `UsageError`. All calls are safe to retry.
    """

    direct_io: bool
    """Pack files bypass the page cache (O_DIRECT) when written to staging and when read
    back by `get_ranges` (coordinator config `[repository] direct_io`)."""

    def put(self, path: str, data: bytes) -> None:
        """Store `data` at `path`, atomically (readers see the old file or the
        whole new one) and durably (it survives a crash once this returns).
        An existing file is replaced. Idempotent."""

    def put_file(self, path: str, local_file: Path) -> None:
        """Move a fully written file from `staging_dir()` to `path`, atomically
        and durably. The local file is consumed. Idempotent for equal content."""

    def get(self, path: str, offset: int = 0, length: int = -1) -> bytes:
        """Read `length` bytes from `offset` (-1: to the end). A range past the
        end of the file returns the bytes that exist (possibly none)."""

    def get_ranges(self, path: str, ranges: Sequence[tuple[int, int]]) -> Iterator[memoryview]:
        """Read the (offset, length) `ranges` of one file in the order given, opening it once
        (a pack read: design.md §Packs). Each range yields the bytes that exist, as `get`
        does. A yielded view is valid only until the generator is resumed: copy what you keep.
        A missing file raises `NotFound` at the first range."""

    def stat(self, path: str) -> int:
        """The size of the file in bytes."""

    def list(self, prefix: str = "") -> Iterator[str]:
        """Paths of all files whose path starts with `prefix`, in no guaranteed
        order. Staging files are never listed."""

    def delete(self, path: str) -> None:
        """Remove a file (admin operations only; no agent path reaches this)."""

    def staging_dir(self) -> Path:
        """A local directory for files in progress, on the same filesystem as
        the repository so that `put_file` can rename. Its contents are
        disposable: the coordinator empties it at start (design.md §Write ordering rule 5)."""


def check_path(path: str) -> str:
    """Validate a repository path: relative, '/'-separated, no '.'/'..' or empty parts."""
    if not path or path.startswith("/") or "\\" in path or "\0" in path:
        raise UsageError(f"invalid repository path {path!r}")
    if any(part in ("", ".", "..") for part in path.split("/")):
        raise UsageError(f"invalid repository path {path!r}")
    return path


def _translate(path: str, exc: OSError) -> ClawbackError:
    if isinstance(exc, FileNotFoundError):
        return NotFound(f"{path}: not found in repository")
    if exc.errno in _DISK_FULL:
        return ResourceExhausted(f"coordinator disk full: {path}: {exc.strerror}")
    return ClawbackError(f"storage error on {path}: {exc}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalBackend:
    """A repository in a local directory: temp file, fsync, rename, fsync the directory.

    With `direct_io`, pack files are written (coordinator/pack.py) and read back
    (`get_ranges`) with O_DIRECT through reused aligned buffers: no page cache is
    filled on either side, which on this kind of VM costs more CPU than the copy
    itself (docs/performance.md). Filesystems that refuse O_DIRECT fall back to
    buffered I/O.
    """

    def __init__(self, root: Path, *, direct_io: bool = False) -> None:
        self.root = Path(root)
        self.direct_io = direct_io and DIRECT_IO_SUPPORTED

    def __repr__(self) -> str:
        return f"LocalBackend({str(self.root)!r})"

    def _abs(self, path: str) -> Path:
        return self.root.joinpath(*check_path(path).split("/"))

    def _ensure_dirs(self, target: Path) -> None:
        # A new directory is durable only once its parent is fsynced.
        missing: list[Path] = []
        parent = target.parent
        while not parent.is_dir():
            missing.append(parent)
            parent = parent.parent
        for d in reversed(missing):
            with contextlib.suppress(FileExistsError):
                d.mkdir()
            _fsync_dir(d.parent)

    def staging_dir(self) -> Path:
        staging = self.root / STAGING
        if not staging.is_dir():
            try:
                self._ensure_dirs(staging / "x")
                staging.mkdir(exist_ok=True)
            except OSError as exc:
                raise _translate(STAGING, exc) from exc
        return staging

    def put(self, path: str, data: bytes) -> None:
        self._abs(path)
        tmp = self.staging_dir() / f"put-{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise _translate(path, exc) from exc
        self.put_file(path, tmp)

    def put_file(self, path: str, local_file: Path) -> None:
        target = self._abs(path)
        try:
            try:
                fd = os.open(local_file, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                self._ensure_dirs(target)
                os.rename(local_file, target)
            except OSError:
                Path(local_file).unlink(missing_ok=True)
                raise
            _fsync_dir(target.parent)
        except OSError as exc:
            raise _translate(path, exc) from exc

    def get(self, path: str, offset: int = 0, length: int = -1) -> bytes:
        if offset < 0 or length < -1:
            raise UsageError(f"invalid range offset={offset} length={length} for {path}")
        target = self._abs(path)
        try:
            with open(target, "rb", buffering=0) as f:
                if offset:
                    f.seek(offset)
                if length == -1:
                    return f.readall()
                parts = [f.read(length)]
                got = len(parts[0])
                while parts[-1] and got < length:  # a regular file reads short only at EOF
                    parts.append(f.read(length - got))
                    got += len(parts[-1])
                return parts[0] if len(parts) == 1 else b"".join(parts)
        except IsADirectoryError as exc:
            raise NotFound(f"{path}: not found in repository") from exc
        except OSError as exc:
            raise _translate(path, exc) from exc

    def get_ranges(self, path: str, ranges: Sequence[tuple[int, int]]) -> Iterator[memoryview]:
        for offset, length in ranges:
            if offset < 0 or length < 0:
                raise UsageError(f"invalid range offset={offset} length={length} for {path}")
        if not ranges:
            return
        target = self._abs(path)
        try:
            fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
        except IsADirectoryError as exc:
            raise NotFound(f"{path}: not found in repository") from exc
        except OSError as exc:
            raise _translate(path, exc) from exc
        dfd = -1  # the same file opened O_DIRECT, for large ranges
        buf = _take_read_buffer(max(n for _, n in ranges) + 2 * DIRECT_ALIGN)
        view = memoryview(buf)
        try:
            if self.direct_io:
                with contextlib.suppress(OSError):
                    dfd = os.open(target, os.O_RDONLY | os.O_CLOEXEC | _O_DIRECT)
            # Small ranges (trees, small files) are read through the page cache: the kernel
            # is told about all of them first, so their disk reads overlap instead of queueing.
            with contextlib.suppress(OSError):
                for offset, length in ranges:
                    if dfd < 0 or length < DIRECT_MIN:
                        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
            for offset, length in ranges:
                got, lo = -1, 0
                if dfd >= 0 and length >= DIRECT_MIN:
                    lo = offset % DIRECT_ALIGN
                    try:
                        got = _read_fully(dfd, view, offset - lo, lo + length, aligned=True)
                    except OSError as exc:
                        if exc.errno != errno.EINVAL:
                            raise _translate(path, exc) from exc
                        os.close(dfd)  # refused after all (alignment rules): buffered from now on
                        dfd, lo = -1, 0
                if got < 0:
                    try:
                        got = _read_fully(fd, view, offset, length, aligned=False)
                    except OSError as exc:
                        raise _translate(path, exc) from exc
                yield view[lo : max(lo, min(got, lo + length))]
        finally:
            view.release()
            _give_read_buffer(buf)
            os.close(fd)
            if dfd >= 0:
                os.close(dfd)

    def stat(self, path: str) -> int:
        target = self._abs(path)
        try:
            st = target.stat()
        except OSError as exc:
            raise _translate(path, exc) from exc
        if not target.is_file():
            raise NotFound(f"{path}: not found in repository")
        return st.st_size

    def list(self, prefix: str = "") -> Iterator[str]:
        # Walk only the directory the prefix names, then filter by the remainder.
        base = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        if base.split("/")[0] == STAGING:
            return
        start = self.root.joinpath(*check_path(base).split("/")) if base else self.root
        yield from (p for p in self._walk(start, base) if p.startswith(prefix))

    def _walk(self, directory: Path, rel: str) -> Iterator[str]:
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise _translate(rel or ".", exc) from exc
        for entry in entries:
            child = f"{rel}/{entry.name}" if rel else entry.name
            if entry.is_dir(follow_symlinks=False):
                if child != STAGING:
                    yield from self._walk(Path(entry.path), child)
            elif entry.is_file(follow_symlinks=False):
                yield child

    def delete(self, path: str) -> None:
        target = self._abs(path)
        try:
            target.unlink()
            _fsync_dir(target.parent)
        except OSError as exc:
            raise _translate(path, exc) from exc
