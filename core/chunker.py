"""Content-defined chunking, registered by name so every agent of a repository cuts alike."""

from __future__ import annotations

import fnmatch
import mmap
import os
import re
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from pyfastcdc import FastCDC

from core.errors import ConfigError
from core.format import PAGED_FORMATS, RepoConfig


@dataclass(frozen=True)
class ChunkerParams:
    name: str
    min_size: int
    avg_size: int  # pyfastcdc's parameter; its real mean is about avg + min
    max_size: int
    fixed: bool = False  # cut every max_size bytes, whatever the content (min = avg = max)


# design.md §Chunking. Names are stored in the repository config: never change
# a registered entry's numbers, register a new name instead.
CHUNKERS: dict[str, ChunkerParams] = {
    "fastcdc-1m": ChunkerParams("fastcdc-1m", 256 * 1024, 768 * 1024, 4 * 1024 * 1024),
    "fastcdc-256k": ChunkerParams("fastcdc-256k", 64 * 1024, 192 * 1024, 1024 * 1024),
    # For files of fixed-size pages rewritten in place (databases): a 64 KiB grid is a
    # multiple of every common page size (SQLite 4 KiB, PostgreSQL 8, InnoDB 16), so a
    # changed page changes one chunk.
    "fixed-64k": ChunkerParams("fixed-64k", 64 * 1024, 64 * 1024, 64 * 1024, fixed=True),
}

# Bytes read per call, at least twice the largest chunk: 4 MiB blocks (8 MiB for fastcdc-1m)
# read as fast as 8 MiB ones and halve what the blocks in flight pin with fastcdc-256k.
READ_SIZE = 4 * 1024 * 1024
# Free blocks a pool keeps for reuse; more are unmapped. In-flight blocks are the caller's
# to bound (agent/backup.py: file tasks x batches in flight).
POOL_IDLE_BLOCKS = 2


def params(name: str) -> ChunkerParams:
    try:
        return CHUNKERS[name]
    except KeyError:
        raise ConfigError("repository config", "chunker", f"unknown chunker {name!r}") from None


def _refs_when_only_listed() -> int:
    """sys.getrefcount of a list item that nothing else refers to, as `_BlockPool` calls it."""
    items = [object()]
    return sys.getrefcount(items[0])


_IDLE_REFS = _refs_when_only_listed()


class _BlockPool:
    """Read blocks that are reused once no view into them is left.

    Fresh memory is expensive to touch on some VMs (recipes.md: ~10 us per 4 KiB
    page), and 8 MiB blocks freed to malloc fragment its heap: the agent's RSS
    grew far beyond what it held. Blocks are private anonymous mmaps, outside the
    malloc heap; only the pages written count in RSS. Every memoryview of a block refers
    to it, so a block whose reference count is the pool's own has no live view
    and can be written again; a block dropped from the pool is unmapped when its
    last view goes.
    """

    def __init__(self, idle: int = POOL_IDLE_BLOCKS) -> None:
        self.idle = idle
        self._blocks: list[mmap.mmap] = []
        self._lock = threading.Lock()
        self.created = 0  # blocks mapped over the pool's life (for measurement and tests)

    def take(self, size: int) -> mmap.mmap:
        """A block of `size` bytes that no view refers to (its bytes are stale)."""
        with self._lock:
            blocks = self._blocks
            found = -1
            idle = 0
            i = 0
            while i < len(blocks):
                if sys.getrefcount(blocks[i]) > _IDLE_REFS:
                    i += 1
                    continue
                if len(blocks[i]) != size or (found >= 0 and idle >= self.idle):
                    del blocks[i]  # resized chunker, or more free blocks than we keep
                    continue
                if found < 0:
                    found = i
                else:
                    idle += 1
                i += 1
            if found >= 0:
                return blocks[found]
            # Private: plain anonymous memory (the default, MAP_SHARED, is shmem: slower to
            # fault in and counted apart from the process's anonymous RSS).
            block = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
            blocks.append(block)
            self.created += 1
            return block

    def __len__(self) -> int:
        return len(self._blocks)


