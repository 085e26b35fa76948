"""The agent's files cache (design.md §Files cache): skip reading files whose stat tuple has not changed.

One file per source under the agent's state directory, read in one go and
rewritten atomically (tmp + fsync + rename + fsync dir) only when it
changed and only after a successful commit, so a failed run cannot poison
it. A cache that does not load is ignored with a warning: the worst case is
reading every file again.

In memory (and on disk since v2) each entry is one bytes value, not a tuple
of Python objects: 40 bytes of stat fields, a flags byte (v3), the number of
chunks (v4), the 32-byte ids, the 4-byte sizes, and (v4, flag NODE) the
file's atime and its serialized tree node without the name. Flag NO_XATTRS
records that the file had no extended attributes: setting or removing one
changes the ctime, so while the stat fields match the walk need not list them
again. The node lets an unchanged file skip building one: while the stat
fields, the atime and the sparseness match (and the owner names the cache
recorded still resolve the same) it is what the walk would build, byte for
byte. A v1, v2 or v3 cache is converted when loaded (flags unknown: 0) and
written back as v4.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import marshal
import os
import re
import struct
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAGIC = b"clawback files cache v4\n"
MAGIC_V3 = b"clawback files cache v3\n"
MAGIC_V2 = b"clawback files cache v2\n"
MAGIC_V1 = b"clawback files cache v1\n"
NO_XATTRS = 1  # entry flag: the file had no extended attributes
NODE = 2  # entry flag: the entry ends with the file's atime and serialized node (v4)
SPARSE = 4  # entry flag: the stored node says sparse (st_blocks * 512 < st_size)
_SAFE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")

# (size, mtime_ns, ctime_ns, inode, device, ids, sizes)
Entry = tuple[int, int, int, int, int, tuple[bytes, ...], tuple[int, ...]]
# ids, sizes, flags, and with flag NODE the node's atime_ns and serialized node without its
# name (else 0 and b"")
CacheHit = tuple[tuple[bytes, ...], tuple[int, ...], int, int, bytes]
Names = tuple[dict[int, str], dict[int, str]]  # uid -> user, gid -> group

_HEAD = struct.Struct("<QqqQQ")  # size, mtime_ns, ctime_ns, inode, device
_FLAGS = _HEAD.size  # offset of the flags byte (v3)
_COUNT = _FLAGS + 1  # offset of the number of chunks (v4)
_BODY = _COUNT + 4  # offset of the ids
_BODY_V3 = _COUNT  # v3 had no count: the ids followed the flags
_ID = 32
_SIZE = 4  # a chunk's plaintext size (uint32, as Node.content_sizes)
_ONE = b"\x01\x00\x00\x00"  # a count of one chunk
_U32 = struct.Struct("<I")
_ATIME = struct.Struct("<q")


def cache_path(cache_dir: Path, source: str) -> Path:
    """The cache file of one source (a readable name when the source name is safe, else a hash)."""
    if _SAFE.fullmatch(source):
        stem = source
    else:
        stem = "h-" + hashlib.sha256(source.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return Path(cache_dir) / f"files.{stem}.cache"


def encode_entry(entry: Entry, flags: int = 0) -> bytes:
    """An entry's compact form; raises struct.error / ValueError when a field does not fit."""
    size, mtime_ns, ctime_ns, inode, device, ids, sizes = entry
    if len(ids) != len(sizes):
        raise ValueError("ids and sizes differ in number")
    flags &= ~(NODE | SPARSE)  # a node is added by `keep_node` only
    head = _HEAD.pack(size, mtime_ns, ctime_ns, inode, device) + bytes((flags,))
    if len(ids) == 1:  # most files
        return head + _ONE + ids[0] + _U32.pack(sizes[0])
    return head + _U32.pack(len(ids)) + b"".join(ids) + struct.pack(f"<{len(sizes)}I", *sizes)


