"""The agent's control loop: dial the coordinator, register, run the commands it pushes, reconnect on failure."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from agent.backup import run_backup
from agent.client import ChannelPool, GrpcRepoClient, open_sync_channel
from agent.config import AgentConfig
from agent.restore import run_restore
from core import PROTOCOL_VERSION, __version__, errors, systemd, wire
from core.certs import CertSource, FileCertSource
from core.chunkid import key_check
from core.clock import SYSTEM, Clock
from core.format import RepoConfig
from core.keys import KeyProvider
from core.memory import trim_malloc
from core.vaultkeys import VaultKeyProvider
from core.wire import error_from_rpc
from protos.clawback.v1 import agent_pb2, agent_pb2_grpc, common_pb2

log = logging.getLogger("clawback.agent")


CAPABILITIES = ("backup.volume.v1", "restore.v1")
CONNECT_TIMEOUT_S = 10.0  # a job waits this long for its channel to connect before its first call
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.5, 30.0


class Session:
    """One connected control stream: its outgoing queue and the jobs it runs."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.outgoing: asyncio.Queue[agent_pb2.AgentMessage] = asyncio.Queue()
        self.jobs: dict[str, asyncio.Task[None]] = {}

    def send(self, msg: agent_pb2.AgentMessage) -> None:
        """Queue a message; safe from worker threads (callbacks keep their order)."""
        self.loop.call_soon_threadsafe(self.outgoing.put_nowait, msg)

    def update(self, job_id: str, state: common_pb2.JobState.ValueType, **fields: Any) -> None:
        self.send(
            agent_pb2.AgentMessage(
                job_update=agent_pb2.JobUpdate(job_id=job_id, state=state, **fields)
            )
        )


