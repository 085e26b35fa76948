"""Pack files: many envelopes followed by their own index (design.md §Packs).

    pack     = envelope* header trailer
    header   = "CBPH" version:u8(=2; 1 is read) reserved:u8[3] count:u32 entry*count
    entry    = id:32 type:u8 reserved:u8[3] offset:u64 length:u32 checksum:16   ; 64 bytes
    checksum = BLAKE3(envelope)[:16]
    trailer  = header_length:u32 header_hash:32 "CBPKv1\\0\\0"                    ; 44 bytes
    pack name = hex(header_hash) for version 2, hex(BLAKE3(entire pack file)) for version 1;
                stored at data/<2 hex>/<64 hex>

The coordinator only ever handles ciphertext here: checksums are unkeyed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import struct
import tempfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import blake3

from coordinator.storage import DIRECT_ALIGN, Backend
from core.errors import ClawbackError, IntegrityError, NotFound, ResourceExhausted

HEADER_MAGIC = b"CBPH"
TRAILER_MAGIC = b"CBPKv1\0\0"
# Version 2 packs are named by their header hash (which covers every envelope's checksum), so
# a pack is hashed once as it is written, not twice; version 1 packs (named by the hash of the
# whole file) stay readable.
VERSION = 2
READABLE_VERSIONS = (1, 2)
MISNAMED = "header does not match its name"  # a version 2 pack stored under another name
HEADER_FIXED = struct.Struct("<4sB3sI")  # 12 bytes
ENTRY = struct.Struct("<32sB3sQI16s")  # 64 bytes
TRAILER = struct.Struct("<I32s8s")  # 44 bytes
CHECKSUM_SIZE = 16
BLOB_TYPES = (1, 2)  # design.md §Blob envelope: 1 = DATA, 2 = TREE
TAIL_GUESS = 64 * 1024  # first ranged read of a pack's end: usually holds the whole header
READ_WINDOW = 8 * 1024 * 1024  # largest single read when fetching runs of envelopes
READ_GAP = 64 * 1024  # envelopes this close together are fetched in one read
_ZERO3 = b"\0\0\0"
# With the backend's `direct_io` (coordinator config `[repository] direct_io`), pack writes
# bypass the page cache (O_DIRECT) through reused aligned buffers: a pack is written once and
# read rarely, and filling fresh page cache costs more CPU than the write. Filesystems that
# refuse O_DIRECT fall back to ordinary buffered writes.
DIRECT_BUFFER = 4 * 1024 * 1024  # bytes per O_DIRECT write; a multiple of DIRECT_ALIGN
_O_DIRECT = getattr(os, "O_DIRECT", 0)
_buffers: list[mmap.mmap] = []  # idle aligned buffers, reused so their pages are touched once
_buffers_lock = threading.Lock()


def _take_buffer() -> mmap.mmap:
    with _buffers_lock:
        if _buffers:
            return _buffers.pop()
    return mmap.mmap(-1, DIRECT_BUFFER)  # anonymous mappings are page-aligned


def _give_buffer(buf: mmap.mmap) -> None:
    with _buffers_lock:
        if len(_buffers) < 8:
            _buffers.append(buf)


class PackEntry(NamedTuple):
    """One header entry: where a blob lives inside its pack."""

    id: bytes
    type: int
    offset: int
    length: int
    checksum: bytes


@dataclass(frozen=True)
class PackResult:
    """A finished pack, renamed into `data/` (and not yet indexed)."""

    pack_id: bytes
    size: int
    entries: tuple[PackEntry, ...]


@dataclass(frozen=True)
class PackHeader:
    """A parsed header: its version, its hash (from the trailer, checked) and its entries."""

    version: int
    header_hash: bytes
    entries: list[PackEntry]

    def names(self, pack_id: bytes) -> bool | None:
        """Whether `pack_id` is this pack's name; None when only the whole file can tell (v1)."""
        return self.header_hash == pack_id if self.version >= 2 else None


@dataclass(frozen=True)
class PackProblem:
    """One finding of `verify_pack`; `blob` is None for a pack-level problem."""

    pack_id: bytes
    blob: bytes | None
    message: str


def checksum(envelope: bytes) -> bytes:
    """design.md §Packs: checksum = BLAKE3(envelope)[:16], unkeyed."""
    return blake3.blake3(envelope).digest()[:CHECKSUM_SIZE]


def pack_path(pack_id: bytes) -> str:
    """design.md §Repository layout: data/<2 hex>/<64 hex>."""
    name = pack_id.hex()
    return f"data/{name[:2]}/{name}"