def _body_end(value: bytes) -> int:
    """Where an entry's sizes end (its node, if any, starts); ValueError if it is too short."""
    if len(value) < _BODY:
        raise ValueError("bad entry length")
    end: int = _BODY + _U32.unpack_from(value, _COUNT)[0] * (_ID + _SIZE)
    if value[_FLAGS] & NODE:
        if len(value) < end + _ATIME.size:
            raise ValueError("bad entry length")
    elif len(value) != end:
        raise ValueError("bad entry length")
    return end


def _decode_body(value: bytes, size: int) -> tuple[tuple[bytes, ...], tuple[int, ...], int]:
    """ids, sizes and the offset where the sizes end."""
    end = _body_end(value)
    n = _U32.unpack_from(value, _COUNT)[0]
    ids_end = _BODY + _ID * n
    if n == 1:  # most files are one chunk
        ids: tuple[bytes, ...] = (value[_BODY:ids_end],)
        sizes: tuple[int, ...] = (_U32.unpack_from(value, ids_end)[0],)
    else:
        ids = tuple([value[o : o + _ID] for o in range(_BODY, ids_end, _ID)])
        sizes = struct.unpack_from(f"<{n}I", value, ids_end)
    if sum(sizes) != size:
        raise ValueError("chunk sizes do not add up to the file size")
    return ids, sizes, end


def decode_entry(value: bytes) -> Entry:
    """The tuple form of a compact entry; raises ValueError if it is malformed."""
    if len(value) < _BODY:
        raise ValueError("bad entry length")
    size, mtime_ns, ctime_ns, inode, device = _HEAD.unpack_from(value)
    ids, sizes, _ = _decode_body(value, size)
    return size, mtime_ns, ctime_ns, inode, device, ids, sizes


