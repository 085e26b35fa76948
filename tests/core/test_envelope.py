"""The blob envelope: round trips, layout, and refusal of every kind of tampering."""

from __future__ import annotations

import os
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.compression import Compressor
from core.envelope import (
    HEADER_SIZE,
    OVERHEAD,
    Prepared,
    SealingKey,
    key_id_of,
    open_,
    seal,
    seal_into,
)
from core.errors import IntegrityError, KeyMaterialError

KEY = SealingKey(b"k" * 16, os.urandom(32))
ZSTD = Compressor("zstd-3")


def _lookup(key_id: bytes) -> SealingKey:
    if key_id != KEY.key_id:
        raise KeyMaterialError("unknown key")
    return KEY


@settings(max_examples=50, deadline=None)
@given(data=st.binary(max_size=50_000), btype=st.sampled_from([1, 2]), compress=st.booleans())
def test_round_trip(data: bytes, btype: int, compress: bool) -> None:
    bid = os.urandom(32)
    env = seal(KEY, bid, btype, data, ZSTD if compress else None)
    assert open_(_lookup, bid, btype, env) == data
    assert key_id_of(env) == KEY.key_id
    assert env[0] == 1 and env[2] == btype and env[3] == 1


def test_compressible_data_is_compressed_and_random_is_not() -> None:
    bid = os.urandom(32)
    text = b"the same line again\n" * 5000
    assert len(seal(KEY, bid, 1, text, ZSTD)) < len(text) // 10
    rnd = os.urandom(100_000)
    env = seal(KEY, bid, 1, rnd, ZSTD)
    assert len(env) == len(rnd) + OVERHEAD and env[1] == 0


@pytest.mark.parametrize("where", [0, 1, 2, 3, 5, 25, HEADER_SIZE, HEADER_SIZE + 10, -1])
def test_any_flipped_byte_is_refused(where: int) -> None:
    bid = os.urandom(32)
    env = bytearray(seal(KEY, bid, 1, b"payload" * 100, ZSTD))
    env[where] ^= 0x01
    with pytest.raises((IntegrityError, KeyMaterialError)):
        open_(_lookup, bid, 1, bytes(env))


def test_envelope_served_under_another_id_or_type_is_refused() -> None:
    bid = os.urandom(32)
    env = seal(KEY, bid, 1, b"payload", None)
    with pytest.raises(IntegrityError, match="authentication failed"):
        open_(_lookup, os.urandom(32), 1, env)
    with pytest.raises(IntegrityError, match="type"):
        open_(_lookup, bid, 2, env)


def test_wrong_key_and_truncation() -> None:
    bid = os.urandom(32)
    env = seal(KEY, bid, 1, b"payload", None)
    other = SealingKey(KEY.key_id, os.urandom(32))
    with pytest.raises(IntegrityError, match="another key"):
        open_(lambda _k: other, bid, 1, env)
    with pytest.raises(IntegrityError, match="truncated"):
        open_(_lookup, bid, 1, env[:40])


def test_decompression_is_bounded() -> None:
    bid = os.urandom(32)
    env = seal(KEY, bid, 1, b"\0" * 2_000_000, ZSTD)
    with pytest.raises(IntegrityError, match="more than the"):
        open_(_lookup, bid, 1, env, max_size=1_000_000)


@settings(max_examples=50, deadline=None)
@given(data=st.binary(max_size=50_000), compress=st.booleans(), slack=st.integers(0, 100))
def test_open_into_equals_open(data: bytes, compress: bool, slack: int) -> None:
    from core.envelope import open_into

    bid = os.urandom(32)
    env = seal(KEY, bid, 1, data, ZSTD if compress else None)
    out = bytearray(len(data) + slack)
    n = open_into(_lookup, bid, 1, memoryview(env), memoryview(out))
    assert bytes(out[:n]) == data == open_(_lookup, bid, 1, env)


