"""Pack format tests: round trip, properties, damage, and the v1 and v2 golden fixtures (design.md §Packs)."""

from __future__ import annotations

import struct
from pathlib import Path

import blake3
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.pack import (
    PackEntry,
    PackWriter,
    encode_header,
    pack_id_from_path,
    pack_path,
    parse_pack_header,
    read_header,
    verify_pack,
)
from coordinator.storage import LocalBackend
from core.errors import IntegrityError

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "golden" / "pack-v1.bin"
GOLDEN_V2 = GOLDEN.with_name("pack-v2.bin")
GOLDEN_BLOBS = [
    (bytes([0x11]) * 32, 1, bytes(range(48))),
    (bytes([0x22]) * 32, 2, b"tree" * 25),
    (bytes([0x33]) * 32, 1, bytes(range(256)) * 2),
]


def write_pack(backend: LocalBackend, blobs: list[tuple[bytes, int, bytes]]) -> tuple[bytes, bytes]:
    writer = PackWriter(backend)
    for blob_id, btype, envelope in blobs:
        writer.add(blob_id, btype, envelope)
    result = writer.finish()
    return result.pack_id, backend.get(pack_path(result.pack_id))


def spec_pack(blobs: list[tuple[bytes, int, bytes]], version: int = 2) -> bytes:
    """The pack built straight from the grammar in design.md §Packs, independently of the writer."""
    body, entries, offset = b"", b"", 0
    for blob_id, btype, env in blobs:
        entries += blob_id + bytes([btype]) + b"\0" * 3
        entries += struct.pack("<QI", offset, len(env)) + blake3.blake3(env).digest()[:16]
        body += env
        offset += len(env)
    header = b"CBPH" + bytes([version, 0, 0, 0]) + struct.pack("<I", len(blobs)) + entries
    trailer = struct.pack("<I", len(header)) + blake3.blake3(header).digest() + b"CBPKv1\0\0"
    return body + header + trailer


def test_round_trip(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path)
    blobs = [(bytes([i]) * 32, 1 + i % 2, bytes([i]) * (48 + i * 7)) for i in range(20)]
    pack_id, data = write_pack(backend, blobs)
    header_len = 12 + 64 * len(blobs)
    # design.md §Packs: a version 2 pack is named by the BLAKE3 of its header.
    assert pack_id == blake3.blake3(data[-44 - header_len : -44]).digest() == data[-40:-8]
    assert pack_id_from_path(pack_path(pack_id)) == pack_id
    entries = read_header(backend, pack_path(pack_id))
    assert [(e.id, e.type) for e in entries] == [(b[0], b[1]) for b in blobs]
    for e, (_, _, env) in zip(entries, blobs, strict=True):
        assert data[e.offset : e.offset + e.length] == env
    assert list(verify_pack(backend, pack_id)) == []
    assert list(backend.staging_dir().iterdir()) == []


def test_empty_pack_and_abort(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path)
    pack_id, data = write_pack(backend, [])
    assert parse_pack_header(data, len(data)) == []
    writer = PackWriter(backend)
    writer.add(b"\1" * 32, 1, b"x" * 100)
    assert (writer.count, writer.size) == (1, 100)
    writer.abort()
    writer.abort()
    assert list(backend.staging_dir().iterdir()) == []
    assert list(backend.list("data/")) == [pack_path(pack_id)]


@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.tuples(
            st.binary(min_size=32, max_size=32),
            st.sampled_from([1, 2]),
            st.binary(min_size=48, max_size=3000),
        ),
        max_size=30,
    )
)
def test_writer_matches_grammar(tmp_path: Path, blobs: list[tuple[bytes, int, bytes]]) -> None:
    backend = LocalBackend(tmp_path)
    _, data = write_pack(backend, blobs)
    assert data == spec_pack(blobs)
    entries = parse_pack_header(data, len(data))
    assert [(e.id, e.type, data[e.offset : e.offset + e.length]) for e in entries] == blobs
    # The tail alone (header + trailer) parses too: that is what read_header fetches.
    header_len = 12 + 64 * len(blobs)
    assert parse_pack_header(data[-(header_len + 44) :]) == entries


