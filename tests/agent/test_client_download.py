"""The agent's DownloadResponse parser must read exactly what protobuf's parser reads (protocol v1
is unchanged; the coordinator's prebuilt responses and any conforming sender are both read)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.client import decode_download
from core.errors import IntegrityError
from protos.clawback.v1 import agent_pb2

blob_data = st.builds(
    agent_pb2.BlobData,
    id=st.binary(max_size=40),
    type=st.sampled_from([0, 1, 2]),
    envelope=st.binary(max_size=3000),
    error=st.text(max_size=30),
)


def expected(msg: agent_pb2.DownloadResponse) -> list[tuple[bytes, int, bytes | None, str]]:
    """What decode_download promises, read through the generated parser."""
    return [(b.id, b.type, None if b.error else b.envelope, b.error) for b in msg.blobs]


def decoded(raw: bytes) -> list[tuple[bytes, int, bytes | None, str]]:
    return [(i, t, None if e is None else bytes(e), err) for i, t, e, err in decode_download(raw)]


@settings(max_examples=300, deadline=None)
@given(blobs=st.lists(blob_data, max_size=8))
def test_decode_download_equals_protobuf(blobs: list[agent_pb2.BlobData]) -> None:
    msg = agent_pb2.DownloadResponse(blobs=blobs)
    raw = msg.SerializeToString()
    assert decoded(raw) == expected(agent_pb2.DownloadResponse.FromString(raw))


def test_envelopes_are_views_into_the_message() -> None:
    raw = agent_pb2.DownloadResponse(
        blobs=[agent_pb2.BlobData(id=b"i" * 32, type=1, envelope=b"e" * 5_000_000)]
    ).SerializeToString()
    [(bid, btype, env, err)] = decode_download(raw)
    assert isinstance(env, memoryview) and env.obj is raw
    assert (bid, btype, bytes(env), err) == (b"i" * 32, 1, b"e" * 5_000_000, "")


def test_field_order_repeats_and_unknown_fields_as_protobuf_reads_them() -> None:
    # BlobData fields out of order, a scalar repeated (the last wins), and unknown fields of
    # every wire type, in BlobData and in DownloadResponse.
    inner = (
        b"\x1a\x03env"  # envelope
        + b"\x10\x01"  # type 1
        + b"\x0a\x02id"  # id
        + b"\x10\x02"  # type 2: wins
        + b"\x28\x96\x01"  # field 5, varint
        + b"\x31"
        + b"\0" * 8  # field 6, 64-bit
        + b"\x3a\x02zz"  # field 7, length-delimited
        + b"\x45"
        + b"\0" * 4  # field 8, 32-bit
    )
    raw = b"\x10\x07" + b"\x0a" + bytes([len(inner)]) + inner + b"\x1a\x01x"
    assert decoded(raw) == expected(agent_pb2.DownloadResponse.FromString(raw))
    assert decoded(raw) == [(b"id", 2, b"env", "")]


@pytest.mark.parametrize(
    "raw",
    [
        b"\x0a\x05\x0a\x02id",  # BlobData longer than the message
        b"\x0a\x04\x0a\x05abc",  # a field longer than its BlobData
        b"\x0a\x02\x10",  # a varint cut short
        b"\x0a\x02\x22\x01",  # error string cut short
        b"\x0a\x03\x22\x01\xff",  # error string not UTF-8
        b"\x0b",  # wire type 3 (groups) is not used by clawback
    ],
)
def test_malformed_responses_are_integrity_errors(raw: bytes) -> None:
    with pytest.raises(Exception):  # noqa: B017 - protobuf agrees that these are malformed
        agent_pb2.DownloadResponse.FromString(raw)
    with pytest.raises(IntegrityError, match="malformed DownloadResponse"):
        decode_download(raw)
