"""The agent's side of protocol v1 blob traffic: RepoClient over gRPC."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import grpc

from agent.repo import Blob, UploadStats
from core import errors
from core.format import MAX_IDS_PER_QUERY
from core.tls import TlsFiles, channel_credentials
from core.wire import CHANNEL_OPTIONS, error_from_rpc, pack_ids, read_bitmap
from protos.clawback.v1 import agent_pb2, agent_pb2_grpc, common_pb2

UPLOAD_QUEUE = 4  # messages in flight per upload stream: back-pressure on the sealers


def open_channel(address: str, tls: TlsFiles) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(address, channel_credentials(tls), options=CHANNEL_OPTIONS)


class _Upload:
    """One client-streaming UploadBlobs call fed from a bounded queue."""

    def __init__(self, stub: agent_pb2_grpc.AgentServiceStub, job_id: str) -> None:
        self._queue: asyncio.Queue[list[agent_pb2.BlobData] | None] = asyncio.Queue(UPLOAD_QUEUE)
        self._job_id = job_id
        self._call = stub.UploadBlobs(self._requests())
        self._result: asyncio.Task[Any] = asyncio.ensure_future(self._call)

    async def _requests(self) -> AsyncIterator[agent_pb2.UploadRequest]:
        first = True
        while (batch := await self._queue.get()) is not None:
            yield agent_pb2.UploadRequest(job_id=self._job_id if first else "", blobs=batch)
            first = False

    async def _raise_if_failed(self) -> None:
        if self._result.done():
            await self._finish()  # raises the translated error

    async def send(self, blobs: Sequence[Blob]) -> None:
        msg = [
            agent_pb2.BlobData(
                id=b.id,
                type=cast(common_pb2.BlobType.ValueType, b.type),
                envelope=b.envelope or b"",
            )
            for b in blobs
        ]
        await self._raise_if_failed()
        put = asyncio.ensure_future(self._queue.put(msg))
        done, _ = await asyncio.wait({put, self._result}, return_when=asyncio.FIRST_COMPLETED)
        if put not in done:
            put.cancel()
            await self._finish()
            raise errors.TransportError("upload stream ended before all blobs were sent")

    async def _finish(self) -> UploadStats:
        try:
            resp: agent_pb2.UploadResponse = await self._result
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, "upload") from exc
        return UploadStats(
            resp.blobs_stored, resp.blobs_duplicate, resp.bytes_stored, resp.packs_written
        )

    async def close(self) -> UploadStats:
        if not self._result.done():
            await self._queue.put(None)
        return await self._finish()

    async def abort(self) -> None:
        self._call.cancel()
        with contextlib.suppress(BaseException):
            await self._result


class GrpcRepoClient:
    """RepoClient (agent/repo.py) over an mTLS channel to the coordinator."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.stub = agent_pb2_grpc.AgentServiceStub(channel)

    async def missing(self, ids: Sequence[bytes]) -> list[bool]:
        out: list[bool] = []
        for i in range(0, len(ids), MAX_IDS_PER_QUERY):
            part = ids[i : i + MAX_IDS_PER_QUERY]
            try:
                resp = await self.stub.MissingBlobs(
                    agent_pb2.MissingBlobsRequest(ids=pack_ids(part))
                )
            except grpc.RpcError as exc:
                raise error_from_rpc(exc, "missing-blobs query") from exc
            out.extend(read_bitmap(resp.missing, len(part)))
        return out

    async def open_upload(self, job_id: str) -> _Upload:
        return _Upload(self.stub, job_id)

    async def download(self, job_id: str, ids: Sequence[bytes]) -> AsyncIterator[Blob]:
        for i in range(0, len(ids), MAX_IDS_PER_QUERY):
            req = agent_pb2.DownloadRequest(
                job_id=job_id, ids=pack_ids(ids[i : i + MAX_IDS_PER_QUERY])
            )
            try:
                async for resp in self.stub.DownloadBlobs(req):
                    for b in resp.blobs:
                        yield Blob(b.id, b.type, None if b.error else b.envelope, b.error)
            except grpc.RpcError as exc:
                raise error_from_rpc(exc, "download") from exc

    async def put_keys(self, keys: Sequence[common_pb2.WrappedKey]) -> None:
        try:
            await self.stub.PutKeys(agent_pb2.PutKeysRequest(keys=keys))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, "storing wrapped keys") from exc

    async def get_keys(self, job_id: str, key_ids: Sequence[bytes]) -> list[common_pb2.WrappedKey]:
        try:
            resp = await self.stub.GetKeys(agent_pb2.GetKeysRequest(job_id=job_id, key_ids=key_ids))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, "fetching wrapped keys") from exc
        return list(resp.keys)

    async def commit(self, info: common_pb2.SnapshotInfo, refs: Sequence[bytes]) -> bool:
        async def parts() -> AsyncIterator[agent_pb2.CommitRequest]:
            yield agent_pb2.CommitRequest(header=info)
            step = 65536
            for i in range(0, len(refs), step):
                yield agent_pb2.CommitRequest(refs=pack_ids(refs[i : i + step]))

        try:
            resp = await self.stub.CommitSnapshot(parts())
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, f"committing snapshot {info.id}") from exc
        return bool(resp.already_committed)
