"""Chunking: registered parameters, stream cuts equal whole-buffer cuts, sizes within bounds."""

from __future__ import annotations

import dataclasses
import os
import random
import tempfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.chunker import CHUNKERS, Chunker, ChunkPolicy, _BlockPool, params
from core.errors import ConfigError
from core.format import DEFAULT_PAGED_FILES, DEFAULT_PAGED_FORMATS, RepoConfig


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


@pytest.mark.parametrize("size", [0, 1, 65_535, 65_536, 65_537, 4 * 2**20, 9 * 2**20 + 123])
def test_fixed_grid_cuts_every_64_kib_whatever_the_content(size: int) -> None:
    c = Chunker(params("fixed-64k"))
    data = random.Random(size).randbytes(size)
    whole, rest = divmod(size, 65_536)
    want = [65_536] * whole + ([rest] if rest else [])
    assert [ln for _, ln in c.cut(data)] == want
    # Streamed in 4 MiB blocks, it cuts the same; the chunks hold the file's bytes.
    chunks = _chunks(c, data)
    assert [len(v) for v in chunks] == want
    assert b"".join(chunks) == data


def test_fixed_grid_moves_with_nothing_but_the_changed_page() -> None:
    """What the grid is for: a page rewritten in place changes exactly one chunk."""
    c = Chunker(params("fixed-64k"))
    before = bytearray(random.Random(5).randbytes(3 * 2**20))
    after = bytearray(before)
    after[1_000_000 : 1_000_000 + 8192] = os.urandom(8192)  # one 8 KiB page
    old = [bytes(v) for v in _chunks(c, bytes(before))]
    new = [bytes(v) for v in _chunks(c, bytes(after))]
    assert len(old) == len(new) and sum(a != b for a, b in zip(old, new, strict=True)) == 1


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
    rnd = random.Random(11)
    files = [rnd.randbytes(5 * 1024 * 1024) for _ in range(3)]
    held: list[list[memoryview]] = []
    for data in files:  # all views of all three files held at once: no block is written twice
        held.append(_chunks(c, data))
    for data, views in zip(files, held, strict=True):
        assert b"".join(bytes(v) for v in views) == data
    created = c.pool.created
    # A 5 MiB file takes 3 or 4 blocks of 2 MiB (where the carried tails fall); keep every
    # released block so that reuse, not the idle trim, is what this measures.
    c.pool.idle = created
    del held, views
    for data in files:  # released: the same blocks serve the next files
        assert b"".join(bytes(v) for v in _chunks(c, data)) == data
    assert c.pool.created == created
    assert len(c.pool) <= created


def test_a_pool_unmaps_free_blocks_beyond_its_idle_allowance() -> None:
    pool = _BlockPool(idle=1)
    held = [memoryview(pool.take(4096)) for _ in range(4)]
    assert pool.created == 4 and len(pool) == 4
    del held
    block = pool.take(4096)  # one reused, one kept idle, two unmapped
    assert pool.created == 4 and len(pool) == 2
    view = memoryview(block)  # a block with a live view is never handed out again
    del block
    assert pool.take(4096) is not view.obj and pool.take(4096) is not view.obj
    view.release()


def test_files_read_whole_keep_their_bytes_and_take_no_pool_block() -> None:
    c = Chunker(params("fastcdc-256k"))
    rnd = random.Random(3)
    datas = [rnd.randbytes(rnd.randrange(0, 300_000)) for _ in range(60)]
    held = [_chunks(c, data) for data in datas]
    assert c.pool.created == 0
    for data, views in zip(datas, held, strict=True):
        assert b"".join(bytes(v) for v in views) == data
        assert [len(v) for v in views] == ([ln for _, ln in c.cut(data)] if data else [])


def _policy(*patterns: str) -> ChunkPolicy:
    return ChunkPolicy(
        RepoConfig(repo_id="ab" * 16, paged_chunker="fixed-64k", paged_files=patterns)
    )


@pytest.mark.parametrize(
    ("rel", "paged"),
    [
        (b"var/lib/app/main.db", True),  # a name pattern matches in any directory
        (b"main.db", True),
        (b"var/lib/app/main.db-journal", False),
        (b"var/lib/app/main.dbx", False),
        (b"srv/MAIN.DB", False),  # case-sensitive, as file names are
        (b"var/lib/mysql/ibdata1", True),
        (b"pg/base/16384/1259", True),  # a path pattern: from the root, '*' across '/'
        (b"base/1/2", True),  # at the root: the leading '/' is implied
        (b"pg/base/16384/PG_VERSION", False),
        (b"caf\xe9/n\xffme.db", True),  # names that are not UTF-8
        (b"a.sqlite3/notes.txt", False),  # a directory's name is not the file's
    ],
)
def test_policy_cuts_matching_files_on_the_paged_chunker(rel: bytes, paged: bool) -> None:
    policy = _policy(*DEFAULT_PAGED_FILES)
    assert policy.for_file(rel).params.name == ("fixed-64k" if paged else "fastcdc-256k")
    assert policy.max_size == CHUNKERS["fastcdc-256k"].max_size


