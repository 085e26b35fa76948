"""DownloadBlobs/ReadBlobs responses: prebuilt wire bytes equal to protobuf's, batching and
read-ahead in `_stream_blobs`, and pack reads through one open file (direct or buffered)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator import server
from coordinator.pack import PackWriter, pack_path, read_envelopes, read_header, verify_pack
from coordinator.storage import DIRECT_MIN, LocalBackend
from protos.clawback.v1 import agent_pb2

blob = st.tuples(
    st.binary(max_size=40),
    st.sampled_from([0, 1, 2]),
    st.one_of(st.none(), st.binary(max_size=3000)),
    st.text(max_size=30),
)


@settings(max_examples=300, deadline=None)
@given(blobs=st.lists(blob, max_size=8))
def test_encode_download_equals_protobuf(blobs: list[tuple[bytes, int, bytes | None, str]]) -> None:
    msg = agent_pb2.DownloadResponse(
        blobs=[
            agent_pb2.BlobData(id=i, type=t, error=err or "unreadable")  # type: ignore[arg-type]
            if env is None
            else agent_pb2.BlobData(id=i, type=t, envelope=env)  # type: ignore[arg-type]
            for i, t, env, err in blobs
        ]
    )
    assert server.encode_download(blobs) == msg.SerializeToString(deterministic=True)


class FakeStore:
    def __init__(self, blobs: list[tuple[bytes, int, bytes | None, str]]) -> None:
        self.blobs = blobs

    def read_blobs(
        self, ids: list[bytes], *, verify: bool = True
    ) -> Iterator[tuple[bytes, int, bytes | None, str]]:
        yield from self.blobs


async def test_stream_blobs_sends_every_blob_once_in_bounded_messages(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(server, "DOWNLOAD_BATCH", 10_000)
    blobs = [(bytes([i % 256, i // 256]) * 16, 1, os.urandom(700 + i), "") for i in range(300)]
    blobs[7] = (blobs[7][0], 1, None, "checksum mismatch")
    got = []
    async for raw in server._stream_blobs(FakeStore(blobs), [], verify=True):
        assert len(raw) < 10_000 + 2 * 1100
        msg = agent_pb2.DownloadResponse.FromString(raw)
        got += [(b.id, b.type, None if b.error else b.envelope, b.error) for b in msg.blobs]
    assert sorted(got, key=lambda b: b[0]) == sorted(blobs, key=lambda b: b[0])


async def test_stream_blobs_closed_early(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server, "DOWNLOAD_BATCH", 1000)
    blobs = [(bytes([i]) * 32, 1, b"x" * 900, "") for i in range(50)]
    stream = server._stream_blobs(FakeStore(blobs), [], verify=True)
    assert await stream.__anext__()
    await stream.aclose()  # the call ended: reads in flight are dropped
    await asyncio.sleep(0.05)


def test_store_without_blobs_streams_nothing() -> None:
    async def run() -> list[bytes]:
        return [m async for m in server._stream_blobs(FakeStore([]), [], verify=True)]

    assert asyncio.run(run()) == []


# -- pack reads ------------------------------------------------------------------------


def write_pack(backend: LocalBackend, sizes: list[int]) -> tuple[bytes, list[bytes]]:
    writer = PackWriter(backend)
    envs = [os.urandom(n) for n in sizes]
    for i, env in enumerate(envs):
        writer.add(bytes([i]) * 32, 1, env)
    return writer.finish().pack_id, envs


@pytest.mark.parametrize("direct", [False, True])
def test_packs_written_and_read_back_direct_or_buffered(tmp_path: Path, direct: bool) -> None:
    backend = LocalBackend(tmp_path, direct_io=direct)
    # Sizes around the O_DIRECT alignment and the small/large read threshold, plus tiny ones.
    sizes = [48, 4096, 4095, DIRECT_MIN - 1, DIRECT_MIN, DIRECT_MIN + 4097, 100, 3 * 1024 * 1024]
    pack_id, envs = write_pack(backend, sizes)
    path = pack_path(pack_id)
    entries = read_header(backend, path)
    assert [len(e) for _, e in read_envelopes(backend, path, entries)] == sizes
    got = {e.id: env for e, env in read_envelopes(backend, path, reversed(entries))}
    assert [got[bytes([i]) * 32] for i in range(len(sizes))] == envs
    assert list(verify_pack(backend, pack_id)) == []
    # Any subset, in any order, through the other kind of backend reads the same bytes.
    other = LocalBackend(tmp_path, direct_io=not direct)
    subset = entries[1::2]
    assert [env for _, env in read_envelopes(other, path, subset)] == envs[1::2]


@pytest.mark.parametrize("direct", [False, True])
def test_get_ranges_past_the_end_and_missing(tmp_path: Path, direct: bool) -> None:
    backend = LocalBackend(tmp_path, direct_io=direct)
    data = os.urandom(DIRECT_MIN * 3 + 123)
    backend.put("data/x", data)
    ranges = [
        (0, 10),
        (5, DIRECT_MIN + 10),
        (len(data) - 5, DIRECT_MIN),  # past the end: what exists
        (len(data) + 10, DIRECT_MIN),  # wholly past the end: nothing
        (DIRECT_MIN * 2 + 1, 0),
        (1, len(data)),
    ]
    got = [bytes(v) for v in backend.get_ranges("data/x", ranges)]
    assert got == [data[o : o + n] for o, n in ranges]
