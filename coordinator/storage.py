"""Storage backends: where the repository's files live (design.md §Repository layout).

A backend stores opaque files under '/'-separated paths relative to the
repository root. The coordinator writes only whole files; nothing is ever
modified in place (design.md §Write ordering rule 6).
"""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from core.errors import ClawbackError, NotFound, ResourceExhausted, UsageError

STAGING = "tmp"  # design.md §Repository layout: tmp/ is staging, not repository content
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


class Backend(Protocol):
    """A place to keep repository files.

    Errors, for every method: a missing file raises `NotFound`; a full disk
    or exhausted quota raises `ResourceExhausted` ("coordinator disk full: ...")
    and leaves no partial file visible; any other I/O failure raises
    `ClawbackError` naming the path. A path that is absolute, empty or holds
    a '..' or '.' component raises `UsageError`. All calls are safe to retry.
    """

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
    """A repository in a local directory: temp file, fsync, rename, fsync the directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

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