def test_policy_without_paged_files_cuts_everything_alike() -> None:
    for cfg in (
        RepoConfig(repo_id="ab" * 16),  # a config from before paged files
        RepoConfig(repo_id="ab" * 16, paged_chunker="fixed-64k"),  # a chunker but no patterns
    ):
        policy = ChunkPolicy(cfg)
        assert policy.paged is None and policy.for_file(b"x.db") is policy.default


def test_policy_patterns_are_fnmatch_not_regular_expressions() -> None:
    policy = _policy("data.(x)", "[ab]?.pg", "lit+ral")
    assert policy.for_file(b"d/data.(x)").params.fixed
    assert policy.for_file(b"a1.pg").params.fixed and not policy.for_file(b"c1.pg").params.fixed
    assert policy.for_file(b"lit+ral").params.fixed and not policy.for_file(b"littral").params.fixed


def test_policy_refuses_a_chunker_it_does_not_know() -> None:
    with pytest.raises(ConfigError, match="unknown chunker 'fixed-3k'"):
        ChunkPolicy(RepoConfig(repo_id="ab" * 16, paged_chunker="fixed-3k", paged_files=("*",)))


SQLITE_HEAD = b"SQLite format 3\x00" + bytes([0x10, 0x00])  # and its page size, 4096
BBOLT_HEAD = bytes(16) + b"\xed\xda\x0c\xed\x02\x00\x00\x00" + (4096).to_bytes(4, "little")


@pytest.mark.parametrize(
    ("name", "head", "size", "formats", "paged"),
    [
        (b"state", SQLITE_HEAD, 200_000, DEFAULT_PAGED_FORMATS, True),  # SQLite under any name
        (b"member/snap/db", BBOLT_HEAD, 200_000, DEFAULT_PAGED_FORMATS, True),  # etcd's bbolt
        (b"state", SQLITE_HEAD, 200_000, ("bbolt",), False),  # only the formats named
        (b"state", SQLITE_HEAD, 200_000, (), False),  # names only
        # One chunk either way: a file of at most one paged chunk is not looked into.
        (b"state", SQLITE_HEAD, 65_536, DEFAULT_PAGED_FORMATS, False),
        (b"state", SQLITE_HEAD, 65_537, DEFAULT_PAGED_FORMATS, True),
        (b"state", b"SQLite format 2\x00", 200_000, DEFAULT_PAGED_FORMATS, False),
        (b"db", bytes(16) + b"\xed\xda\x0c\xed\x01\x00\x00\x00", 200_000, ("bbolt",), False),
        (b"x.db", b"plain text", 200_000, (), True),  # the name decides first
    ],
)
def test_policy_recognises_paged_formats_by_their_first_bytes(
    name: bytes, head: bytes, size: int, formats: tuple[str, ...], paged: bool
) -> None:
    policy = ChunkPolicy(
        RepoConfig(
            repo_id="ab" * 16,
            paged_chunker="fixed-64k",
            paged_files=("*.db",),
            paged_formats=formats,
        )
    )
    with tempfile.TemporaryFile() as f:
        f.write(head + random.Random(size).randbytes(size - len(head)))
        f.flush()
        got = policy.for_fd(name, f.fileno(), size)
        assert got is (policy.paged if paged else policy.default)
        assert f.tell() == size  # looked at with pread: the offset is not moved


def test_policy_with_formats_alone_and_with_formats_it_does_not_know() -> None:
    cfg = RepoConfig(repo_id="ab" * 16, paged_chunker="fixed-64k", paged_formats=("sqlite3",))
    policy = ChunkPolicy(cfg)
    assert policy.paged is not None and policy.for_file(b"x.db") is policy.default
    with tempfile.TemporaryFile() as f:
        f.write(SQLITE_HEAD + bytes(100_000))
        f.flush()
        assert policy.for_fd(b"x", f.fileno(), 100_000 + len(SQLITE_HEAD)) is policy.paged
    with pytest.raises(ConfigError, match=r"unknown paged format 'lmdb'.*upgrade the agent"):
        ChunkPolicy(dataclasses.replace(cfg, paged_formats=("sqlite3", "lmdb")))
    # Without a paged chunker the formats mean nothing (and nothing is read).
    none = ChunkPolicy(RepoConfig(repo_id="ab" * 16, paged_formats=("sqlite3",)))
    assert none.paged is None and none.for_fd(b"x", -1, 10**9) is none.default


def test_policy_chunkers_share_one_pool_of_read_blocks() -> None:
    """Each pool keeps idle blocks of its own: two would hold 8 MiB more at the peak."""
    for main in ("fastcdc-256k", "fastcdc-1m"):
        cfg = RepoConfig(
            repo_id="ab" * 16, chunker=main, paged_chunker="fixed-64k", paged_files=("*.db",)
        )
        policy = ChunkPolicy(cfg)
        assert policy.paged is not None and policy.paged.pool is policy.default.pool
        assert policy.paged.read_size == policy.default.read_size
        data = random.Random(3).randbytes(10 * 2**20 + 5)
        assert [len(v) for v in _chunks(policy.paged, data)] == [65_536] * 160 + [5]
        assert b"".join(_chunks(policy.default, data)) == data
        assert len(policy.default.pool) <= 3  # the blocks both read into, reused
