"""The coordinator's gRPC services (protocol v1): AgentService for agents, AdminService for operators."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import hmac
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError

import core
from coordinator.config import CoordinatorConfig
from coordinator.jobs import CAP_BACKUP_VOLUME, CAP_RESTORE, JobManager, is_terminal
from coordinator.registry import AgentSession, Registry
from core import chunker, compression, errors, format, tls, wire
from core.certs import CertSource, FileCertSource
from core.clock import SYSTEM, Clock
from core.memory import trim_malloc
from protos.clawback.v1 import admin_pb2, admin_pb2_grpc, agent_pb2, agent_pb2_grpc, common_pb2

log = logging.getLogger(__name__)

PROTOCOL_VERSION = core.PROTOCOL_VERSION
COORDINATOR_VERSION = core.__version__
SUPPORTED_CAPABILITIES = frozenset({CAP_BACKUP_VOLUME, CAP_RESTORE})
DOWNLOAD_BATCH = 1024 * 1024  # bytes of envelopes per DownloadResponse (copies stay in cache)
DOWNLOAD_AHEAD = 2  # DownloadResponses read and encoded ahead of the one being sent
SILENT_INTERVALS = 3  # design.md §Control stream: three silent heartbeat intervals disconnect
NO_REPOSITORY = "no repository: run `clawback repo init`"

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
G = TypeVar("G", bound=Callable[..., AsyncIterator[Any]])
INTERNAL_DETAIL = "internal error (see the coordinator log)"


async def _abort_for(name: str, exc: Exception, context: grpc.aio.ServicerContext) -> None:
    """Map ClawbackError to its status; log anything unexpected and answer INTERNAL."""
    if isinstance(exc, errors.ClawbackError):
        code, detail = wire.status_for(exc)
        log.info("%s refused: %s", name, exc)
        await context.abort(code, detail)
    log.error("%s failed", name, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_DETAIL)


def _guarded(fn: F) -> F:
    """Wrap a unary-response handler with the error mapping of `_abort_for`."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await fn(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort_for(fn.__name__, exc, context)

    return wrapper  # type: ignore[return-value]


