"""The agent's hand-built UploadRequest encoding (UploadBuilder) must be exactly what protobuf would build."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.client import UploadBuilder, job_field
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


def _built(job_id: str, batch: list[Blob]) -> bytes:
    """The message the backup sends for `batch`: envelopes written into an UploadBuilder."""
    b = UploadBuilder(sum(len(x.envelope or b"") + 64 for x in batch) + 1)
    for x in batch:
        env = x.envelope or b""
        b.reserve(x.id, x.type, len(env))[:] = env
    return job_field(job_id) + b.take()


@settings(max_examples=200, deadline=None)
@given(job_id=st.text(max_size=40), batch=blobs)
def test_builder_writes_what_protobuf_writes(job_id: str, batch: list[Blob]) -> None:
    batch = [x for x in batch if x.envelope]  # the backup never sends an empty envelope
    expected = agent_pb2.UploadRequest(
        job_id=job_id,
        blobs=[agent_pb2.BlobData(id=b.id, type=b.type, envelope=b.envelope) for b in batch],  # type: ignore[arg-type]
    )
    encoded = _built(job_id, batch)
    assert agent_pb2.UploadRequest.FromString(encoded) == expected
    assert encoded == expected.SerializeToString(deterministic=True)


def test_large_envelope_lengths_use_multi_byte_varints() -> None:
    big = Blob(b"\x01" * 32, 1, b"x" * 5_000_000)
    msg = agent_pb2.UploadRequest.FromString(_built("", [big]))
    assert msg.blobs[0].envelope == big.envelope and msg.job_id == ""


def test_builder_refuses_a_blob_that_does_not_fit() -> None:
    b = UploadBuilder(100)
    try:
        b.reserve(b"\x01" * 32, 1, 80)
    except ValueError as exc:
        assert "full" in str(exc)
    else:
        raise AssertionError("no error")
    assert b.fill == 0 and b.take() == b""
