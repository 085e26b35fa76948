"""The job manager: creates backup and restore jobs, follows their updates and authorizes restores."""

from __future__ import annotations

import asyncio
import logging
import posixpath
import secrets
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from coordinator.registry import Registry
from core import wire
from core.clock import SYSTEM, Clock
from core.errors import NotFound, PermissionDenied, Unavailable, UsageError
from protos.clawback.v1 import agent_pb2, common_pb2

log = logging.getLogger(__name__)

TERMINAL = frozenset(
    {
        common_pb2.JOB_STATE_SUCCEEDED,
        common_pb2.JOB_STATE_PARTIAL,
        common_pb2.JOB_STATE_FAILED,
        common_pb2.JOB_STATE_CANCELLED,
    }
)
CAP_BACKUP_VOLUME = "backup.volume.v1"
CAP_RESTORE = "restore.v1"
MAX_WARNINGS = 100  # JobInfo.warnings keeps the first N


def is_terminal(state: int) -> bool:
    return state in TERMINAL


def new_job_id() -> str:
    return secrets.token_hex(16)


@dataclass(eq=False)
class _Active:
    """A job that has not ended: its latest state and the waiters watching it."""

    info: common_pb2.JobInfo
    restore_snapshot: str = ""  # restore jobs: the snapshot the agent may read
    refs: frozenset[bytes] | None = None  # loaded on the first download
    version: int = 0
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # serializes writes to the catalog