class FilesCache:
    """path (bytes, relative to the source root) -> Entry; lookups read the old map, records build the new one.

    `scope` names what the ids are valid for (repository, chunkers, id key):
    a cache written under another scope is ignored. Lookups and records are
    plain dict operations, safe to call from worker threads.
    """

    def __init__(self, path: Path, scope: str = "") -> None:
        self.path = Path(path)
        self.scope = scope
        self._old: dict[bytes, bytes] = {}
        self._new: dict[bytes, bytes] = {}
        # The owner names the stored nodes carry (uid -> user, gid -> group): the backup checks
        # they still resolve the same before it re-uses a node, and records its own on save.
        self.names: Names = ({}, {})
        self._old_names: Names = ({}, {})
        self.loaded = False
        self._migrated = False  # loaded from an older format: written back as v4 even if unchanged

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
            names: Names = ({}, {})
            if raw.startswith(MAGIC):
                scope, entries, names = _layout_v4(marshal.loads(memoryview(raw)[len(MAGIC) :]))
                del raw
                for key, value in entries.items():
                    if not _valid(key, value):
                        raise ValueError("bad entry")
            elif raw.startswith(MAGIC_V3):
                scope, old3 = _layout(marshal.loads(memoryview(raw)[len(MAGIC_V3) :]))
                del raw
                entries = {}
                for key, value in old3.items():
                    if not _valid_v3(key, value):
                        raise ValueError("bad entry")
                    count = _U32.pack((len(value) - _BODY_V3) // (_ID + _SIZE))
                    flags = bytes((value[_FLAGS] & NO_XATTRS,))
                    entries[key] = value[:_FLAGS] + flags + count + value[_BODY_V3:]
                self._migrated = True
            elif raw.startswith(MAGIC_V2):
                scope, old2 = _layout(marshal.loads(memoryview(raw)[len(MAGIC_V2) :]))
                del raw
                entries = {}
                for key, value in old2.items():
                    if not _valid_v2(key, value):
                        raise ValueError("bad entry")
                    count = _U32.pack((len(value) - _FLAGS) // (_ID + _SIZE))
                    entries[key] = value[:_FLAGS] + b"\x00" + count + value[_FLAGS:]
                self._migrated = True
            elif raw.startswith(MAGIC_V1):
                scope, old = _layout(marshal.loads(memoryview(raw)[len(MAGIC_V1) :]))
                del raw
                entries = _migrate(old)
                self._migrated = True
            else:
                raise ValueError("bad magic")
        except (ValueError, EOFError, TypeError, struct.error) as exc:
            log.warning("files cache %s is corrupt, ignoring it: %s", self.path, exc)
            return
        if scope != self.scope:
            log.info(
                "files cache %s belongs to another repository or key; starting afresh", self.path
            )
            self._migrated = False
            return
        self._old = entries
        self._old_names = names
        self.names = (dict(names[0]), dict(names[1]))
        self.loaded = True

    def __len__(self) -> int:
        return len(self._old)

    def lookup(
        self, key: bytes, size: int, mtime_ns: int, ctime_ns: int, inode: int, device: int
    ) -> Entry | None:
        """The cached entry if the stat tuple matches (and carry it into the new cache), else None."""
        hit = self.hit(key, size, mtime_ns, ctime_ns, inode, device)
        if hit is None:
            return None
        return size, mtime_ns, ctime_ns, inode, device, hit[0], hit[1]

    def hit(
        self, key: bytes, size: int, mtime_ns: int, ctime_ns: int, inode: int, device: int
    ) -> CacheHit | None:
        """`lookup` for the walk: (ids, sizes, flags, node atime, node) if the stat tuple
        matches, else None (the entry is carried into the new cache as it is, node included)."""
        value = self._old.get(key)
        if value is None:
            return None
        try:
            head = _HEAD.pack(size, mtime_ns, ctime_ns, inode, device)
        except struct.error:  # a stat field out of range: not something we stored
            return None
        if not value.startswith(head):
            return None
        try:
            if value.startswith(_ONE, _COUNT):  # most files: decoded inline, once per file
                end = _BODY + _ID + _SIZE
                ids: tuple[bytes, ...] = (value[_BODY : _BODY + _ID],)
                sizes: tuple[int, ...] = (_U32.unpack_from(value, _BODY + _ID)[0],)
                if sizes[0] != size:
                    return None
            else:
                ids, sizes, end = _decode_body(value, size)
            flags = value[_FLAGS]
            if flags & NODE:
                atime_ns = _ATIME.unpack_from(value, end)[0]
                node = value[end + _ATIME.size :]
            else:
                atime_ns, node = 0, b""
        except (ValueError, struct.error):  # damaged: read the file again
            return None
        self._new[key] = value
        return ids, sizes, flags, atime_ns, node

    def record(self, key: bytes, entry: Entry, flags: int = 0) -> None:
        try:
            self._new[key] = encode_entry(entry, flags)
        except (struct.error, ValueError):
            # Not representable (a chunk of 4 GiB or more, a negative size): the file is read
            # again next time, which is all a missing entry costs.
            self._new.pop(key, None)

    def unchanged(
        self, key: bytes, size: int, mtime_ns: int, ctime_ns: int, inode: int, device: int
    ) -> bool:
        """Whether the entry has this stat tuple (nothing is carried into the new cache)."""
        value = self._old.get(key)
        try:
            return value is not None and value.startswith(
                _HEAD.pack(size, mtime_ns, ctime_ns, inode, device)
            )
        except struct.error:
            return False

    def largest(self, min_size: int, limit: int) -> list[bytes]:
        """The keys of up to `limit` entries of at least `min_size` bytes, largest first."""
        sizes = [(int.from_bytes(v[:8], "little"), k) for k, v in self._old.items()]
        big = sorted(((n, k) for n, k in sizes if n >= min_size), reverse=True)
        return [k for _, k in big[:limit]]

    def keep_node(
        self,
        key: bytes,
        stat: tuple[int, int, int, int, int],
        atime_ns: int,
        sparse: bool,
        node: bytes,
    ) -> None:
        """Store a file's serialized node (without its name field) with its new entry, if that
        entry has the same (size, mtime_ns, ctime_ns, inode, device) as the node."""
        value = self._new.get(key)
        if value is None:
            return
        try:
            if not value.startswith(_HEAD.pack(*stat)):
                return
            end = _body_end(value)
            atime = _ATIME.pack(atime_ns)
        except (ValueError, struct.error):
            return
        flags = (value[_FLAGS] & NO_XATTRS) | NODE | (SPARSE if sparse else 0)
        self._new[key] = b"".join((value[:_FLAGS], bytes((flags,)), value[_COUNT:end], atime, node))

    def forget(self, key: bytes) -> None:
        self._new.pop(key, None)

    @property
    def changed(self) -> bool:
        return self._migrated or self._new != self._old or self.names != self._old_names

    def save(self) -> bool:
        """Write the new map atomically if it differs from what was loaded; True if written."""
        if not self.changed:
            return False
        body = marshal.dumps((self.scope, self._new, self.names))
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_name(f"{self.path.name}.tmp.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            for part in (MAGIC, body):  # not MAGIC + body: that would copy the whole body
                view = memoryview(part)
                while view:
                    view = view[os.write(fd, view) :]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        os.close(fd)
        del body
        os.replace(tmp, self.path)
        dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self._old = dict(self._new)
        self._old_names = (dict(self.names[0]), dict(self.names[1]))
        self._migrated = False
        return True


def _layout(obj: object) -> tuple[str, dict[Any, Any]]:
    if not isinstance(obj, tuple) or len(obj) != 2:
        raise ValueError("bad layout")
    scope, entries = obj
    if not isinstance(scope, str) or not isinstance(entries, dict):
        raise ValueError("bad layout")
    return scope, entries


def _layout_v4(obj: object) -> tuple[str, dict[Any, Any], Names]:
    if not isinstance(obj, tuple) or len(obj) != 3:
        raise ValueError("bad layout")
    scope, entries, names = obj
    _layout((scope, entries))
    if not (
        isinstance(names, tuple)
        and len(names) == 2
        and all(isinstance(m, dict) for m in names)
        and all(isinstance(k, int) and isinstance(v, str) for m in names for k, v in m.items())
    ):
        raise ValueError("bad layout")
    return scope, entries, names


def _valid(key: object, value: object) -> bool:
    """A v4 entry's shape; sums are checked when an entry is used (decode_entry)."""
    if not isinstance(key, bytes) or not isinstance(value, bytes):
        return False
    try:
        _body_end(value)
    except ValueError:
        return False
    return True


def _valid_v3(key: object, value: object) -> bool:
    return (
        isinstance(key, bytes)
        and isinstance(value, bytes)
        and len(value) >= _BODY_V3
        and (len(value) - _BODY_V3) % (_ID + _SIZE) == 0
    )


def _valid_v2(key: object, value: object) -> bool:
    return (
        isinstance(key, bytes)
        and isinstance(value, bytes)
        and len(value) >= _HEAD.size
        and (len(value) - _HEAD.size) % (_ID + _SIZE) == 0
    )


def _migrate(old: dict[Any, Any]) -> dict[bytes, bytes]:
    """v1 (tuples) to v4 (compact bytes); raises ValueError on an entry v1 would have refused."""
    out: dict[bytes, bytes] = {}
    for key, value in old.items():
        if not _valid_v1(key, value):
            raise ValueError("bad entry")
        out[key] = encode_entry(value)
    return out


def _valid_v1(key: object, value: object) -> bool:
    if not isinstance(key, bytes) or not isinstance(value, tuple) or len(value) != 7:
        return False
    if not all(isinstance(v, int) for v in value[:5]):
        return False
    ids, sizes = value[5], value[6]
    return (
        isinstance(ids, tuple)
        and isinstance(sizes, tuple)
        and len(ids) == len(sizes)
        and all(isinstance(i, bytes) and len(i) == _ID for i in ids)
        and all(isinstance(s, int) for s in sizes)
        and sum(sizes) == value[0]
    )