def pack_id_from_path(path: str) -> bytes | None:
    """The pack id a `data/` path names, or None if the path is not a pack name."""
    parts = path.split("/")
    if len(parts) != 3 or parts[0] != "data" or len(parts[2]) != 64:
        return None
    name = parts[2]
    if name != name.lower() or parts[1] != name[:2]:
        return None
    try:
        return bytes.fromhex(name)
    except ValueError:
        return None


def encode_header(entries: Sequence[PackEntry], version: int = VERSION) -> bytes:
    """The header and trailer that close a pack holding `entries` (`version` 1: for tests of
    old repositories)."""
    parts = [HEADER_FIXED.pack(HEADER_MAGIC, version, _ZERO3, len(entries))]
    parts += [ENTRY.pack(e.id, e.type, _ZERO3, e.offset, e.length, e.checksum) for e in entries]
    header = b"".join(parts)
    return header + TRAILER.pack(len(header), blake3.blake3(header).digest(), TRAILER_MAGIC)


class PackWriter:
    """Streams envelopes into a staging file and moves the finished pack into `data/`.

    Not thread-safe: one writer per upload stream. Any failure discards the
    staging file (nothing half-written becomes visible); disk full raises
    `ResourceExhausted`.
    """

    def __init__(self, backend: Backend, direct: bool | None = None) -> None:
        """`direct` overrides the backend's `direct_io` setting (tests)."""
        self._backend = backend
        fd, name = tempfile.mkstemp(prefix="pack-", suffix=".tmp", dir=backend.staging_dir())
        self._path = Path(name)
        self._file = os.fdopen(fd, "wb", buffering=0)
        self._entries: list[PackEntry] = []
        self._size = 0
        self._closed = False
        self._buf: mmap.mmap | None = None
        self._view: memoryview | None = None
        self._fill = 0
        self._direct_ok = False
        if backend.direct_io if direct is None else direct:
            try:
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | _O_DIRECT)
            except OSError:
                pass  # not supported here: buffered writes
            else:
                self._buf = _take_buffer()
                self._view = memoryview(self._buf)

    @property
    def size(self) -> int:
        """Bytes of envelopes written so far."""
        return self._size

    @property
    def count(self) -> int:
        return len(self._entries)

    @property
    def entries(self) -> tuple[PackEntry, ...]:
        return tuple(self._entries)

    def add(self, id: bytes, type: int, envelope: bytes) -> None:
        """Append one envelope (the caller has validated id, type and size)."""
        if self._closed:
            raise ClawbackError("pack writer is closed")
        self._write(envelope)
        self._entries.append(PackEntry(id, type, self._size, len(envelope), checksum(envelope)))
        self._size += len(envelope)

    def finish(self) -> PackResult:
        """Write header and trailer, fsync, and rename into `data/` (design.md
        §Write ordering rule 1). The result still has to be indexed."""
        if self._closed:
            raise ClawbackError("pack writer is closed")
        # design.md §Packs: the header is written last, so a pack is streamed once.
        tail = encode_header(self._entries)
        self._write(tail)
        try:
            if self._view is not None:
                # The aligned part directly, the unaligned rest through the page cache.
                aligned = self._fill - self._fill % DIRECT_ALIGN
                self._write_direct(aligned)
                if self._view is not None:
                    self._buffered()
            os.fsync(self._file.fileno())
            self._file.close()
        except OSError as exc:
            self.abort()
            raise _translate_write(exc) from exc
        self._closed = True
        self._release()
        # design.md §Packs: a version 2 pack is named by its header hash, the trailer's.
        pack_id = tail[-TRAILER.size + 4 : -len(TRAILER_MAGIC)]
        try:
            self._backend.put_file(pack_path(pack_id), self._path)
        finally:
            self._path.unlink(missing_ok=True)  # put_file consumed it unless it failed
        return PackResult(pack_id, self._size + len(tail), tuple(self._entries))

    def abort(self) -> None:
        """Discard the pack: delete the staging file. Safe to call twice."""
        if not self._closed:
            self._closed = True
            with contextlib.suppress(OSError):  # the file is being thrown away
                self._file.close()
        self._release()
        self._path.unlink(missing_ok=True)

    def _release(self) -> None:
        if self._view is not None:
            self._view.release()
            self._view = None
        if self._buf is not None:
            _give_buffer(self._buf)
            self._buf = None

    def _write(self, data: bytes) -> None:
        try:
            view = memoryview(data)
            while view:
                dview = self._view
                if dview is None:
                    n = self._file.write(view)
                    view = view[n:]
                    continue
                n = min(len(view), DIRECT_BUFFER - self._fill)
                dview[self._fill : self._fill + n] = view[:n]
                self._fill += n
                view = view[n:]
                if self._fill == DIRECT_BUFFER:
                    self._write_direct(DIRECT_BUFFER)
        except OSError as exc:
            self.abort()
            raise _translate_write(exc) from exc

    def _write_direct(self, n: int) -> None:
        """Write the first `n` (aligned) bytes of the buffer and keep the rest at its start."""
        dview = self._view
        assert dview is not None
        done = 0
        while done < n:
            try:
                done += os.write(self._file.fileno(), dview[done:n])
            except OSError as exc:
                if exc.errno != errno.EINVAL or done or self._direct_ok:
                    raise
                self._buffered()  # refused at the first write: write through the page cache
                return
        rest = self._fill - n
        if rest:
            dview[:rest] = dview[n : self._fill]
        self._fill = rest
        self._direct_ok = True

    def _buffered(self) -> None:
        """Leave direct I/O: write what the buffer holds normally; later writes go straight through."""
        fd = self._file.fileno()
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_O_DIRECT)
        dview = self._view
        assert dview is not None
        done = 0
        while done < self._fill:
            done += os.write(fd, dview[done : self._fill])
        self._fill = 0
        self._release()


