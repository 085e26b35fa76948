"""Protocol plumbing: id lists, bitmaps and the error <-> status round trip."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core import errors
from core.wire import (
    error_from_rpc,
    make_bitmap,
    pack_ids,
    parse_upload,
    read_bitmap,
    status_for,
    unpack_ids,
    varint,
)
from protos.clawback.v1 import agent_pb2


def test_id_lists() -> None:
    ids = [bytes([i]) * 32 for i in range(5)]
    assert unpack_ids(pack_ids(ids)) == ids
    with pytest.raises(errors.UsageError, match="multiple of 32"):
        unpack_ids(b"x" * 33)
    with pytest.raises(errors.UsageError, match="limit"):
        unpack_ids(b"x" * 32 * 3, limit=2)


def test_bitmap_round_trip() -> None:
    flags = [i % 3 == 0 for i in range(37)]
    assert read_bitmap(make_bitmap(flags), 37) == flags
    with pytest.raises(errors.TransportError):
        read_bitmap(b"", 3)


class _Rpc(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._c, self._d = code, details

    def code(self) -> grpc.StatusCode:
        return self._c

    def details(self) -> str:
        return self._d


@pytest.mark.parametrize(
    "exc",
    [
        errors.NotFound("no snapshot"),
        errors.ResourceExhausted("disk full"),
        errors.KeyMaterialError("wrong key"),
        errors.RepositoryMissing("no repo"),
        errors.IntegrityError("bad"),
        errors.PermissionDenied("revoked"),
    ],
)
def test_errors_survive_the_wire(exc: errors.ClawbackError) -> None:
    code, detail = status_for(exc)
    back = error_from_rpc(_Rpc(code, detail))
    assert type(back) is type(exc) and str(exc) in str(back)
    assert back.exit_code == exc.exit_code


def test_plain_unavailable_names_the_coordinator() -> None:
    e = error_from_rpc(_Rpc(grpc.StatusCode.UNAVAILABLE, "failed to connect"))
    assert isinstance(e, errors.Unavailable) and "unreachable" in str(e)


@settings(max_examples=200, deadline=None)
@given(
    job_id=st.text(max_size=40),
    blobs=st.lists(
        st.tuples(
            st.binary(max_size=40),
            st.integers(min_value=0, max_value=3),
            st.binary(max_size=300),
            st.text(max_size=10),
        ),
        max_size=6,
    ),
)
def test_parse_upload_reads_what_protobuf_reads(
    job_id: str, blobs: list[tuple[bytes, int, bytes, str]]
) -> None:
    msg = agent_pb2.UploadRequest(
        job_id=job_id,
        blobs=[
            agent_pb2.BlobData(id=i, type=t, envelope=e, error=err)  # type: ignore[arg-type]
            for i, t, e, err in blobs
        ],
    ).SerializeToString()
    got_job, got = parse_upload(msg)
    assert got_job == job_id
    assert [(i, t, bytes(e)) for i, t, e in got] == [(i, t, e) for i, t, e, _ in blobs]


def test_parse_upload_skips_unknown_fields_and_refuses_truncation() -> None:
    body = agent_pb2.BlobData(id=b"i" * 32, type=1, envelope=b"e" * 100).SerializeToString()
    # field 9 (varint) and field 10 (fixed64) around the blob: unknown, skipped
    msg = b"\x48\x05" + b"\x12" + varint(len(body)) + body + b"\x51" + b"\x00" * 8
    assert [(i, t, bytes(e)) for i, t, e in parse_upload(msg)[1]] == [(b"i" * 32, 1, b"e" * 100)]
    for bad in (b"\x12", msg[:3], msg[:10], msg[:-3], b"\x12\xff"):
        with pytest.raises(errors.UsageError, match="malformed"):
            parse_upload(bad)


def test_varint_is_protobufs_encoding() -> None:
    from google.protobuf.internal.encoder import _VarintBytes

    for n in (0, 1, 127, 128, 300, 16383, 16384, 2**21, 2**32 + 5, 2**63 - 1):
        assert varint(n) == _VarintBytes(n), n