class Chunker:
    """Cuts byte streams into chunks: content-defined, or on a fixed grid (`params.fixed`).
    Thread-safe (one native cutter per thread)."""

    def __init__(self, p: ChunkerParams, like: Chunker | None = None) -> None:
        """`like`: another chunker whose read blocks this one shares (one pool, one block
        size: each pool keeps its own idle blocks, 8-16 MiB more at the agent's peak)."""
        self.params = p
        self._local = threading.local()
        self.read_size = max(READ_SIZE, 2 * p.max_size)
        if like is not None:
            self.read_size = max(self.read_size, like.read_size)
        # For a fixed grid, a multiple of its size: every block then ends on a cut point.
        assert not p.fixed or self.read_size % p.max_size == 0
        pool: _BlockPool | None = None
        if like is not None and like.read_size == self.read_size:
            pool = like.pool
        self.pool: _BlockPool = _BlockPool() if pool is None else pool  # (empty pools are falsy)

    def _cdc(self) -> FastCDC:
        cdc = getattr(self._local, "cdc", None)
        if cdc is None:
            p = self.params
            cdc = FastCDC(p.avg_size, min_size=p.min_size, max_size=p.max_size)
            self._local.cdc = cdc
        return cdc

    def cut(self, buf: bytes | bytearray | memoryview) -> list[tuple[int, int]]:
        """(offset, length) of each chunk of `buf`, treating its end as the end of the data."""
        if self.params.fixed:
            step, n = self.params.max_size, len(buf)
            return [(off, min(step, n - off)) for off in range(0, n, step)]
        return [(c.offset, c.length) for c in self._cdc().cut_buf(buf)]

    def chunks_of_fd(self, fd: int, size: int) -> Iterator[memoryview]:
        """Yield the chunks of an open file of `size` bytes (as stat saw it).

        Blocks are read large and the unfinished tail is carried into the next
        block, so cut points equal those of cutting the whole file at once.
        Reading stops at `size` bytes (a file growing under a live read is cut
        at its stat size) or at an earlier end of file. Each yielded view stays
        valid for as long as the caller keeps it: a file read in one go gets a
        buffer of its own, and a pool block (larger files) is written again only
        when no view into it is left (see `_BlockPool`).
        """
        remaining = size
        carry: memoryview | None = None
        while True:
            keep = len(carry) if carry is not None else 0
            want = min(self.read_size - keep, remaining) if remaining > 0 else 0
            if keep + want == 0:
                return
            # One buffer per read, filled in place: the carried tail, then the file's bytes.
            if carry is None and want == remaining:
                # A file read whole: a buffer of its own, freed with its chunks. (Packing small
                # files into shared pool blocks pinned 8 MiB per block until every file in it
                # was stored: ~5 blocks more at the peak of a 2G backup.)
                view = memoryview(bytearray(want))
            else:
                view = memoryview(self.pool.take(self.read_size))[: keep + want]
            if carry is not None:
                view[:keep] = carry
                carry = None
            got = 0
            while got < want:
                n = os.readv(fd, [view[keep + got :]])
                if n == 0:
                    break
                got += n
            remaining -= got
            if got < want:
                view = view[: keep + got]
            if not len(view):
                return
            cuts = self.cut(view)
            end = not got or remaining <= 0
            if end or self.params.fixed:
                # Nothing to carry: the data ends here, or the block ends on a cut point of
                # the fixed grid (read_size is a multiple of it).
                for off, ln in cuts:
                    yield view[off : off + ln]
                if end:
                    return
                continue
            # The last chunk ends at the buffer's end, not at a content-defined
            # boundary: hold it back and cut again with the next block.
            for off, ln in cuts[:-1]:
                yield view[off : off + ln]
            carry = view[cuts[-1][0] :]


class ChunkPolicy:
    """Which chunker cuts which file (design.md §Paged files): the repository's `paged_chunker`
    for files that match one of its `paged_files` patterns or start as one of its
    `paged_formats`, its `chunker` for the rest.

    A pattern without '/' matches the file's name; one with '/' matches its path from the
    backup root with a leading '/' (`*/base/*/[0-9]*`). `*` matches across '/' as well (fnmatch,
    case-sensitive). Names are bytes: a pattern is matched as its UTF-8 encoding.
    """

    def __init__(self, cfg: RepoConfig) -> None:
        self.default = Chunker(params(cfg.chunker))
        self.paged: Chunker | None = None
        names: list[str] = []
        paths: list[str] = []
        self._formats: list[tuple[int, bytes]] = []
        if cfg.paged_chunker and (cfg.paged_files or cfg.paged_formats):
            self.paged = Chunker(params(cfg.paged_chunker), like=self.default)
            for pat in cfg.paged_files:
                (paths if "/" in pat else names).append(fnmatch.translate(pat))
            for name in cfg.paged_formats:
                if name not in PAGED_FORMATS:
                    raise ConfigError(
                        "repository config",
                        "paged_formats",
                        f"unknown paged format {name!r} (this agent knows "
                        f"{', '.join(sorted(PAGED_FORMATS))}): upgrade the agent",
                    )
                self._formats.append(PAGED_FORMATS[name])
        self._names = _compile(names)
        self._paths = _compile(paths)
        self._sniff = max((off + len(sig) for off, sig in self._formats), default=0)
        self.max_size = max(c.params.max_size for c in (self.default, self.paged) if c is not None)

    def for_file(self, rel: bytes) -> Chunker:
        """The chunker for the file at `rel` (its path from the backup root, no leading '/'),
        by its name alone."""
        if self.paged is not None:
            if self._names is not None and self._names.match(rel.rpartition(b"/")[2]):
                return self.paged
            if self._paths is not None and self._paths.match(b"/" + rel):
                return self.paged
        return self.default

    def for_fd(self, rel: bytes, fd: int, size: int) -> Chunker:
        """The chunker for the open file at `rel` of `size` bytes: by its name, else by its
        first bytes. Only a file larger than one paged chunk is looked into: a smaller one is
        a single chunk with either chunker (design.md §Paged files)."""
        chunker = self.for_file(rel)
        if self._sniff and chunker is self.default:
            assert self.paged is not None
            if size > self.paged.params.max_size:
                try:
                    head = os.pread(fd, self._sniff, 0)
                except OSError:
                    return chunker  # reading the file will fail and say why
                for off, sig in self._formats:
                    if head[off : off + len(sig)] == sig:
                        return self.paged
        return chunker


def _compile(regexes: list[str]) -> re.Pattern[bytes] | None:
    if not regexes:
        return None
    joined = "|".join(f"(?:{r})" for r in regexes)
    return re.compile(joined.encode("utf-8", "surrogateescape"))
