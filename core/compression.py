"""Compression algorithms registered by name; a blob is stored raw when compression does not shrink it."""

from __future__ import annotations

import threading

import zstandard

from core.errors import ConfigError, IntegrityError

_LEVELS = {"zstd-1": 1, "zstd-3": 3, "zstd-6": 6, "zstd-19": 19}
NAMES = ("none", *_LEVELS)


class Compressor:
    """Thread-safe (a native context per thread)."""

    def __init__(self, name: str) -> None:
        if name not in NAMES:
            raise ConfigError("repository config", "compression", f"unknown compression {name!r}")
        self.name = name
        self._level = _LEVELS.get(name, 0)
        self._local = threading.local()

    def compress(self, data: bytes | memoryview) -> bytes | None:
        """The compressed form, or None when storing `data` raw is as small."""
        if not self._level:
            return None
        c = getattr(self._local, "c", None)
        if c is None:
            c = self._local.c = zstandard.ZstdCompressor(level=self._level, write_content_size=True)
        out = c.compress(data)
        # 1/64 smaller or not worth the decompression on restore.
        if len(out) >= len(data) - (len(data) >> 6):
            return None
        return out


_dlocal = threading.local()


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_dlocal, "d", None)
    if d is None:
        d = _dlocal.d = zstandard.ZstdDecompressor()
    return d


def decompress(data: bytes | memoryview, max_size: int) -> bytes:
    """Decompress one zstd frame, refusing output larger than `max_size`."""
    d = _decompressor()
    try:
        # A frame that declares its size is allocated at that size: check it first.
        declared = zstandard.frame_content_size(data)
        if declared > max_size:
            raise IntegrityError(
                f"blob declares {declared} bytes, more than the {max_size} allowed"
            )
        return d.decompress(data, max_output_size=max_size)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"blob does not decompress: {exc}") from exc


def decompress_into(data: bytes | memoryview, out: memoryview) -> int:
    """Decompress one zstd frame into `out` and return its length: `decompress` without
    allocating the output (a restore reuses its buffers). Output that does not fit `out`
    raises IntegrityError, as does anything but one whole frame."""
    try:
        declared = zstandard.frame_content_size(data)
        if declared > len(out):
            raise IntegrityError(
                f"blob declares {declared} bytes, more than the {len(out)} allowed"
            )
        want = declared if declared >= 0 else len(out)  # -1: the frame does not say
        reader = _decompressor().stream_reader(data)
        n = 0
        while n < want:
            got = reader.readinto(out[n:want])
            if not got:
                break
            n += got
        if declared >= 0 and n != declared:
            raise IntegrityError(f"blob decompresses to {n} bytes, not the {declared} it declares")
        if declared < 0 and n == len(out) and reader.read(1):
            raise IntegrityError(f"blob decompresses to more than the {len(out)} bytes allowed")
        return n
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"blob does not decompress: {exc}") from exc
