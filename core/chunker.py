"""Content-defined chunking, registered by name so every agent of a repository cuts alike."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from pyfastcdc import FastCDC

from core.errors import ConfigError


@dataclass(frozen=True)
class ChunkerParams:
    name: str
    min_size: int
    avg_size: int  # pyfastcdc's parameter; its real mean is about avg + min
    max_size: int


# design.md §Chunking. Names are stored in the repository config: never change
# a registered entry's numbers, register a new name instead.
CHUNKERS: dict[str, ChunkerParams] = {
    "fastcdc-1m": ChunkerParams("fastcdc-1m", 256 * 1024, 768 * 1024, 4 * 1024 * 1024),
    "fastcdc-256k": ChunkerParams("fastcdc-256k", 64 * 1024, 192 * 1024, 1024 * 1024),
}

READ_SIZE = 8 * 1024 * 1024  # bytes read per call; must be >= max_size


def params(name: str) -> ChunkerParams:
    try:
        return CHUNKERS[name]
    except KeyError:
        raise ConfigError("repository config", "chunker", f"unknown chunker {name!r}") from None


class Chunker:
    """Cuts byte streams into content-defined chunks. Thread-safe (one native cutter per thread)."""

    def __init__(self, p: ChunkerParams) -> None:
        self.params = p
        self._local = threading.local()
        self.read_size = max(READ_SIZE, 2 * p.max_size)

    def _cdc(self) -> FastCDC:
        cdc = getattr(self._local, "cdc", None)
        if cdc is None:
            p = self.params
            cdc = FastCDC(p.avg_size, min_size=p.min_size, max_size=p.max_size)
            self._local.cdc = cdc
        return cdc

    def cut(self, buf: bytes | bytearray | memoryview) -> list[tuple[int, int]]:
        """(offset, length) of each chunk of `buf`, treating its end as the end of the data."""
        return [(c.offset, c.length) for c in self._cdc().cut_buf(buf)]

    def chunks_of_fd(self, fd: int, size: int) -> Iterator[memoryview]:
        """Yield the chunks of an open file of `size` bytes (as stat saw it).

        Blocks are read large and the unfinished tail is carried into the next
        block, so cut points equal those of cutting the whole file at once.
        Reading stops at `size` bytes (a file growing under a live read is cut
        at its stat size) or at an earlier end of file. Each yielded view stays
        valid for as long as the caller keeps it: every block is a fresh buffer.
        """
        remaining = size
        carry: memoryview | None = None
        while True:
            keep = len(carry) if carry is not None else 0
            want = min(self.read_size - keep, remaining) if remaining > 0 else 0
            # One buffer per block, filled in place: the carried tail, then the file's bytes.
            buf = bytearray(keep + want)
            view = memoryview(buf)
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
            if not got or remaining <= 0:
                for off, ln in cuts:
                    yield view[off : off + ln]
                return
            # The last chunk ends at the buffer's end, not at a content-defined
            # boundary: hold it back and cut again with the next block.
            for off, ln in cuts[:-1]:
                yield view[off : off + ln]
            carry = view[cuts[-1][0] :]