class AgentDaemon:
    """The node daemon. Certificates come from `certs` (default: the config's files).

    Hot reload (design.md §Identity): the control stream and each job lease a
    channel from a ChannelPool; after a certificate renewal, new leases get a
    channel with the new certificate while running streams keep their connection.
    """

    def __init__(
        self,
        config: AgentConfig,
        keys: KeyProvider,
        clock: Clock = SYSTEM,
        certs: CertSource | None = None,
    ) -> None:
        self.config = config
        self.keys = keys
        self.clock = clock
        self.hostname = socket.gethostname()
        self.certs = certs if certs is not None else FileCertSource(config.tls)
        self.channels = ChannelPool(
            config.coordinator, self.certs, config.download_window_mib * 1024 * 1024
        )

    async def run(self) -> None:
        """Serve until cancelled; reconnect with jittered exponential backoff."""
        # Ready means running: the coordinator may be unreachable for a long time.
        systemd.notify("READY=1")
        systemd.notify(f"STATUS=connecting to {self.config.coordinator}")
        backoff = BACKOFF_MIN_S
        while True:
            try:
                await self._connect_once()
                backoff = BACKOFF_MIN_S
            except (errors.KeyMaterialError, errors.PermissionDenied):
                raise  # not fixed by retrying: the operator must act
            except errors.ClawbackError as exc:
                log.warning("coordinator session ended: %s; retrying in %.1fs", exc, backoff)
                systemd.notify(f"STATUS=disconnected ({exc}); retrying")
            await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _connect_once(self) -> None:
        session = Session(asyncio.get_running_loop())
        try:
            async with self.channels.lease() as channel:
                await self._control(session, channel)
        finally:
            for task in session.jobs.values():
                task.cancel()
            await asyncio.gather(*session.jobs.values(), return_exceptions=True)
            await self.channels.reset()

    async def _control(self, session: Session, channel: grpc.aio.Channel) -> None:
        """One control stream on `channel` until it ends (design.md §Control stream)."""
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        hello = agent_pb2.Hello(
            protocol_version=PROTOCOL_VERSION,
            agent_version=__version__,
            capabilities=CAPABILITIES,
            sources=[
                common_pb2.SourceSpec(
                    name=s.name,
                    kind=common_pb2.SOURCE_KIND_VOLUME,
                    path=str(s.path),
                    driver=s.driver,
                )
                for s in self.config.sources
            ],
            hostname=self.hostname,
            key_check=key_check(await asyncio.to_thread(self.keys.id_key)),
        )

        async def requests() -> AsyncIterator[agent_pb2.AgentMessage]:
            yield agent_pb2.AgentMessage(hello=hello)
            while True:
                yield await session.outgoing.get()

        call = stub.Control(requests())
        try:
            first = await call.read()
            if first is grpc.aio.EOF or not first.HasField("welcome"):
                raise errors.TransportError(
                    "coordinator closed the control stream without a Welcome"
                )
            welcome = first.welcome
            repo_cfg = wire.repo_config_from_wire(welcome.repo)
            log.info(
                "registered as %s with coordinator %s (repository %s, capabilities %s)",
                welcome.agent,
                self.config.coordinator,
                repo_cfg.repo_id,
                ",".join(welcome.capabilities),
            )
            systemd.notify(f"STATUS=connected to {self.config.coordinator} as {welcome.agent}")
            heartbeat = asyncio.create_task(
                self._heartbeats(session, welcome.heartbeat_interval_s or 10)
            )
            try:
                while (msg := await call.read()) is not grpc.aio.EOF:
                    if msg.HasField("command"):
                        self._dispatch(session, repo_cfg, welcome.agent, msg.command)
            finally:
                heartbeat.cancel()
            raise errors.TransportError("coordinator ended the control stream")
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, "control stream") from exc

    async def _heartbeats(self, session: Session, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            session.send(
                agent_pb2.AgentMessage(
                    heartbeat=agent_pb2.Heartbeat(
                        sent_ns=self.clock.now_ns(), running_jobs=list(session.jobs)
                    )
                )
            )

    def _dispatch(
        self,
        session: Session,
        repo_cfg: RepoConfig,
        me: str,
        cmd: agent_pb2.Command,
    ) -> None:
        kind = cmd.WhichOneof("cmd")
        if kind == "cancel":
            task = session.jobs.get(cmd.job_id)
            if task is not None:
                task.cancel()
            return
        if kind not in ("backup", "restore"):
            session.update(
                cmd.job_id,
                common_pb2.JOB_STATE_FAILED,
                error=f"command {kind!r} is not supported by this agent",
            )
            return
        if cmd.job_id in session.jobs:
            return  # a duplicate delivery
        task = asyncio.create_task(self._job(session, repo_cfg, me, cmd))
        session.jobs[cmd.job_id] = task
        job_id = cmd.job_id
        task.add_done_callback(lambda _t: session.jobs.pop(job_id, None))

    async def _job(
        self, session: Session, repo_cfg: RepoConfig, me: str, cmd: agent_pb2.Command
    ) -> None:
        """Run one job on a channel of its own lease: the current certificate's (a new
        connection after a renewal), kept until the job ends even if the certificate renews."""
        kind, job_id = cmd.WhichOneof("cmd"), cmd.job_id
        try:
            async with self.channels.lease() as channel:
                # Connect now, while the certificate is fresh: a job's first call on this
                # channel may come after its certificate expired (uploads go on the sync
                # channel; the wrapped keys and the commit come last), and a handshake with
                # an expired certificate is refused. The established connection stays up.
                # Bounded: with no coordinator the job's first call fails with the reason.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(channel.channel_ready(), CONNECT_TIMEOUT_S)
                # A backup's uploads go on a synchronous channel of their own (same
                # certificate), fed straight from the sealing threads.
                uploads = (
                    open_sync_channel(self.channels.address, self.channels.source)
                    if kind == "backup"
                    else None
                )
                try:
                    repo = GrpcRepoClient(channel, uploads)
                    if kind == "backup":
                        await self._backup(session, repo, repo_cfg, me, cmd)
                    else:
                        await self._restore(session, repo, repo_cfg, cmd)
                finally:
                    if uploads is not None:
                        uploads.close()
                    await asyncio.to_thread(trim_malloc)
        except asyncio.CancelledError:
            log.info("job %s: %s cancelled", job_id, kind)
            session.update(job_id, common_pb2.JOB_STATE_CANCELLED, error="cancelled")
            raise
        except errors.ClawbackError as exc:
            log.error("job %s: %s failed: %s", job_id, kind, exc)
            session.update(job_id, common_pb2.JOB_STATE_FAILED, error=str(exc))
        except Exception as exc:  # a bug: report it rather than die silently
            log.exception("job %s: %s crashed", job_id, kind)
            session.update(job_id, common_pb2.JOB_STATE_FAILED, error=f"internal error: {exc!r}")

    def _progress_sink(self, session: Session, job_id: str) -> Any:
        """Progress as JobUpdates (the pipelines throttle: agent/progress.py)."""

        def on_progress(p: common_pb2.Progress) -> None:
            session.update(job_id, common_pb2.JOB_STATE_RUNNING, progress=p)

        return on_progress

    async def _backup(
        self,
        session: Session,
        repo: GrpcRepoClient,
        repo_cfg: RepoConfig,
        me: str,
        cmd: agent_pb2.Command,
    ) -> None:
        job_id, b = cmd.job_id, cmd.backup
        src = self.config.source(b.source)
        if src is None:
            session.update(
                job_id, common_pb2.JOB_STATE_FAILED, error=f"agent has no source {b.source!r}"
            )
            return
        if b.HasField("repo"):
            # The config as the job started: it may have changed since the Welcome
            # (`clawback repo set`). run_backup checks its key check against the id key as
            # it does the Welcome's.
            repo_cfg = wire.repo_config_from_wire(b.repo)
        session.update(job_id, common_pb2.JOB_STATE_RUNNING)
        log.info("job %s: backing up source %s (%s)", job_id, src.name, src.path)
        if not src.path.is_dir():
            raise errors.NotFound(f"source {src.name}: {src.path} is not a directory")
        result = await run_backup(
            repo,
            self.keys,
            repo_cfg,
            src.path,
            agent=me,
            source=src.name,
            job_id=job_id,
            cache_dir=self.config.state_dir / "cache",
            parent=b.parent,
            tags=list(b.tags),
            hostname=self.hostname,
            on_progress=self._progress_sink(session, job_id),
            workers=self.config.workers,
            clock=self.clock,
        )
        state = common_pb2.JOB_STATE_PARTIAL if result.partial else common_pb2.JOB_STATE_SUCCEEDED
        log.info(
            "job %s: snapshot %s committed (%s)",
            job_id,
            result.info.id,
            "partial" if result.partial else "complete",
        )
        session.update(
            job_id,
            state,
            snapshot_id=result.info.id,
            warnings=result.warnings[:100],
            progress=_final_progress(result.info),
        )

    async def _restore_keys(self, grant: bytes) -> KeyProvider:
        if not grant:
            return self.keys  # a standby site's restore role, or the file provider
        return await asyncio.to_thread(_grant_provider, self.keys, grant)

    async def _restore(
        self, session: Session, repo: GrpcRepoClient, repo_cfg: RepoConfig, cmd: agent_pb2.Command
    ) -> None:
        job_id, r = cmd.job_id, cmd.restore
        session.update(job_id, common_pb2.JOB_STATE_RUNNING)
        log.info("job %s: restoring snapshot %s to %s", job_id, r.snapshot.id, r.target)
        keys = await self._restore_keys(r.grant)
        result = await run_restore(
            repo,
            keys,
            repo_cfg,
            r.snapshot,
            _target_path(r.target),
            job_id=job_id,
            paths=list(r.paths),
            overwrite=r.overwrite,
            on_progress=self._progress_sink(session, job_id),
            workers=self.config.workers,
        )
        progress = common_pb2.Progress(
            files_done=result.files,
            files_total=result.files,
            bytes_done=result.bytes,
            bytes_total=result.bytes,
            errors=len(result.errors),
        )
        if result.errors:
            log.warning("job %s: restore finished with %d errors", job_id, len(result.errors))
            session.update(
                job_id,
                common_pb2.JOB_STATE_PARTIAL,
                snapshot_id=r.snapshot.id,
                warnings=result.errors[:100],
                progress=progress,
                error=f"{len(result.errors)} entries could not be restored",
            )
        else:
            session.update(
                job_id, common_pb2.JOB_STATE_SUCCEEDED, snapshot_id=r.snapshot.id, progress=progress
            )


def _grant_provider(keys: KeyProvider, grant: bytes) -> KeyProvider:
    """A provider acting with a restore grant: unwrapped here, once (design.md §Keys)."""
    if not isinstance(keys, VaultKeyProvider):
        raise errors.KeyMaterialError("a restore grant needs the vault key provider on this agent")
    token = keys.client.unwrap_grant(grant.decode("ascii", "replace"))
    return keys.for_grant(token)


def _final_progress(info: common_pb2.SnapshotInfo) -> common_pb2.Progress:
    s = info.stats
    return common_pb2.Progress(
        files_done=s.files,
        files_total=s.files,
        bytes_done=s.bytes,
        bytes_total=s.bytes,
        bytes_uploaded=s.bytes_new,
        blobs_new=s.blobs_new,
        files_unchanged=s.files_unchanged,
        errors=s.errors,
    )


def _target_path(target: str) -> Path:
    if not target.startswith("/"):
        raise errors.UsageError(f"restore target must be an absolute path, not {target!r}")
    return Path(target)
