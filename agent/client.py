"""The agent's side of protocol v1: mTLS channels from a CertSource, and RepoClient (blob traffic) over gRPC."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from agent.repo import Blob, UploadStats
from core import errors, wire
from core.certs import CertSource, FileCertSource
from core.format import MAX_IDS_PER_QUERY
from core.tls import TlsFiles
from core.wire import CHANNEL_OPTIONS, error_from_rpc, pack_ids, read_bitmap, varint
from protos.clawback.v1 import agent_pb2, agent_pb2_grpc, common_pb2

UPLOAD_QUEUE = 2  # messages in flight per upload stream: back-pressure on the sealers
UPLOAD_METHOD = "/clawback.v1.AgentService/UploadBlobs"
MISSING_METHOD = "/clawback.v1.AgentService/MissingBlobs"


def job_field(job_id: str) -> bytes:
    """UploadRequest field 1 (the job id), which leads a stream's first message."""
    jid = job_id.encode()
    return b"\x0a" + varint(len(jid)) + jid if jid else b""


class UploadBuilder:
    """The BlobData fields of an UploadRequest, written in place: each envelope is encrypted
    straight into the message (core/envelope.py `seal_into`) and `take` copies the message
    out once, instead of an envelope, then a message, assembled from copies. The bytes are
    protobuf's serialization of the same UploadRequest (tested). Not thread-safe: the caller
    locks."""

    def __init__(self, capacity: int) -> None:
        self._buf = bytearray(capacity)
        self._view = memoryview(self._buf)
        self.fill = 0

    def reserve(self, blob_id: bytes, btype: int, size: int) -> memoryview:
        """Frame one BlobData with an envelope of `size` bytes: the view to write it into."""
        head = b"\x0a" + varint(len(blob_id)) + blob_id + b"\x10" + varint(btype)
        head += b"\x1a" + varint(size)
        frame = b"\x12" + varint(len(head) + size) + head
        start = self.fill + len(frame)
        end = start + size
        if end > len(self._buf):
            raise ValueError(f"upload message full ({end} > {len(self._buf)} bytes)")
        self._view[self.fill : start] = frame
        self.fill = end
        return self._view[start:end]

    def take(self) -> bytes:
        """The message so far (empty the builder)."""
        msg = bytes(self._view[: self.fill])
        self.fill = 0
        return msg


DOWNLOAD_METHOD = "/clawback.v1.AgentService/DownloadBlobs"
DownloadedBlob = tuple[bytes, int, memoryview | None, str]  # id, type, envelope view, error


def decode_download(message: bytes) -> list[DownloadedBlob]:
    """A DownloadResponse's (id, type, envelope, error) per BlobData, read from its wire bytes
    as the generated parser would (core/wire.py: parse_blobs); an envelope is a view into
    `message`, None when the blob carries an error. Malformed bytes raise IntegrityError."""
    try:
        blobs = wire.parse_blobs(message, 1)[1]
    except errors.UsageError as exc:
        raise errors.IntegrityError(
            f"malformed DownloadResponse from the coordinator: {exc}"
        ) from None
    return [(i, t, None if err else e, err) for i, t, e, err in blobs]


log = logging.getLogger("clawback.agent")


def _passthrough(msg: bytes) -> bytes:
    return msg


# What a stream of this channel may receive ahead of the agent (a restore's downloads):
# `[performance] download_window_mib`. gRPC's own window (BDP probing) grows with what it
# measures; on loopback it let a 2 GB restore's agent peak at 139-203 MiB from run to run,
# against 136-141 MiB with 4 MiB, as fast (docs/performance.md §Seventh tuning pass).
DOWNLOAD_WINDOW = 4 * 1024 * 1024


def window_options(window: int) -> list[tuple[str, int | str]]:
    """Channel options for a fixed receive window of `window` bytes; 0: gRPC's own."""
    if window <= 0:
        return []
    return [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", window)]


def open_channel(
    address: str, tls: TlsFiles | CertSource, window: int = DOWNLOAD_WINDOW
) -> grpc.aio.Channel:
    """A channel with the source's current certificate (fixed for the channel's life) and a
    receive window of `window` bytes per stream (0: gRPC's automatic window)."""
    source = FileCertSource(tls) if isinstance(tls, TlsFiles) else tls
    ca, cert, key = source.current()
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )
    # A private subchannel pool: a channel made after a renewal never reuses a connection
    # that was made with the previous certificate.
    options = [*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1), *window_options(window)]
    return grpc.aio.secure_channel(address, creds, options=options)


@dataclass
class _Pooled:
    channel: grpc.aio.Channel
    generation: int
    users: int = 0


