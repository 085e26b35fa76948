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
