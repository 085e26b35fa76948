"""Chunking: registered parameters, stream cuts equal whole-buffer cuts, sizes within bounds."""

from __future__ import annotations

import os
import random
import tempfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.chunker import CHUNKERS, Chunker, params
from core.errors import ConfigError


def _stream_cuts(c: Chunker, data: bytes) -> list[int]:
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.flush()
        f.seek(0)
        return [len(v) for v in c.chunks_of_fd(f.fileno(), len(data))]


def test_default_chunker_averages_about_one_mib() -> None:
    c = Chunker(params("fastcdc-1m"))
    data = random.Random(1).randbytes(48 * 1024 * 1024)
    sizes = [ln for _, ln in c.cut(data)]
    p = CHUNKERS["fastcdc-1m"]
    assert all(p.min_size <= s <= p.max_size for s in sizes[:-1])
    assert 0.7 * 2**20 < sum(sizes) / len(sizes) < 1.4 * 2**20


@settings(max_examples=25, deadline=None)
@given(size=st.integers(0, 3 * 1024 * 1024), seed=st.integers(0, 2**32))
def test_streamed_cuts_equal_whole_buffer_cuts(size: int, seed: int) -> None:
    c = Chunker(params("fastcdc-256k"))
    c.read_size = 2 * c.params.max_size  # force many carried tails
    data = random.Random(seed).randbytes(size)
    assert (
        _stream_cuts(c, data) == [ln for _, ln in c.cut(data)]
        if data
        else _stream_cuts(c, data) == []
    )


def test_large_file_cut_identically_when_streamed() -> None:
    c = Chunker(params("fastcdc-1m"))
    data = os.urandom(30 * 1024 * 1024)
    assert _stream_cuts(c, data) == [ln for _, ln in c.cut(data)]


def test_reading_stops_at_stat_size() -> None:
    c = Chunker(params("fastcdc-256k"))
    data = os.urandom(500_000)
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.flush()
        f.seek(0)
        assert sum(len(v) for v in c.chunks_of_fd(f.fileno(), 100_000)) == 100_000


def test_unknown_chunker_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown chunker"):
        params("rabin-9000")


def _chunks(c: Chunker, data: bytes) -> list[memoryview]:
    """The views of a file's chunks; they outlive the file (they point into the chunker's blocks)."""
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.flush()
        f.seek(0)
        return list(c.chunks_of_fd(f.fileno(), len(data)))


def test_views_stay_valid_while_held_and_blocks_are_reused_after() -> None:
    c = Chunker(params("fastcdc-256k"))
    c.read_size = 2 * c.params.max_size
    files = [os.urandom(5 * 1024 * 1024) for _ in range(3)]
    held: list[list[memoryview]] = []
    for data in files:  # all views of all three files held at once: no block is written twice
        held.append(_chunks(c, data))
    for data, views in zip(files, held, strict=True):
        assert b"".join(bytes(v) for v in views) == data
    created = c.pool.created
    del held, views
    for data in files:  # released: the same blocks serve the next files
        assert b"".join(bytes(v) for v in _chunks(c, data)) == data
    assert c.pool.created == created
    assert len(c.pool) <= created


def test_files_read_whole_keep_their_bytes_and_take_no_pool_block() -> None:
    c = Chunker(params("fastcdc-256k"))
    rnd = random.Random(3)
    datas = [rnd.randbytes(rnd.randrange(0, 300_000)) for _ in range(60)]
    held = [_chunks(c, data) for data in datas]
    assert c.pool.created == 0
    for data, views in zip(datas, held, strict=True):
        assert b"".join(bytes(v) for v in views) == data
        assert [len(v) for v in views] == ([ln for _, ln in c.cut(data)] if data else [])