def _guarded_stream(fn: G) -> G:
    """Wrap a streaming-response handler (an async generator) the same way."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            async for item in fn(self, request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort_for(fn.__name__, exc, context)

    return wrapper  # type: ignore[return-value]


def _compression(name: str) -> str:
    if name not in compression.NAMES:
        raise errors.UsageError(
            f"unknown compression {name!r} (known: {', '.join(compression.NAMES)})"
        )
    return name


def _paged_policy(
    name: str, files: list[str], formats: list[str]
) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """The config's (paged_chunker, paged_files, paged_formats) for a paged chunker's name
    ("none": no paged files), its patterns and its formats (none given: the defaults);
    UsageError or ConfigError says what is wrong (design.md §Paged files)."""
    if name == "none":
        if files or formats:
            raise errors.UsageError(
                "paged_files and paged_formats name files for a paged chunker, and it is none"
            )
        return "", (), ()
    chunker.params(name)  # ConfigError for an unknown name
    try:
        patterns = format.check_paged_files(files or list(format.DEFAULT_PAGED_FILES))
    except ValueError as exc:
        raise errors.UsageError(str(exc)) from None
    return name, patterns, _paged_formats(formats) if formats else format.DEFAULT_PAGED_FORMATS


def _paged_formats(formats: list[str]) -> tuple[str, ...]:
    """Requested paged formats: ["none"] for none."""
    if formats == ["none"]:
        return ()
    try:
        return format.check_paged_formats(formats)
    except ValueError as exc:
        raise errors.UsageError(str(exc)) from None


async def _repo_config(store: Any) -> format.RepoConfig:
    try:
        cfg: format.RepoConfig = await asyncio.to_thread(store.config)
    except errors.RepositoryMissing:
        raise errors.RepositoryMissing(NO_REPOSITORY) from None
    return cfg


RAW_PARSE_MIN_AVG = 16 * 1024  # mean envelope size from which parse_upload beats protobuf's


def _upload_blobs(raw: bytes) -> list[tuple[bytes, int, bytes | memoryview]]:
    """The (id, type, envelope) of each blob of an UploadRequest's wire bytes, validated.

    protobuf's parser (which aliases the input) counts the blobs; reading each
    envelope from it would copy it, so messages of large blobs are read by
    wire.parse_upload, whose envelopes are views into `raw`. Messages of many
    small blobs, where per-field Python costs more than the copies, are read
    from the parsed message.
    """
    try:
        req = agent_pb2.UploadRequest.FromString(raw)
    except DecodeError as exc:
        raise errors.UsageError(f"malformed UploadRequest: {exc}") from None
    n = len(req.blobs)
    if not n:
        return []
    out: list[tuple[bytes, int, bytes | memoryview]]
    if len(raw) // n >= RAW_PARSE_MIN_AVG:
        out = list(wire.parse_upload(raw)[1])
    else:
        out = [(b.id, b.type, b.envelope) for b in req.blobs]
    for bid, btype, env in out:
        if len(bid) != format.ID_SIZE:
            raise errors.UsageError(f"blob id of {len(bid)} bytes (ids are {format.ID_SIZE})")
        if btype not in (common_pb2.BLOB_TYPE_DATA, common_pb2.BLOB_TYPE_TREE):
            raise errors.UsageError(f"blob {bid.hex()[:16]}: invalid blob type {btype}")
        if not 0 < len(env) <= format.MAX_BLOB_SIZE:
            raise errors.UsageError(
                f"blob {bid.hex()[:16]}: envelope of {len(env)} bytes "
                f"(at most {format.MAX_BLOB_SIZE})"
            )
    return out


def _check_key_ids(key_ids: Any) -> list[bytes]:
    out = list(key_ids)
    for k in out:
        if len(k) != format.KEY_ID_SIZE:
            raise errors.UsageError(f"key id of {len(k)} bytes (key ids are {format.KEY_ID_SIZE})")
    return out


async def _get_keys(store: Any, key_ids: list[bytes]) -> agent_pb2.GetKeysResponse:
    found = await asyncio.to_thread(store.get_keys, key_ids)
    keys = list(found.values()) if isinstance(found, dict) else list(found)
    return agent_pb2.GetKeysResponse(keys=keys)


def encode_download(blobs: Sequence[tuple[bytes, int, bytes | None, str]]) -> bytes:
    """A DownloadResponse in protobuf wire format, byte-identical to building the message and
    calling SerializeToString, but with one copy of the envelopes and no message objects.
    Each blob is (id, type, envelope, error); a blob without an envelope carries its error."""
    parts: list[bytes] = []
    for blob_id, btype, envelope, error in blobs:
        head = b"\x0a" + wire.varint(len(blob_id)) + blob_id if blob_id else b""
        if btype:
            head += b"\x10" + wire.varint(btype)
        body = b""
        if envelope is None:
            err = (error or "unreadable").encode()
            head += b"\x22" + wire.varint(len(err)) + err
        elif envelope:
            head += b"\x1a" + wire.varint(len(envelope))
            body = envelope
        parts += (b"\x0a", wire.varint(len(head) + len(body)), head, body)
    return b"".join(parts)


def _raw(message: bytes) -> bytes:
    return message


async def _stream_blobs(store: Any, ids: list[bytes], *, verify: bool) -> AsyncIterator[bytes]:
    """DownloadResponse wire bytes (encode_download) of about DOWNLOAD_BATCH bytes of envelopes
    each. The store reads in threads, up to DOWNLOAD_AHEAD batches ahead of the one being sent
    (one at a time: a lock orders them; the order of the batches does not matter). `verify`:
    check each envelope against its checksum (BlobStore.read_blobs)."""
    it: Iterator[tuple[bytes, int, bytes | None, str]] = iter(store.read_blobs(ids, verify=verify))
    lock = threading.Lock()

    def next_batch() -> bytes:
        batch: list[tuple[bytes, int, bytes | None, str]] = []
        size = 0
        with lock:
            for blob in it:
                batch.append(blob)
                size += 256 if blob[2] is None else len(blob[2]) + 64
                if size >= DOWNLOAD_BATCH:
                    break
        return encode_download(batch) if batch else b""

    ahead = collections.deque(
        asyncio.ensure_future(asyncio.to_thread(next_batch)) for _ in range(DOWNLOAD_AHEAD)
    )
    try:
        while ahead:
            message = await ahead.popleft()
            if message:  # else the store is exhausted: drain what is in flight
                ahead.append(asyncio.ensure_future(asyncio.to_thread(next_batch)))
                yield message
    finally:
        for pending in ahead:
            # The call ended early: a read in flight finishes in its thread and is dropped.
            pending.cancel()


def _register_raw_downloads(
    server: grpc.aio.Server, agents: AgentServicer, admins: AdminServicer
) -> None:
    """DownloadBlobs and ReadBlobs yield prebuilt DownloadResponse bytes (`encode_download`):
    registered again after the generated handlers, with a pass-through serializer (the later
    registration of a method wins)."""
    for service, method, handler, request in (
        (
            "clawback.v1.AgentService",
            "DownloadBlobs",
            agents.DownloadBlobs,
            agent_pb2.DownloadRequest,
        ),
        ("clawback.v1.AdminService", "ReadBlobs", admins.ReadBlobs, admin_pb2.ReadBlobsRequest),
    ):
        server.add_registered_method_handlers(
            service,
            {
                method: grpc.unary_stream_rpc_method_handler(
                    handler, request_deserializer=request.FromString, response_serializer=_raw
                )
            },
        )


def _register_raw_uploads(server: grpc.aio.Server, agents: AgentServicer) -> None:
    """UploadBlobs receives UploadRequest wire bytes (`_upload_blobs` parses them): registered
    again after the generated handler, with a pass-through deserializer."""
    server.add_registered_method_handlers(
        "clawback.v1.AgentService",
        {
            "UploadBlobs": grpc.stream_unary_rpc_method_handler(
                agents.UploadBlobs,
                request_deserializer=_raw,
                response_serializer=agent_pb2.UploadResponse.SerializeToString,
            )
        },
    )


class _Auth:
    """Identity checks shared by both services: the certificate decides, never a message."""

    def __init__(self, store: Any) -> None:
        self._catalog = store.catalog

    async def agent(self, context: grpc.aio.ServicerContext) -> str:
        ident = tls.peer_identity(context.auth_context())
        if ident.role != "agent":
            raise errors.PermissionDenied(
                f"certificate of {ident.name} has role {ident.role!r}; AgentService needs 'agent'"
            )
        if await asyncio.to_thread(self._catalog.is_revoked, ident.name):
            raise errors.PermissionDenied(f"agent {ident.name} is revoked")
        return ident.name

    def admin(self, context: grpc.aio.ServicerContext) -> str:
        ident = tls.peer_identity(context.auth_context())
        if ident.role != "admin":
            raise errors.PermissionDenied(
                f"certificate of {ident.name} has role {ident.role!r}; AdminService needs 'admin'"
            )
        return ident.name


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):
    """AgentService: control streams and blob traffic of agents (design.md §Protocol v1)."""

    def __init__(
        self,
        store: Any,
        registry: Registry,
        jobs: JobManager,
        heartbeat_interval_s: int = 10,
        clock: Clock = SYSTEM,
    ) -> None:
        self._store = store
        self._registry = registry
        self._jobs = jobs
        self._heartbeat = heartbeat_interval_s
        self._clock = clock
        self._auth = _Auth(store)
        self._transfers = 0  # blob streams open (uploads and downloads)
        self._ending: set[asyncio.Task[None]] = set()  # failing a disconnected agent's jobs

    @contextlib.contextmanager
    def _transfer(self) -> Iterator[None]:
        """Count a blob stream; when the last one closes, the heap's free pages go back to
        the kernel (core/memory.py keeps them in the heap while streams run)."""
        self._transfers += 1
        try:
            yield
        finally:
            self._transfers -= 1
            if not self._transfers:
                asyncio.get_running_loop().run_in_executor(None, trim_malloc)

    @_guarded_stream
    async def Control(
        self,
        request_iterator: AsyncIterator[agent_pb2.AgentMessage],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[agent_pb2.CoordinatorMessage]:
        messages = request_iterator.__aiter__()
        try:
            first = await messages.__anext__()
        except StopAsyncIteration:
            return
        # Checked after reading Hello so that the agent's first write never races the refusal.
        name = await self._auth.agent(context)
        if first.WhichOneof("msg") != "hello":
            raise errors.UsageError("the first message on the control stream must be Hello")
        hello = first.hello
        if hello.protocol_version != PROTOCOL_VERSION:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"protocol version {hello.protocol_version} is not supported "
                f"(this coordinator speaks {PROTOCOL_VERSION})",
            )
        cfg = await _repo_config(self._store)
        if not hmac.compare_digest(hello.key_check, bytes.fromhex(cfg.key_check)):
            raise errors.KeyMaterialError(
                f"agent {name} holds a key that does not belong to this repository"
            )
        now = self._clock.now_ns()
        session = AgentSession(
            name=name,
            hostname=hello.hostname,
            version=hello.agent_version,
            capabilities=frozenset(hello.capabilities) & SUPPORTED_CAPABILITIES,
            sources=tuple(hello.sources),
            peer=context.peer(),
            connected_ns=now,
            last_heartbeat_ns=now,
        )
        await asyncio.to_thread(
            self._store.catalog.upsert_agent,
            name,
            hello.hostname,
            hello.agent_version,
            list(hello.sources),
            sorted(hello.capabilities),
            now,
        )
        yield (
            agent_pb2.CoordinatorMessage(
                welcome=agent_pb2.Welcome(
                    agent=name,
                    protocol_version=PROTOCOL_VERSION,
                    capabilities=sorted(session.capabilities),
                    repo=wire.repo_config_to_wire(cfg),
                    heartbeat_interval_s=self._heartbeat,
                    coordinator_version=COORDINATOR_VERSION,
                )
            )
        )
        self._registry.register(session)
        log.info(
            "agent %s connected from %s (version %s, capabilities %s)",
            name,
            session.peer,
            session.version,
            ",".join(sorted(session.capabilities)) or "none",
        )
        reader = asyncio.create_task(self._read(session, messages), name=f"control-read-{name}")
        # However the RPC ends. A client that cancels while a message is being sent leaves this
        # generator suspended at its yield, and the finally below would run only whenever the
        # generator is collected.
        loop = asyncio.get_running_loop()

        def ended(_: object) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: so is the server
                loop.call_soon_threadsafe(self._session_over, session, reader)

        context.add_done_callback(ended)
        try:
            while (msg := await session.queue.get()) is not None:
                yield msg
        finally:
            over = self._session_over(session, reader)
            if over is not None:
                await asyncio.shield(over)
        if session.close_code is not None:
            await context.abort(session.close_code, session.close_reason)

    def _session_over(
        self, session: AgentSession, reader: asyncio.Task[None]
    ) -> asyncio.Task[None] | None:
        """End a control session, once: the agent is disconnected unless a newer stream took
        its place. Returns the task that fails its jobs, a task of its own so that a
        cancelled handler cannot interrupt it (design.md §Control stream)."""
        reader.cancel()
        session.close()
        if not self._registry.unregister(session):
            return None
        log.info("agent %s disconnected: %s", session.name, session.close_reason or "stream ended")
        task = asyncio.get_running_loop().create_task(
            self._jobs.agent_disconnected(session.name), name=f"disconnected-{session.name}"
        )
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)
        return task

    async def _read(
        self, session: AgentSession, messages: AsyncIterator[agent_pb2.AgentMessage]
    ) -> None:
        """Read heartbeats and job updates until the stream ends or falls silent."""
        silence = SILENT_INTERVALS * self._heartbeat
        try:
            while True:
                try:
                    async with asyncio.timeout(silence):
                        msg = await messages.__anext__()
                except StopAsyncIteration:
                    session.close(None, "stream ended")
                    return
                except TimeoutError:
                    session.close(grpc.StatusCode.UNAVAILABLE, f"no heartbeat for {silence} s")
                    return
                self._registry.heartbeat(session)
                kind = msg.WhichOneof("msg")
                if kind == "job_update":
                    await self._jobs.apply_update(session.name, msg.job_update)
                elif kind == "hello":
                    session.close(grpc.StatusCode.INVALID_ARGUMENT, "Hello sent twice")
                    return
        except asyncio.CancelledError:
            raise
        except grpc.RpcError as exc:
            session.close(None, f"stream broken: {exc}")
        except Exception:
            log.exception("control stream of agent %s failed", session.name)
            session.close(grpc.StatusCode.INTERNAL, "internal error (see the coordinator log)")

    @_guarded
    async def MissingBlobs(
        self, request: agent_pb2.MissingBlobsRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.MissingBlobsResponse:
        await self._auth.agent(context)
        ids = wire.unpack_ids(request.ids)
        missing = await asyncio.to_thread(self._store.missing, ids)
        return agent_pb2.MissingBlobsResponse(missing=wire.make_bitmap(missing))

    @_guarded
    async def UploadBlobs(  # type: ignore[override]  # wire bytes, not messages
        self,
        request_iterator: AsyncIterator[bytes],
        context: grpc.aio.ServicerContext,
    ) -> agent_pb2.UploadResponse:
        """Requests arrive as wire bytes (`_register_raw_uploads`). One message is written
        to the session in a thread while the next is received and parsed; the session
        takes them in order."""
        with self._transfer():
            return await self._upload(request_iterator, context)

    async def _upload(
        self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> agent_pb2.UploadResponse:
        name = await self._auth.agent(context)
        loop = asyncio.get_running_loop()
        session: Any = None
        pending: asyncio.Future[Any] | None = None

        async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
            # Shielded: a cancelled stream must not abort the session while a thread still uses it.
            nonlocal pending
            pending = loop.run_in_executor(None, fn, *args)
            return await asyncio.shield(pending)

        def abort(_: object = None) -> None:
            try:
                session.abort()  # design.md §Blob traffic: the open pack is discarded
            except Exception:
                log.exception("aborting the upload of agent %s failed", name)

        try:
            async for raw in request_iterator:
                blobs = _upload_blobs(raw)
                del raw
                if not blobs:
                    continue
                if session is None:
                    session = await in_thread(self._store.upload)
                elif pending is not None:
                    await asyncio.shield(pending)  # the previous message, written in order
                pending = loop.run_in_executor(None, session.add_many, blobs)
                del blobs
            if pending is not None:
                await asyncio.shield(pending)
            if session is None:
                return agent_pb2.UploadResponse()
            stats = await in_thread(session.finish)
        except BaseException:
            if session is not None:
                if pending is not None and not pending.done():
                    pending.add_done_callback(abort)
                else:
                    abort()
            raise
        return agent_pb2.UploadResponse(
            blobs_stored=stats.blobs_stored,
            blobs_duplicate=stats.blobs_duplicate,
            bytes_stored=stats.bytes_stored,
            packs_written=stats.packs_written,
        )

    @_guarded_stream
    async def DownloadBlobs(  # type: ignore[override]  # DownloadResponse wire bytes: _register_raw_downloads
        self, request: agent_pb2.DownloadRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        name = await self._auth.agent(context)
        ids = wire.unpack_ids(request.ids)
        await self._jobs.authorize_download(name, request.job_id, ids)
        with self._transfer():
            # The agent authenticates every envelope (AEAD, then the id re-derived from the
            # plaintext): a checksum pass here would hash every restored byte a second time.
            async for response in _stream_blobs(self._store, ids, verify=False):
                yield response

    @_guarded
    async def PutKeys(
        self, request: agent_pb2.PutKeysRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.PutKeysResponse:
        await self._auth.agent(context)
        _check_key_ids(k.key_id for k in request.keys)
        await asyncio.to_thread(self._store.put_keys, list(request.keys))
        return agent_pb2.PutKeysResponse()

    @_guarded
    async def GetKeys(
        self, request: agent_pb2.GetKeysRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.GetKeysResponse:
        name = await self._auth.agent(context)
        key_ids = _check_key_ids(request.key_ids)
        self._jobs.authorize_keys(name, request.job_id)
        return await _get_keys(self._store, key_ids)

    @_guarded
    async def CommitSnapshot(
        self,
        request_iterator: AsyncIterator[agent_pb2.CommitRequest],
        context: grpc.aio.ServicerContext,
    ) -> agent_pb2.CommitResponse:
        name = await self._auth.agent(context)
        info: common_pb2.SnapshotInfo | None = None
        refs: set[bytes] = set()
        async for req in request_iterator:
            part = req.WhichOneof("part")
            if info is None:
                if part != "header":
                    raise errors.UsageError("CommitSnapshot: the first message must be the header")
                info = common_pb2.SnapshotInfo()
                info.CopyFrom(req.header)
                info.agent = name  # the certificate names the agent, never the message
            elif part == "refs":
                refs.update(wire.unpack_ids(req.refs, limit=len(req.refs) // format.ID_SIZE))
            else:
                raise errors.UsageError("CommitSnapshot: only one header is allowed")
        if info is None:
            raise errors.UsageError("CommitSnapshot: no header")
        try:
            already = await asyncio.to_thread(self._store.commit_snapshot, info, frozenset(refs))
        except errors.NotFound as exc:
            # design.md §Blob traffic: unstored references (or keys) are FAILED_PRECONDITION.
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, wire.status_for(exc)[1])
        if not already:
            log.info(
                "snapshot %s of %s/%s committed (%d refs)", info.id, name, info.source, len(refs)
            )
        return agent_pb2.CommitResponse(snapshot_id=info.id, already_committed=bool(already))


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    """AdminService: the operator's API behind the `clawback` CLI (design.md §Admin API)."""

    def __init__(
        self, store: Any, registry: Registry, jobs: JobManager, clock: Clock = SYSTEM
    ) -> None:
        self._store = store
        self._catalog = store.catalog
        self._registry = registry
        self._jobs = jobs
        self._clock = clock
        self._auth = _Auth(store)

    @_guarded
    async def InitRepository(
        self, request: admin_pb2.InitRepositoryRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.RepoConfig:
        who = self._auth.admin(context)
        chunker_name = request.chunker or format.DEFAULT_CHUNKER
        chunker.params(chunker_name)  # ConfigError for an unknown name
        comp = _compression(request.compression or format.DEFAULT_COMPRESSION)
        cipher = request.cipher or format.DEFAULT_CIPHER
        if cipher != format.DEFAULT_CIPHER:
            raise errors.UsageError(f"unknown cipher {cipher!r} (known: {format.DEFAULT_CIPHER})")
        if len(request.key_check) != 16:
            raise errors.UsageError(f"key check of {len(request.key_check)} bytes (it is 16)")
        paged, patterns, formats = _paged_policy(
            request.paged_chunker or format.DEFAULT_PAGED_CHUNKER,
            list(request.paged_files),
            list(request.paged_formats),
        )
        cfg = format.RepoConfig(
            repo_id=format.new_repo_id(),
            chunker=chunker_name,
            compression=comp,
            cipher=cipher,
            key_check=request.key_check.hex(),
            created_ns=self._clock.now_ns(),
            paged_chunker=paged,
            paged_files=patterns,
            paged_formats=formats,
        )
        cfg = await asyncio.to_thread(self._store.init_repository, cfg) or cfg
        log.info("repository %s initialised by %s", cfg.repo_id, who)
        return wire.repo_config_to_wire(cfg)

    @_guarded
    async def UpdateRepository(
        self, request: admin_pb2.UpdateRepositoryRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.RepoConfig:
        """design.md §Changing the config: compression and the paged-file policy may change;
        stored blobs stay valid either way (an envelope says whether it is compressed; ids do
        not depend on where a file was cut). Backups started afterwards use the new config."""
        who = self._auth.admin(context)
        comp = _compression(request.compression) if request.compression else ""
        files, formats = list(request.paged_files), list(request.paged_formats)
        paged: tuple[str, tuple[str, ...], tuple[str, ...]] | None = None
        # Without a paged chunker: new patterns or formats for the one the repository has.
        patterns: tuple[str, ...] | None = None
        new_formats: tuple[str, ...] | None = None
        if request.paged_chunker:
            paged = _paged_policy(request.paged_chunker, files, formats)
        else:
            if files:
                try:
                    patterns = format.check_paged_files(files)
                except ValueError as exc:
                    raise errors.UsageError(str(exc)) from None
            if formats:
                new_formats = _paged_formats(formats)
        if not comp and paged is None and patterns is None and new_formats is None:
            raise errors.UsageError(
                "nothing to change: give a compression, a paged chunker, paged-file patterns "
                "or paged formats"
            )

        def change(cur: format.RepoConfig) -> format.RepoConfig:
            new = cur
            if comp:
                new = dataclasses.replace(new, compression=comp)
            if paged is not None:
                new = dataclasses.replace(
                    new, paged_chunker=paged[0], paged_files=paged[1], paged_formats=paged[2]
                )
            elif patterns is not None or new_formats is not None:
                if not cur.paged_chunker:
                    raise errors.UsageError(
                        "the repository cuts no files on a grid: name the paged chunker "
                        f"({format.DEFAULT_PAGED_CHUNKER}) along with the patterns or formats"
                    )
                if patterns is not None:
                    new = dataclasses.replace(new, paged_files=patterns)
                if new_formats is not None:
                    new = dataclasses.replace(new, paged_formats=new_formats)
            return new

        try:
            before = await _repo_config(self._store)
            cfg = await asyncio.to_thread(self._store.update_config, change)
        except errors.RepositoryMissing:
            raise errors.RepositoryMissing(NO_REPOSITORY) from None
        if cfg != before:
            log.info(
                "repository %s config changed by %s: compression %s, paged files %s",
                cfg.repo_id,
                who,
                cfg.compression,
                f"{cfg.paged_chunker} for {len(cfg.paged_files)} patterns and formats "
                f"{','.join(cfg.paged_formats) or 'none'}"
                if cfg.paged_chunker
                else "none",
            )
        return wire.repo_config_to_wire(cfg)

    @_guarded
    async def GetRepository(
        self, request: admin_pb2.GetRepositoryRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.RepoConfig:
        self._auth.admin(context)
        return wire.repo_config_to_wire(await _repo_config(self._store))

    def _agent_info(self, info: admin_pb2.AgentInfo) -> admin_pb2.AgentInfo:
        session = self._registry.get(info.name)
        if session is not None and not session.closed:
            info.connected = True
            info.address = session.peer
        return info

    @_guarded
    async def ListAgents(
        self, request: admin_pb2.ListAgentsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListAgentsResponse:
        self._auth.admin(context)
        rows = await asyncio.to_thread(self._catalog.list_agents)
        return admin_pb2.ListAgentsResponse(agents=[self._agent_info(r) for r in rows])

    @_guarded
    async def RevokeAgent(
        self, request: admin_pb2.RevokeAgentRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.AgentInfo:
        who = self._auth.admin(context)
        if not request.name:
            raise errors.UsageError("agent name is empty")
        info: admin_pb2.AgentInfo = await asyncio.to_thread(
            self._catalog.set_revoked, request.name, True
        )
        self._registry.disconnect(
            request.name,
            *wire.status_for(errors.PermissionDenied(f"agent {request.name} is revoked")),
        )
        log.warning("agent %s revoked by %s", request.name, who)
        info.connected = False
        return info

    @_guarded
    async def StartBackup(
        self, request: admin_pb2.StartBackupRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.StartBackupResponse:
        self._auth.admin(context)
        jobs = await self._jobs.start_backup(
            request.agent, list(request.sources), list(request.tags)
        )
        return admin_pb2.StartBackupResponse(jobs=jobs)

    @_guarded
    async def StartRestore(
        self, request: admin_pb2.StartRestoreRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.JobInfo:
        self._auth.admin(context)
        return await self._jobs.start_restore(
            request.snapshot_id,
            request.agent,
            request.target,
            list(request.paths),
            request.overwrite,
            request.grant,
        )

    @_guarded
    async def GetJob(
        self, request: admin_pb2.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.JobInfo:
        self._auth.admin(context)
        return await self._jobs.get(request.job_id)

    @_guarded
    async def CancelJob(
        self, request: admin_pb2.CancelJobRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.JobInfo:
        who = self._auth.admin(context)
        info = await self._jobs.cancel(request.job_id)
        if not is_terminal(info.state):
            log.info("job %s: %s asked %s to cancel it", info.id, who, info.agent)
        return info

    @_guarded
    async def ListJobs(
        self, request: admin_pb2.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListJobsResponse:
        self._auth.admin(context)
        jobs = await self._jobs.list(request.agent or None, request.limit or 100)
        return admin_pb2.ListJobsResponse(jobs=jobs)

    @_guarded_stream
    async def WatchJob(
        self, request: admin_pb2.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.JobInfo]:
        self._auth.admin(context)
        async for info in self._jobs.watch(request.job_id):
            yield info

    @_guarded
    async def ListSnapshots(
        self, request: admin_pb2.ListSnapshotsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListSnapshotsResponse:
        self._auth.admin(context)
        snaps = await asyncio.to_thread(
            self._store.list_snapshots, request.agent or None, request.source or None
        )
        return admin_pb2.ListSnapshotsResponse(snapshots=snaps)

    @_guarded
    async def GetSnapshot(
        self, request: admin_pb2.GetSnapshotRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.SnapshotInfo:
        self._auth.admin(context)
        info: common_pb2.SnapshotInfo = await asyncio.to_thread(
            self._store.get_snapshot, request.snapshot_id
        )
        return info

    @_guarded_stream
    async def ReadBlobs(  # type: ignore[override]  # DownloadResponse wire bytes: _register_raw_downloads
        self, request: admin_pb2.ReadBlobsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        # The admin may read any blob: the CLI holds the key and decrypts trees itself.
        self._auth.admin(context)
        # Few and small (trees): checked here too, so a damaged one is named with its pack.
        ids = wire.unpack_ids(request.ids)
        async for response in _stream_blobs(self._store, ids, verify=True):
            yield response

    @_guarded
    async def GetKeys(
        self, request: agent_pb2.GetKeysRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.GetKeysResponse:
        self._auth.admin(context)
        return await _get_keys(self._store, _check_key_ids(request.key_ids))

    @_guarded
    async def ListKeys(
        self, request: admin_pb2.ListKeysRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.GetKeysResponse:
        self._auth.admin(context)
        keys = await asyncio.to_thread(self._store.list_keys)
        return agent_pb2.GetKeysResponse(keys=keys)

    @_guarded
    async def UpdateKeys(
        self, request: admin_pb2.UpdateKeysRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.UpdateKeysResponse:
        who = self._auth.admin(context)
        keys = list(request.keys)
        _check_key_ids([k.key_id for k in keys])
        updated = await asyncio.to_thread(self._store.replace_keys, keys)
        log.info("%s replaced the wrapped form of %d data keys", who, updated)
        return admin_pb2.UpdateKeysResponse(updated=updated)

    @_guarded_stream
    async def Check(
        self, request: admin_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[admin_pb2.CheckEvent]:
        from coordinator import check as check_mod

        who = self._auth.admin(context)
        if request.read_data_percent > 100:
            raise errors.UsageError(
                f"read_data_percent must be 1..100, not {request.read_data_percent}"
            )
        percent = request.read_data_percent or None
        log.info(
            "check started by %s (read data: %s, subset: %s%%)", who, request.read_data, percent
        )
        it = iter(check_mod.check(self._store, request.read_data, percent))
        done = object()
        while (event := await asyncio.to_thread(next, it, done)) is not done:
            yield _check_event(event)


_CHECK_KINDS = {
    "progress": admin_pb2.CheckEvent.KIND_PROGRESS,
    "error": admin_pb2.CheckEvent.KIND_ERROR,
    "summary": admin_pb2.CheckEvent.KIND_SUMMARY,
}


def _check_event(event: Any) -> admin_pb2.CheckEvent:
    pack = getattr(event, "pack", "") or ""
    blob = getattr(event, "blob", b"") or b""
    return admin_pb2.CheckEvent(
        kind=_CHECK_KINDS.get(event.kind, admin_pb2.CheckEvent.KIND_UNSPECIFIED),
        message=event.message,
        pack=pack.hex() if isinstance(pack, bytes) else str(pack),
        blob=blob if isinstance(blob, bytes) else bytes.fromhex(blob),
        packs_done=getattr(event, "packs_done", 0) or 0,
        packs_total=getattr(event, "packs_total", 0) or 0,
        errors=getattr(event, "errors", 0) or 0,
    )


def server_credentials(source: CertSource) -> grpc.ServerCredentials:
    """mTLS credentials that follow `source`: each new handshake asks the fetcher, which
    hands gRPC the renewed certificate (and CA bundle) once per generation; connections
    already open, and the streams on them, are not touched (design.md §Identity)."""

    def config_of(material: tuple[bytes, bytes, bytes]) -> Any:
        ca, cert, key = material
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    served = [source.generation]
    initial = config_of(source.current())

    def fetch() -> Any:
        generation = source.generation
        if generation == served[0]:
            return None
        try:
            material = source.current()
        except errors.ClawbackError:
            return None
        served[0] = generation
        log.info("serving certificate generation %d to new connections", generation)
        return config_of(material)

    return grpc.dynamic_ssl_server_credentials(initial, fetch, require_client_authentication=True)


def build_server(
    config: CoordinatorConfig,
    store: Any,
    *,
    registry: Registry | None = None,
    jobs: JobManager | None = None,
    clock: Clock = SYSTEM,
    certs: CertSource | None = None,
) -> grpc.aio.Server:
    """A grpc.aio server with both services on `config.listen` over mutual TLS (not started).

    The bound port (useful with port 0) is `server.clawback_port`; the job
    manager and registry are `server.clawback_jobs` / `server.clawback_registry`.
    Certificates come from `certs` (default: the config's files): see `server_credentials`.
    Raises errors.Unavailable if the address cannot be bound.
    """
    registry = registry if registry is not None else Registry(clock)
    jobs = jobs if jobs is not None else JobManager(store, registry, clock)
    # Without SO_REUSEPORT a second coordinator on the same port fails instead of sharing it.
    server = grpc.aio.server(options=[*wire.SERVER_OPTIONS, ("grpc.so_reuseport", 0)])
    agents = AgentServicer(store, registry, jobs, config.heartbeat_interval_s, clock)
    admins = AdminServicer(store, registry, jobs, clock)
    agent_pb2_grpc.add_AgentServiceServicer_to_server(agents, server)
    admin_pb2_grpc.add_AdminServiceServicer_to_server(admins, server)
    _register_raw_downloads(server, agents, admins)
    _register_raw_uploads(server, agents)
    creds = server_credentials(certs if certs is not None else FileCertSource(config.tls))
    try:
        port = server.add_secure_port(config.listen, creds)
    except RuntimeError:
        port = 0
    if not port:
        raise errors.Unavailable(
            f"cannot listen on {config.listen}: the address is already in use or not available"
        )
    server.clawback_port = port
    server.clawback_registry = registry
    server.clawback_jobs = jobs
    return server


async def stop_server(server: grpc.aio.Server, grace: float) -> None:
    """Stop a server from `build_server`: end the agents' control streams (they never
    end by themselves), give calls `grace` seconds, then wait for blocking work still
    running in threads, so that the caller may close the store's catalog safely."""
    server.clawback_registry.close_all(grpc.StatusCode.UNAVAILABLE, "coordinator shutting down")
    await server.stop(grace)
    await asyncio.sleep(0)  # let cancelled handlers start their cleanup
    await asyncio.get_running_loop().shutdown_default_executor()
