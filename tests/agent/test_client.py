"""The agent's hand-built UploadRequest encoding must parse as exactly the message protobuf would build."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.client import UploadBuilder, encode_upload, job_field
from agent.repo import Blob
from protos.clawback.v1 import agent_pb2

blobs = st.lists(
    st.builds(
        Blob,
        id=st.binary(min_size=32, max_size=32),
        type=st.sampled_from([1, 2]),
        envelope=st.binary(min_size=0, max_size=3000),
    ),
    max_size=8,
)


@settings(max_examples=200, deadline=None)
@given(job_id=st.text(max_size=40), batch=blobs)
def test_encode_upload_equals_protobuf(job_id: str, batch: list[Blob]) -> None:
    expected = agent_pb2.UploadRequest(
        job_id=job_id,
        blobs=[agent_pb2.BlobData(id=b.id, type=b.type, envelope=b.envelope) for b in batch],  # type: ignore[arg-type]
    )
    encoded = encode_upload(job_id, batch)
    assert agent_pb2.UploadRequest.FromString(encoded) == expected
    assert encoded == expected.SerializeToString(deterministic=True)


def test_large_envelope_lengths_use_multi_byte_varints() -> None:
    big = Blob(b"\x01" * 32, 1, b"x" * 5_000_000)
    msg = agent_pb2.UploadRequest.FromString(encode_upload("", [big]))
    assert msg.blobs[0].envelope == big.envelope and msg.job_id == ""


@settings(max_examples=200, deadline=None)
@given(job_id=st.text(max_size=40), batch=blobs)
def test_builder_writes_what_encode_upload_writes(job_id: str, batch: list[Blob]) -> None:
    """Envelopes written into an UploadBuilder (as the backup seals them) make the same bytes."""
    b = UploadBuilder(sum(len(x.envelope or b"") + 64 for x in batch) + 1)
    for x in batch:
        env = x.envelope or b""
        if not env:
            continue  # the backup never sends an empty envelope
        b.reserve(x.id, x.type, len(env))[:] = env
    sent = [x for x in batch if x.envelope]
    assert job_field(job_id) + b.take() == encode_upload(job_id, sent)
    assert b.fill == 0 and b.take() == b""


def test_builder_refuses_a_blob_that_does_not_fit() -> None:
    b = UploadBuilder(100)
    try:
        b.reserve(b"\x01" * 32, 1, 80)
    except ValueError as exc:
        assert "full" in str(exc)
    else:
        raise AssertionError("no error")
    assert b.fill == 0