def _translate_write(exc: OSError) -> ClawbackError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhausted(f"coordinator disk full: writing a pack: {exc.strerror}")
    return ClawbackError(f"writing a pack: {exc}")


def parse_pack_header(
    tail: bytes, pack_size: int | None = None, name: str = "pack"
) -> list[PackEntry]:
    """Parse the header from `tail`, the last bytes of a pack (at least header +
    trailer; the whole pack will do). With `pack_size`, also check that the
    entries exactly tile the envelope area before the header.
    Raises `IntegrityError` naming `name` on any mismatch."""
    return parse_header(tail, pack_size, name).entries


def parse_header(tail: bytes, pack_size: int | None = None, name: str = "pack") -> PackHeader:
    """`parse_pack_header`, with the header's version and hash."""
    if len(tail) < TRAILER.size:
        raise IntegrityError(f"{name}: too short for a trailer ({len(tail)} bytes)")
    header_len, header_hash, magic = TRAILER.unpack_from(tail, len(tail) - TRAILER.size)
    if magic != TRAILER_MAGIC:
        raise IntegrityError(f"{name}: bad trailer magic {magic!r}")
    if header_len < HEADER_FIXED.size or (header_len - HEADER_FIXED.size) % ENTRY.size:
        raise IntegrityError(f"{name}: invalid header length {header_len}")
    if header_len > len(tail) - TRAILER.size:
        raise IntegrityError(f"{name}: header length {header_len} exceeds the pack")
    end = len(tail) - TRAILER.size
    header = tail[end - header_len : end]
    if blake3.blake3(header).digest() != header_hash:
        raise IntegrityError(f"{name}: header hash mismatch")
    hmagic, version, reserved, count = HEADER_FIXED.unpack_from(header, 0)
    if hmagic != HEADER_MAGIC:
        raise IntegrityError(f"{name}: bad header magic {hmagic!r}")
    if version not in READABLE_VERSIONS:
        raise IntegrityError(f"{name}: pack version {version} is not supported")
    if header_len != HEADER_FIXED.size + count * ENTRY.size:
        raise IntegrityError(f"{name}: header length {header_len} does not hold {count} entries")
    if reserved != _ZERO3:
        raise IntegrityError(f"{name}: reserved header bytes are not zero")
    entries: list[PackEntry] = []
    expected = 0
    data_end = None if pack_size is None else pack_size - header_len - TRAILER.size
    for blob_id, btype, res, offset, length, csum in ENTRY.iter_unpack(header[HEADER_FIXED.size :]):
        what = f"{name}: entry {len(entries)} (blob {blob_id.hex()[:16]})"
        if btype not in BLOB_TYPES:
            raise IntegrityError(f"{what}: invalid blob type {btype}")
        if res != _ZERO3:
            raise IntegrityError(f"{what}: reserved bytes are not zero")
        if data_end is not None and offset != expected:
            raise IntegrityError(f"{what}: offset {offset}, expected {expected}")
        expected = offset + length
        entries.append(PackEntry(blob_id, btype, offset, length, csum))
    if data_end is not None and expected != data_end:
        raise IntegrityError(f"{name}: envelopes end at {expected}, header starts at {data_end}")
    return PackHeader(version, header_hash, entries)