class JobManager:
    """Jobs live in the catalog; the ones still running are also held here.

    Must be used from one event loop. Catalog and store calls (blocking) run
    in threads. A job's terminal state is final: later updates are ignored.
    """

    def __init__(self, store: Any, registry: Registry, clock: Clock = SYSTEM) -> None:
        self._store = store
        self._catalog = store.catalog
        self._registry = registry
        self._clock = clock
        self._active: dict[str, _Active] = {}

    # -- creating jobs -------------------------------------------------------
    async def start_backup(
        self, agent: str, sources: Sequence[str] = (), tags: Sequence[str] = ()
    ) -> list[common_pb2.JobInfo]:
        """One job per source (all of the agent's sources if none named).

        Raises Unavailable if the agent is not connected, NotFound for a source
        it did not declare, UsageError if it cannot back up that kind of source.
        """
        session = self._registry.require(agent)
        names = list(dict.fromkeys(sources)) or [s.name for s in session.sources]
        if not names:
            raise NotFound(f"agent {agent} declared no sources")
        for name in names:
            spec = session.source(name)
            if spec is None:
                known = ", ".join(s.name for s in session.sources) or "none"
                raise NotFound(f"agent {agent} has no source {name!r} (it has: {known})")
            if (
                spec.kind != common_pb2.SOURCE_KIND_VOLUME
                or CAP_BACKUP_VOLUME not in session.capabilities
            ):
                raise UsageError(f"agent {agent} cannot back up source {name!r} of this kind")
        # Sent with every backup: the config may have changed since the agent's Welcome
        # (UpdateRepository), and the next backup cuts by the new one.
        repo = wire.repo_config_to_wire(await asyncio.to_thread(self._store.config))
        jobs = []
        for name in names:
            parent = await asyncio.to_thread(self._catalog.latest_snapshot, agent, name)
            info = self._new_info(common_pb2.JOB_KIND_BACKUP, agent, name)
            command = agent_pb2.Command(
                job_id=info.id,
                backup=agent_pb2.BackupCommand(
                    source=name,
                    parent=parent.id if parent is not None else "",
                    tags=list(tags),
                    repo=repo,
                ),
            )
            jobs.append(await self._launch(_Active(info), command))
        return jobs

    async def start_restore(
        self,
        snapshot: str,
        agent: str,
        target: str,
        paths: Sequence[bytes] = (),
        overwrite: bool = False,
        grant: bytes = b"",
    ) -> common_pb2.JobInfo:
        """Restore a snapshot (unique id prefix) onto any connected agent: an operator decision.

        `grant` (a response-wrapped Vault token) is passed to the agent untouched: the
        coordinator cannot use it without unwrapping it, which the agent would then notice."""
        if not target or not posixpath.isabs(target):
            raise UsageError(f"restore target must be an absolute path, not {target!r}")
        for p in paths:
            if p.startswith(b"/") or b"\0" in p or b".." in p.split(b"/"):
                raise UsageError(f"restore path {p!r} must be relative to the snapshot root")
        session = self._registry.require(agent)
        if CAP_RESTORE not in session.capabilities:
            raise UsageError(f"agent {agent} does not support restores")
        info_s = await asyncio.to_thread(self._store.get_snapshot, snapshot)
        info = self._new_info(common_pb2.JOB_KIND_RESTORE, agent, info_s.source)
        info.snapshot_id = info_s.id
        command = agent_pb2.Command(
            job_id=info.id,
            restore=agent_pb2.RestoreCommand(
                snapshot=info_s, paths=list(paths), target=target, overwrite=overwrite, grant=grant
            ),
        )
        return await self._launch(_Active(info, restore_snapshot=info_s.id), command)

    def _new_info(self, kind: int, agent: str, source: str) -> common_pb2.JobInfo:
        now = self._clock.now_ns()
        return common_pb2.JobInfo(
            id=new_job_id(),
            kind=kind,  # type: ignore[arg-type]
            agent=agent,
            source=source,
            state=common_pb2.JOB_STATE_PENDING,
            created_ns=now,
            updated_ns=now,
        )

    async def _launch(self, active: _Active, command: agent_pb2.Command) -> common_pb2.JobInfo:
        info = active.info
        await asyncio.to_thread(self._catalog.put_job, _copy(info))
        self._active[info.id] = active
        try:
            self._registry.send(info.agent, command)
        except Unavailable as exc:
            await self._finish(active, common_pb2.JOB_STATE_FAILED, str(exc))
            raise
        log.info(
            "job %s: %s of %s/%s sent",
            info.id,
            common_pb2.JobKind.Name(info.kind),
            info.agent,
            info.source,
        )
        return _copy(info)

    # -- following jobs ------------------------------------------------------
    async def apply_update(self, agent: str, update: agent_pb2.JobUpdate) -> bool:
        """Apply a JobUpdate sent by `agent`; updates for jobs not assigned to it are ignored."""
        active = self._active.get(update.job_id)
        if active is None or active.info.agent != agent:
            log.warning(
                "agent %s sent an update for job %s, which it does not run", agent, update.job_id
            )
            return False
        state = update.state
        if state in (common_pb2.JOB_STATE_UNSPECIFIED, common_pb2.JOB_STATE_PENDING):
            state = active.info.state
        async with active.lock:
            if is_terminal(active.info.state):
                return False
            info = active.info
            info.state = state
            if update.HasField("progress"):
                info.progress.CopyFrom(update.progress)
            if update.error:
                info.error = update.error
            if update.snapshot_id and info.kind == common_pb2.JOB_KIND_BACKUP:
                info.snapshot_id = update.snapshot_id
            if update.warnings:
                room = MAX_WARNINGS - len(info.warnings)
                info.warnings.extend(list(update.warnings)[: max(room, 0)])
            info.updated_ns = self._clock.now_ns()
            await self._persist(active)
        if is_terminal(state):
            log.info("job %s: %s %s", update.job_id, common_pb2.JobState.Name(state), info.error)
        return True

    async def agent_disconnected(self, agent: str) -> None:
        """design.md §Control stream: jobs of a disconnected agent are marked FAILED."""
        for active in [a for a in self._active.values() if a.info.agent == agent]:
            await self._finish(active, common_pb2.JOB_STATE_FAILED, "agent disconnected")

    async def fail_orphans(self, reason: str = "coordinator restarted") -> int:
        """At start: jobs left unfinished by an earlier coordinator process can never end; fail them."""
        jobs = await asyncio.to_thread(self._catalog.list_jobs, None, 1_000_000)
        n = 0
        for job in jobs:
            if not is_terminal(job.state) and job.id not in self._active:
                job.state = common_pb2.JOB_STATE_FAILED
                job.error = reason
                job.updated_ns = self._clock.now_ns()
                await asyncio.to_thread(self._catalog.put_job, job)
                n += 1
        return n

    async def _finish(
        self, active: _Active, state: common_pb2.JobState.ValueType, error: str
    ) -> None:
        async with active.lock:
            if is_terminal(active.info.state):
                return
            active.info.state = state
            active.info.error = error
            active.info.updated_ns = self._clock.now_ns()
            await self._persist(active)
        log.info("job %s: %s: %s", active.info.id, common_pb2.JobState.Name(state), error)

    async def _persist(self, active: _Active) -> None:
        """Write the job (caller holds active.lock), then wake its watchers."""
        snapshot = _copy(active.info)
        try:
            await asyncio.to_thread(self._catalog.put_job, snapshot)
        finally:
            if is_terminal(snapshot.state):
                self._active.pop(snapshot.id, None)
            async with active.changed:
                active.version += 1
                active.changed.notify_all()

    # -- reading jobs ----------------------------------------------------------
    async def cancel(self, job_id: str) -> common_pb2.JobInfo:
        """Ask the agent running a job to stop it (design.md §Control stream); the agent's
        CANCELLED update ends the job. A job that has ended is returned as it is."""
        info = await self.get(job_id)
        active = self._active.get(info.id)
        if active is None or is_terminal(active.info.state):
            return info
        self._registry.send(
            info.agent, agent_pb2.Command(job_id=info.id, cancel=agent_pb2.CancelCommand())
        )
        return _copy(active.info)

    async def get(self, job_id: str) -> common_pb2.JobInfo:
        """By full id or unique prefix (as `clawback jobs` shows them)."""
        active = self._active.get(job_id)
        if active is not None:
            return _copy(active.info)
        job: common_pb2.JobInfo = await asyncio.to_thread(self._catalog.get_job, job_id)
        active = self._active.get(job.id)  # running: its latest state, not the stored one
        return _copy(active.info) if active is not None else job

    async def list(self, agent: str | None = None, limit: int = 100) -> list[common_pb2.JobInfo]:
        jobs: list[common_pb2.JobInfo] = await asyncio.to_thread(
            self._catalog.list_jobs, agent, limit
        )
        return [_copy(self._active[j.id].info) if j.id in self._active else j for j in jobs]

    async def watch(self, job_id: str) -> AsyncIterator[common_pb2.JobInfo]:
        """The job now, then at each change, ending after a terminal state."""
        active = self._active.get(job_id)
        if active is None:
            info = await self.get(job_id)  # a prefix, or a job that has ended
            active = self._active.get(info.id)
            if active is None:
                yield info
                return
        seen = -1
        while True:
            async with active.changed:
                while active.version == seen:
                    await active.changed.wait()
                seen, info = active.version, _copy(active.info)
            yield info
            if is_terminal(info.state):
                return

    # -- authorizing restores ----------------------------------------------------
    def _restore_job(self, agent: str, job_id: str) -> _Active:
        active = self._active.get(job_id)
        if (
            active is None
            or active.info.agent != agent
            or active.info.kind != common_pb2.JOB_KIND_RESTORE
            or not active.restore_snapshot
        ):
            raise PermissionDenied(f"agent {agent} has no active restore job {job_id!r}")
        return active

    def authorize_keys(self, agent: str, job_id: str) -> None:
        """GetKeys needs an active restore job of the calling agent (design.md §Blob traffic)."""
        self._restore_job(agent, job_id)

    async def authorize_download(self, agent: str, job_id: str, ids: Sequence[bytes]) -> None:
        """Allow only ids that the snapshot of the agent's active restore job references."""
        active = self._restore_job(agent, job_id)
        if active.refs is None:
            async with active.lock:
                if active.refs is None:
                    active.refs = await asyncio.to_thread(
                        self._store.snapshot_refs, active.restore_snapshot
                    )
        refs = active.refs
        assert refs is not None
        outside = sum(1 for i in ids if i not in refs)
        if outside:
            raise PermissionDenied(
                f"{outside} of {len(ids)} requested blobs are not referenced by snapshot "
                f"{active.restore_snapshot} of restore job {job_id}"
            )


def _copy(info: common_pb2.JobInfo) -> common_pb2.JobInfo:
    out = common_pb2.JobInfo()
    out.CopyFrom(info)
    return out
