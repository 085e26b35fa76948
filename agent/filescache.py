"""The agent's files cache (design.md §Files cache): skip reading files whose stat tuple has not changed.

One file per source under the agent's state directory, read in one go and
rewritten atomically (tmp + fsync + rename + fsync dir) only when it
changed and only after a successful commit, so a failed run cannot poison
it. A cache that does not load is ignored with a warning: the worst case is
reading every file again.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import marshal
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)

MAGIC = b"clawback files cache v1\n"
_SAFE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")

# (size, mtime_ns, ctime_ns, inode, device, ids, sizes)
Entry = tuple[int, int, int, int, int, tuple[bytes, ...], tuple[int, ...]]


def cache_path(cache_dir: Path, source: str) -> Path:
    """The cache file of one source (a readable name when the source name is safe, else a hash)."""
    if _SAFE.fullmatch(source):
        stem = source
    else:
        stem = "h-" + hashlib.sha256(source.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return Path(cache_dir) / f"files.{stem}.cache"


class FilesCache:
    """path (bytes, relative to the source root) -> Entry; lookups read the old map, records build the new one.

    `scope` names what the ids are valid for (repository, chunker, id key):
    a cache written under another scope is ignored. Lookups and records are
    plain dict operations, safe to call from worker threads.
    """

    def __init__(self, path: Path, scope: str = "") -> None:
        self.path = Path(path)
        self.scope = scope
        self._old: dict[bytes, Entry] = {}
        self._new: dict[bytes, Entry] = {}
        self.loaded = False

    @classmethod
    def open(cls, cache_dir: Path, source: str, scope: str = "") -> FilesCache:
        cache = cls(cache_path(cache_dir, source), scope)
        cache.load()
        return cache

    def load(self) -> None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("files cache %s is unreadable, ignoring it: %s", self.path, exc)
            return
        try:
            if not raw.startswith(MAGIC):
                raise ValueError("bad magic")
            obj = marshal.loads(raw[len(MAGIC) :])
            if not isinstance(obj, tuple) or len(obj) != 2:
                raise ValueError("bad layout")
            scope, entries = obj
            if not isinstance(scope, str) or not isinstance(entries, dict):
                raise ValueError("bad layout")
            for key, value in entries.items():
                if not _valid(key, value):
                    raise ValueError("bad entry")
        except (ValueError, EOFError, TypeError) as exc:
            log.warning("files cache %s is corrupt, ignoring it: %s", self.path, exc)
            return
        if scope != self.scope:
            log.info(
                "files cache %s belongs to another repository or key; starting afresh", self.path
            )
            return
        self._old = entries
        self.loaded = True

    def __len__(self) -> int:
        return len(self._old)

    def lookup(
        self, key: bytes, size: int, mtime_ns: int, ctime_ns: int, inode: int, device: int
    ) -> Entry | None:
        """The cached entry if the stat tuple matches (and carry it into the new cache), else None."""
        e = self._old.get(key)
        if (
            e is None
            or e[0] != size
            or e[1] != mtime_ns
            or e[2] != ctime_ns
            or e[3] != inode
            or e[4] != device
        ):
            return None
        self._new[key] = e
        return e

    def record(self, key: bytes, entry: Entry) -> None:
        self._new[key] = entry

    def forget(self, key: bytes) -> None:
        self._new.pop(key, None)

    @property
    def changed(self) -> bool:
        return self._new != self._old

    def save(self) -> bool:
        """Write the new map atomically if it differs from what was loaded; True if written."""
        if not self.changed:
            return False
        body = MAGIC + marshal.dumps((self.scope, self._new))
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_name(f"{self.path.name}.tmp.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            view = memoryview(body)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        os.close(fd)
        os.replace(tmp, self.path)
        dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self._old = dict(self._new)
        return True


def _valid(key: object, value: object) -> bool:
    if not isinstance(key, bytes) or not isinstance(value, tuple) or len(value) != 7:
        return False
    if not all(isinstance(v, int) for v in value[:5]):
        return False
    ids, sizes = value[5], value[6]
    return (
        isinstance(ids, tuple)
        and isinstance(sizes, tuple)
        and len(ids) == len(sizes)
        and all(isinstance(i, bytes) and len(i) == 32 for i in ids)
        and all(isinstance(s, int) for s in sizes)
        and sum(sizes) == value[0]
    )