def read_header(backend: Backend, path: str, size: int | None = None) -> list[PackEntry]:
    """Read and parse a stored pack's header with ranged reads of its end only."""
    return read_pack_header(backend, path, size).entries


def read_pack_header(backend: Backend, path: str, size: int | None = None) -> PackHeader:
    """`read_header`, with the header's version and hash."""
    name = f"pack {path.rsplit('/', 1)[-1]}"
    if size is None:
        size = backend.stat(path)
    if size < TRAILER.size + HEADER_FIXED.size:
        raise IntegrityError(f"{name}: too short ({size} bytes)")
    start = max(0, size - TAIL_GUESS)
    tail = backend.get(path, start, size - start)
    if len(tail) != size - start:
        raise IntegrityError(f"{name}: short read")
    header_len = TRAILER.unpack_from(tail, len(tail) - TRAILER.size)[0]
    need = header_len + TRAILER.size
    if need > len(tail) and need <= size:
        tail = backend.get(path, size - need, need)
        if len(tail) != need:
            raise IntegrityError(f"{name}: short read")
    return parse_header(tail, size, name)


def read_envelopes(
    backend: Backend, path: str, entries: Iterable[PackEntry]
) -> Iterator[tuple[PackEntry, bytes]]:
    """Fetch the envelopes of `entries` (one pack) in offset order, coalescing
    nearby ones into reads of at most READ_WINDOW bytes, all through one open
    file (`Backend.get_ranges`). An envelope cut short by the end of the file
    comes back short; a missing pack raises NotFound."""
    todo = sorted(entries, key=lambda e: e.offset)
    windows: list[tuple[int, int]] = []
    groups: list[list[PackEntry]] = []
    i = 0
    while i < len(todo):
        start = todo[i].offset
        j = i + 1
        end = start + todo[i].length
        while (
            j < len(todo)
            and todo[j].offset - end <= READ_GAP
            and todo[j].offset + todo[j].length - start <= READ_WINDOW
        ):
            end = max(end, todo[j].offset + todo[j].length)
            j += 1
        windows.append((start, end - start))
        groups.append(todo[i:j])
        i = j
    reads = backend.get_ranges(path, windows)
    for (start, _), group, window in zip(windows, groups, reads, strict=True):
        # The window is the backend's reused buffer: each envelope is copied out once.
        for e in group:
            yield e, bytes(window[e.offset - start : e.offset - start + e.length])
        window.release()


def verify_pack(backend: Backend, pack_id: bytes) -> Iterator[PackProblem]:
    """check --read-data for one pack (design.md §Check): the header parses, every
    envelope matches its checksum, and the pack is named by its header hash (version 2) or
    by the hash of the whole file (version 1).
    Yields one problem per damaged blob, plus pack-level problems."""
    path = pack_path(pack_id)
    try:
        size = backend.stat(path)
        header = read_pack_header(backend, path, size)
    except NotFound:
        yield PackProblem(pack_id, None, f"pack {pack_id.hex()}: missing from storage")
        return
    except IntegrityError as exc:
        yield PackProblem(pack_id, None, str(exc))
        return
    entries = header.entries
    named = header.names(pack_id)
    if named is False:
        yield PackProblem(pack_id, None, f"pack {pack_id.hex()}: {MISNAMED}")
    # Version 1: the entries tile the envelope area (parse_header checked), so hashing them in
    # order and then the header+trailer hashes the entire file.
    hasher = blake3.blake3() if named is None else None
    for entry, envelope in read_envelopes(backend, path, entries):
        if hasher is not None:
            hasher.update(envelope)
        if len(envelope) != entry.length:
            yield PackProblem(
                pack_id, entry.id, f"blob {entry.id.hex()} in pack {pack_id.hex()}: short read"
            )
        elif checksum(envelope) != entry.checksum:
            yield PackProblem(
                pack_id,
                entry.id,
                f"blob {entry.id.hex()} in pack {pack_id.hex()}: checksum mismatch",
            )
    if hasher is not None:
        data_end = entries[-1].offset + entries[-1].length if entries else 0
        hasher.update(backend.get(path, data_end, size - data_end))
        if hasher.digest() != pack_id:
            yield PackProblem(
                pack_id, None, f"pack {pack_id.hex()}: content does not match its name"
            )