class ChannelPool:
    """Channels to the coordinator that follow certificate renewals without cutting anything.

    A channel's credentials are fixed when it is made, and TLS checks them only
    at the handshake, so a running stream outlives the certificate it started
    with. `lease()` hands out the channel of the current certificate generation,
    making a new one after a renewal; a channel of an older generation is closed
    when its last lease ends (the control stream, a running job's uploads).
    """

    def __init__(self, address: str, source: CertSource, window: int = DOWNLOAD_WINDOW) -> None:
        self.address = address
        self.source = source
        self.window = window
        self._current: _Pooled | None = None
        self._old: list[_Pooled] = []

    def _acquire(self) -> _Pooled:
        generation = self.source.generation
        cur = self._current
        if cur is None or cur.generation != generation:
            fresh = _Pooled(open_channel(self.address, self.source, self.window), generation)
            if cur is not None:
                log.info(
                    "new connections to %s use certificate generation %d",
                    self.address,
                    generation,
                )
                self._old.append(cur)
            self._current = cur = fresh
        cur.users += 1
        return cur

    async def _release(self, entry: _Pooled) -> None:
        entry.users -= 1
        if entry is not self._current and entry.users <= 0 and entry in self._old:
            self._old.remove(entry)
            await entry.channel.close(grace=None)

    @contextlib.asynccontextmanager
    async def lease(self) -> AsyncIterator[grpc.aio.Channel]:
        """The current channel, held until the block ends; raises Unavailable if there is no certificate yet."""
        entry = self._acquire()
        try:
            yield entry.channel
        finally:
            await self._release(entry)

    async def reset(self) -> None:
        """Retire the current channel (after its control stream broke): the next lease dials afresh
        instead of waiting out the old channel's reconnect backoff."""
        cur, self._current = self._current, None
        if cur is not None:
            self._old.append(cur)
            cur.users += 1
            await self._release(cur)

    @property
    def open_channels(self) -> int:
        return len(self._old) + (self._current is not None)

    async def close(self) -> None:
        entries = [*self._old, *([self._current] if self._current else [])]
        self._old, self._current = [], None
        for e in entries:
            await e.channel.close(grace=None)


class _Upload:
    """One client-streaming UploadBlobs call fed from a bounded queue."""

    def __init__(self, channel: grpc.aio.Channel, job_id: str) -> None:
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(UPLOAD_QUEUE)
        self._job_id = job_id
        # Requests arrive in wire form (UploadBuilder): the serializer passes them through.
        method = channel.stream_unary(
            UPLOAD_METHOD,
            request_serializer=_passthrough,
            response_deserializer=agent_pb2.UploadResponse.FromString,
        )
        self._call = method(self._requests())
        self._result: asyncio.Task[Any] = asyncio.ensure_future(self._call)

    async def _requests(self) -> AsyncIterator[bytes]:
        while (msg := await self._queue.get()) is not None:
            yield msg

    async def _raise_if_failed(self) -> None:
        if self._result.done():
            await self._finish()  # raises the translated error

    async def send_message(self, message: bytes) -> None:
        msg = job_field(self._job_id) + message if self._job_id else message
        self._job_id = ""  # the first message only
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


class _ThreadUpload:
    """One client-streaming UploadBlobs call on a synchronous channel, fed from worker threads.

    `put_message` queues a message from any thread, blocking while the
    queue is full (back-pressure on the sealers, with no event-loop hop per
    message); grpc's own thread sends. Unlike grpc.aio, whose failed write
    replaces the server's status with a generic INTERNAL error, the final
    status here is the coordinator's (e.g. its disk is full).
    """

    def __init__(self, channel: grpc.Channel, job_id: str) -> None:
        self._queue: queue.Queue[bytes | None] = queue.Queue(UPLOAD_QUEUE)
        self._job_id = job_id
        self._lock = threading.Lock()  # the job id's message goes first
        method = channel.stream_unary(
            UPLOAD_METHOD,
            request_serializer=_passthrough,
            response_deserializer=agent_pb2.UploadResponse.FromString,
        )
        self._call: Any = method.future(self._requests())

    def _requests(self) -> Iterator[bytes]:
        while (msg := self._queue.get()) is not None:
            yield msg

    def _offer(self, msg: bytes | None) -> bool:
        """Queue `msg` unless the call has ended; False if it has."""
        while not self._call.done():
            try:
                self._queue.put(msg, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _result(self) -> UploadStats:
        try:
            resp: agent_pb2.UploadResponse = self._call.result()
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, "upload") from exc
        except grpc.FutureCancelledError:
            raise errors.TransportError("upload cancelled") from None
        return UploadStats(
            resp.blobs_stored, resp.blobs_duplicate, resp.bytes_stored, resp.packs_written
        )

    def put_message(self, message: bytes) -> None:
        """Queue an UploadRequest's BlobData fields (UploadBuilder), from any thread."""
        with self._lock:
            msg = job_field(self._job_id) + message if self._job_id else message
            if not self._offer(msg):
                self._result()  # raises the coordinator's error
                raise errors.TransportError("upload stream ended before all blobs were sent")
            self._job_id = ""

    async def send_message(self, message: bytes) -> None:
        await asyncio.to_thread(self.put_message, message)

    async def close(self) -> UploadStats:
        def finish() -> UploadStats:
            with self._lock:
                self._offer(None)
            return self._result()

        return await asyncio.to_thread(finish)

    async def abort(self) -> None:
        self._call.cancel()