def test_open_into_refuses_what_open_refuses_and_what_does_not_fit() -> None:
    from core.envelope import open_into

    bid = os.urandom(32)
    out = memoryview(bytearray(1 << 20))
    for compressor in (ZSTD, None):
        env = seal(KEY, bid, 1, b"payload " * 1000, compressor)
        with pytest.raises(IntegrityError, match="more than the"):
            open_into(_lookup, bid, 1, env, out[:7999])
        bad = bytearray(env)
        bad[-1] ^= 1
        with pytest.raises(IntegrityError, match="authentication failed"):
            open_into(_lookup, bid, 1, bytes(bad), out)
        with pytest.raises(IntegrityError, match="type"):
            open_into(_lookup, bid, 2, env, out)
        with pytest.raises(IntegrityError, match="truncated"):
            open_into(_lookup, bid, 1, env[:40], out)


def test_decompress_into_frames_without_a_declared_size() -> None:
    import zstandard

    from core.compression import decompress_into

    data = b"abc" * 10_000
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(data)
    out = memoryview(bytearray(len(data) + 10))
    assert bytes(out[: decompress_into(frame, out)]) == data
    with pytest.raises(IntegrityError, match="more than the"):
        decompress_into(frame, out[: len(data) - 1])
    with pytest.raises(IntegrityError, match="does not decompress"):
        decompress_into(b"not zstd at all", out)


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=5000), btype=st.sampled_from([1, 2]), compress=st.booleans())
def test_seal_into_makes_what_seal_makes(data: bytes, btype: int, compress: bool) -> None:
    comp = ZSTD if compress else None
    bid = os.urandom(32)
    blob = Prepared(KEY, bid, btype, memoryview(data), comp)
    buf = bytearray(blob.size + 10)
    seal_into(KEY, blob, memoryview(buf)[3 : 3 + blob.size])
    env = bytes(buf[3 : 3 + blob.size])
    assert buf[:3] == b"\0\0\0" and buf[3 + blob.size :] == b"\0" * 7  # exactly its bytes
    assert open_(_lookup, bid, btype, env) == data
    sealed = seal(KEY, bid, btype, data, comp)
    assert len(env) == len(sealed) and env[:20] == sealed[:20]  # same header but the nonce


def _nonce(envelope: bytes) -> bytes:
    return envelope[HEADER_SIZE - 12 : HEADER_SIZE]


def test_nonces_are_never_repeated_across_pools_and_threads() -> None:
    """Nonces come from per-thread pools of the OS's CSPRNG: none repeats, within a pool,
    across refills, or between threads sealing at once."""
    seen: list[list[bytes]] = [[] for _ in range(3)]

    def seal_many(i: int) -> None:
        for _ in range(1000):  # ~6 pools each
            seen[i].append(_nonce(seal(KEY, b"i" * 32, 1, b"x", None)))
            seen[i].append(_nonce(Prepared(KEY, b"i" * 32, 1, b"x", None).header))

    threads = [threading.Thread(target=seal_many, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [n for s in seen for n in s]
    assert len(every) == 6000 and len(set(every)) == 6000


def test_a_forked_child_never_reuses_its_parents_nonces() -> None:
    """A child inherits the parent's pool; it must draw its own, or it would seal its first
    blobs with the nonces the parent is about to use."""
    seal(KEY, b"i" * 32, 1, b"x", None)  # the pool is drawn and partly used
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next nonces, to the parent
        try:
            os.write(w, b"".join(_nonce(seal(KEY, b"i" * 32, 1, b"x", None)) for _ in range(5)))
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        child = f.read()
    os.waitpid(pid, 0)
    parent = b"".join(_nonce(seal(KEY, b"i" * 32, 1, b"x", None)) for _ in range(5))
    assert len(child) == 60
    assert {child[i : i + 12] for i in range(0, 60, 12)}.isdisjoint(
        {parent[i : i + 12] for i in range(0, 60, 12)}
    )