def good_pack() -> bytes:
    return spec_pack(GOLDEN_BLOBS)


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda d: d[:-1], "trailer magic"),
        (lambda d: d[:30], "header length|too short|trailer"),
        (lambda d: b"", "too short"),
        (lambda d: d[:-44] + struct.pack("<I", 12 + 64 * 10000) + d[-40:], "exceeds"),
        (lambda d: d[:-44] + struct.pack("<I", 13) + d[-40:], "invalid header length"),
        (lambda d: d[:-12] + bytes([d[-12] ^ 1]) + d[-11:], "header hash"),
        (lambda d: d[: -44 - 3] + bytes([d[-47] ^ 1]) + d[-46:], "header hash"),
    ],
)
def test_damaged_header_raises(damage, match: str) -> None:  # type: ignore[no-untyped-def]
    data = good_pack()
    damaged = damage(data)
    with pytest.raises(IntegrityError, match=match):
        parse_pack_header(damaged, len(damaged))


def test_semantic_header_errors() -> None:
    def pack_with(header: bytes, body: bytes = b"") -> bytes:
        trailer = struct.pack("<I", len(header)) + blake3.blake3(header).digest() + b"CBPKv1\0\0"
        return body + header + trailer

    entry = PackEntry(b"\1" * 32, 1, 0, 48, b"\0" * 16)
    valid = encode_header([entry])[:-44]
    cases = {
        "header magic": b"XXXX" + valid[4:],
        "version 3": valid[:4] + b"\x03" + valid[5:],
        "version 0": valid[:4] + b"\x00" + valid[5:],
        "does not hold": valid[:8] + struct.pack("<I", 2) + valid[12:],
        "invalid blob type": valid[: 12 + 32] + b"\x07" + valid[12 + 33 :],
        "offset": encode_header([entry._replace(offset=5)])[:-44],
    }
    for match, header in cases.items():
        data = pack_with(header, b"e" * 48)
        with pytest.raises(IntegrityError, match=match):
            parse_pack_header(data, len(data))
    # Entries must cover the envelope area exactly.
    data = pack_with(valid, b"e" * 60)
    with pytest.raises(IntegrityError, match="envelopes end at 48"):
        parse_pack_header(data, len(data))


def test_golden_pack_v1(tmp_path: Path) -> None:
    """The v1 fixture (named by the hash of the whole file) stays readable and verifiable."""
    assert GOLDEN.exists(), f"golden fixture {GOLDEN} is missing"
    golden = GOLDEN.read_bytes()
    assert golden == spec_pack(GOLDEN_BLOBS, version=1)
    entries = parse_pack_header(golden, len(golden))
    assert [(e.id, e.type, golden[e.offset : e.offset + e.length]) for e in entries] == GOLDEN_BLOBS
    assert [e.checksum for e in entries] == [
        blake3.blake3(b[2]).digest()[:16] for b in GOLDEN_BLOBS
    ]
    assert encode_header(entries, version=1) == golden[entries[-1].offset + entries[-1].length :]
    backend = LocalBackend(tmp_path)
    pack_id = blake3.blake3(golden).digest()
    backend.put(pack_path(pack_id), golden)
    assert list(verify_pack(backend, pack_id)) == []
    # A flipped envelope byte: its checksum and the file's name both tell.
    damaged = bytearray(golden)
    damaged[5] ^= 1
    backend.put(pack_path(pack_id), bytes(damaged))
    problems = [p.message for p in verify_pack(backend, pack_id)]
    assert len(problems) == 2
    assert "checksum mismatch" in problems[0] and "does not match its name" in problems[1]


def test_golden_pack_v2(tmp_path: Path) -> None:
    """The writer produces the v2 fixture byte for byte, named by its header hash."""
    assert GOLDEN_V2.exists(), f"golden fixture {GOLDEN_V2} is missing"
    golden = GOLDEN_V2.read_bytes()
    assert golden == spec_pack(GOLDEN_BLOBS)
    backend = LocalBackend(tmp_path)
    pack_id, written = write_pack(backend, GOLDEN_BLOBS)
    assert written == golden
    assert pack_id.hex() == "6417e62b3eb6277d65bbc6aca28df41fbba60c3fca7ece83bf8e36645bcd50c3"
    assert list(verify_pack(backend, pack_id)) == []


def test_v2_pack_under_another_name_is_found(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path)
    pack_id, data = write_pack(backend, GOLDEN_BLOBS)
    other = blake3.blake3(b"another name").digest()
    backend.put(pack_path(other), data)
    assert [p.message for p in verify_pack(backend, other)] == [
        f"pack {other.hex()}: header does not match its name"
    ]
    # A flipped envelope byte of a v2 pack: its checksum tells (the header, and so the name,
    # covers every checksum).
    damaged = bytearray(data)
    damaged[5] ^= 1
    backend.put(pack_path(pack_id), bytes(damaged))
    problems = list(verify_pack(backend, pack_id))
    assert [(p.blob, "checksum mismatch" in p.message) for p in problems] == [
        (GOLDEN_BLOBS[0][0], True)
    ]