def open_sync_channel(address: str, source: CertSource) -> grpc.Channel:
    """A synchronous channel with the source's current certificate (for upload streams)."""
    ca, cert, key = source.current()
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )
    options = [*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
    return grpc.secure_channel(address, creds, options=options)


class GrpcRepoClient:
    """RepoClient (agent/repo.py) over an mTLS channel to the coordinator.

    With `upload_channel` (a synchronous channel to the same coordinator),
    uploads are `_ThreadUpload`s that worker threads feed directly.
    """

    def __init__(
        self, channel: grpc.aio.Channel, upload_channel: grpc.Channel | None = None
    ) -> None:
        self.channel = channel
        self.upload_channel = upload_channel
        self.stub = agent_pb2_grpc.AgentServiceStub(channel)
        if upload_channel is not None:
            self._missing_call = upload_channel.unary_unary(
                MISSING_METHOD,
                request_serializer=agent_pb2.MissingBlobsRequest.SerializeToString,
                response_deserializer=agent_pb2.MissingBlobsResponse.FromString,
            )
            # Found by the backup's threads (agent/backup.py `_missing`, `_ask`).
            self.missing_from_thread = self._missing_sync
            self.missing_future = self._missing_future

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

    def _missing_sync(self, ids: Sequence[bytes]) -> list[bool]:
        """`missing` from a worker thread, on the synchronous channel: no event-loop hop."""
        out: list[bool] = []
        for i in range(0, len(ids), MAX_IDS_PER_QUERY):
            part = ids[i : i + MAX_IDS_PER_QUERY]
            try:
                resp = self._missing_call(agent_pb2.MissingBlobsRequest(ids=pack_ids(part)))
            except grpc.RpcError as exc:
                raise error_from_rpc(exc, "missing-blobs query") from exc
            out.extend(read_bitmap(resp.missing, len(part)))
        return out

    def _missing_future(self, ids: Sequence[bytes]) -> Callable[[], list[bool]]:
        """`missing` for at most MAX_IDS_PER_QUERY ids, sent now from a worker thread; the
        call returned waits for the answer (the caller reads on meanwhile)."""
        if len(ids) > MAX_IDS_PER_QUERY:
            raise ValueError(f"{len(ids)} ids in one query (at most {MAX_IDS_PER_QUERY})")
        fut = self._missing_call.future(agent_pb2.MissingBlobsRequest(ids=pack_ids(ids)))
        n = len(ids)

        def result() -> list[bool]:
            try:
                resp = fut.result()
            except grpc.RpcError as exc:
                raise error_from_rpc(exc, "missing-blobs query") from exc
            return read_bitmap(resp.missing, n)

        return result

    async def open_upload(self, job_id: str) -> _Upload | _ThreadUpload:
        if self.upload_channel is not None:
            return _ThreadUpload(self.upload_channel, job_id)
        return _Upload(self.channel, job_id)

    async def download(self, job_id: str, ids: Sequence[bytes]) -> AsyncIterator[Blob]:
        async for batch in self.download_batches(job_id, ids):
            for bid, btype, env, err in batch:
                yield Blob(bid, btype, None if err or env is None else bytes(env), err)

    async def download_batches(
        self, job_id: str, ids: Sequence[bytes]
    ) -> AsyncIterator[list[DownloadedBlob]]:
        """The blobs of `download`, one list per DownloadResponse, parsed by `decode_download`:
        envelopes are views into the received message (no per-blob copies or message objects)."""
        method = self.channel.unary_stream(
            DOWNLOAD_METHOD,
            request_serializer=agent_pb2.DownloadRequest.SerializeToString,
            response_deserializer=_passthrough,
        )
        for i in range(0, len(ids), MAX_IDS_PER_QUERY):
            req = agent_pb2.DownloadRequest(
                job_id=job_id, ids=pack_ids(ids[i : i + MAX_IDS_PER_QUERY])
            )
            try:
                async for msg in method(req):
                    yield decode_download(msg)
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
