"""A small synchronous client of the coordinator's AdminService (protocol v1, mTLS).

Every method raises a core.errors.ClawbackError: the coordinator's own error
class when it sent one (core.wire), `Unavailable` naming the address when it
cannot be reached, `TransportError` when it does not answer in time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar

import grpc

from core import errors
from core.certs import CertSource, FileCertSource
from core.format import ID_SIZE, MAX_IDS_PER_QUERY
from core.tls import TlsFiles
from core.wire import CHANNEL_OPTIONS, error_from_rpc
from protos.clawback.v1 import admin_pb2, admin_pb2_grpc, agent_pb2, common_pb2

T = TypeVar("T")

DEFAULT_TIMEOUT = 30.0


class Stream(Generic[T]):
    """A server stream: iterate it for messages; `cancel()` ends it from another thread."""

    def __init__(
        self, call: Any, translate: Callable[[grpc.RpcError], errors.ClawbackError]
    ) -> None:
        self._call = call
        self._translate = translate

    def __iter__(self) -> Iterator[T]:
        try:
            yield from self._call
        except grpc.RpcError as exc:
            raise self._translate(exc) from exc

    def cancel(self) -> None:
        self._call.cancel()


class AdminClient:
    """The CLI's connection to the coordinator; use as a context manager or call close()."""

    def __init__(
        self,
        address: str,
        tls: TlsFiles | CertSource,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        channel: grpc.Channel | None = None,
    ) -> None:
        self.address = address
        self.timeout = timeout
        if channel is None:
            source = FileCertSource(tls) if isinstance(tls, TlsFiles) else tls
            ca, cert, key = source.current()
            creds = grpc.ssl_channel_credentials(
                root_certificates=ca, private_key=key, certificate_chain=cert
            )
            channel = grpc.secure_channel(address, creds, options=CHANNEL_OPTIONS)
        self._channel = channel
        self._stub = admin_pb2_grpc.AdminServiceStub(channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- error translation ---------------------------------------------------

    def _translate(self, exc: grpc.RpcError, what: str = "") -> errors.ClawbackError:
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        detail = (exc.details() if hasattr(exc, "details") else "") or ""
        tagged = detail.startswith("[") and "] " in detail
        if code == grpc.StatusCode.UNAVAILABLE and not tagged:
            # Not the coordinator's own UNAVAILABLE (those carry a class tag): we never got through.
            return errors.Unavailable(f"coordinator at {self.address} is unreachable ({detail})")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return errors.TransportError(
                f"coordinator at {self.address} did not answer within {self.timeout:g} s"
            )
        if code == grpc.StatusCode.CANCELLED and not tagged:
            return errors.TransportError(f"call to the coordinator at {self.address} was cancelled")
        return error_from_rpc(exc, what)

    def _unary(self, method: str, request: Any, what: str = "") -> Any:
        try:
            return getattr(self._stub, method)(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise self._translate(exc, what) from exc

    def _stream(self, method: str, request: Any, what: str = "") -> Stream[Any]:
        call = getattr(self._stub, method)(request)
        return Stream(call, lambda exc: self._translate(exc, what))

    # -- AdminService ----------------------------------------------------------

    def init_repository(
        self,
        key_check: bytes,
        chunker: str = "",
        compression: str = "",
        cipher: str = "",
        paged_chunker: str = "",
        paged_files: Sequence[str] = (),
        paged_formats: Sequence[str] = (),
    ) -> common_pb2.RepoConfig:
        req = admin_pb2.InitRepositoryRequest(
            key_check=key_check,
            chunker=chunker,
            compression=compression,
            cipher=cipher,
            paged_chunker=paged_chunker,
            paged_files=paged_files,
            paged_formats=paged_formats,
        )
        result: common_pb2.RepoConfig = self._unary("InitRepository", req)
        return result

    def update_repository(
        self,
        compression: str = "",
        paged_chunker: str = "",
        paged_files: Sequence[str] = (),
        paged_formats: Sequence[str] = (),
    ) -> common_pb2.RepoConfig:
        req = admin_pb2.UpdateRepositoryRequest(
            compression=compression,
            paged_chunker=paged_chunker,
            paged_files=paged_files,
            paged_formats=paged_formats,
        )
        result: common_pb2.RepoConfig = self._unary("UpdateRepository", req)
        return result

    def get_repository(self) -> common_pb2.RepoConfig:
        result: common_pb2.RepoConfig = self._unary(
            "GetRepository", admin_pb2.GetRepositoryRequest()
        )
        return result

    def list_agents(self) -> list[admin_pb2.AgentInfo]:
        return list(self._unary("ListAgents", admin_pb2.ListAgentsRequest()).agents)

    def revoke_agent(self, name: str) -> admin_pb2.AgentInfo:
        result: admin_pb2.AgentInfo = self._unary(
            "RevokeAgent", admin_pb2.RevokeAgentRequest(name=name), f"agent {name}"
        )
        return result

    def start_backup(
        self, agent: str, sources: Sequence[str] = (), tags: Sequence[str] = ()
    ) -> list[common_pb2.JobInfo]:
        req = admin_pb2.StartBackupRequest(agent=agent, sources=list(sources), tags=list(tags))
        return list(self._unary("StartBackup", req).jobs)

    def start_restore(
        self,
        snapshot_id: str,
        agent: str,
        target: str,
        paths: Sequence[bytes] = (),
        overwrite: bool = False,
        grant: bytes = b"",
    ) -> common_pb2.JobInfo:
        req = admin_pb2.StartRestoreRequest(
            snapshot_id=snapshot_id,
            agent=agent,
            target=target,
            paths=list(paths),
            overwrite=overwrite,
            grant=grant,
        )
        result: common_pb2.JobInfo = self._unary("StartRestore", req)
        return result

    def get_job(self, job_id: str) -> common_pb2.JobInfo:
        result: common_pb2.JobInfo = self._unary(
            "GetJob", admin_pb2.GetJobRequest(job_id=job_id), f"job {job_id}"
        )
        return result

    def cancel_job(self, job_id: str) -> common_pb2.JobInfo:
        result: common_pb2.JobInfo = self._unary(
            "CancelJob", admin_pb2.CancelJobRequest(job_id=job_id), f"job {job_id}"
        )
        return result

    def list_jobs(self, agent: str = "", limit: int = 0) -> list[common_pb2.JobInfo]:
        return list(
            self._unary("ListJobs", admin_pb2.ListJobsRequest(agent=agent, limit=limit)).jobs
        )

    def watch_job(self, job_id: str) -> Stream[common_pb2.JobInfo]:
        return self._stream("WatchJob", admin_pb2.GetJobRequest(job_id=job_id), f"job {job_id}")

    def list_snapshots(self, agent: str = "", source: str = "") -> list[common_pb2.SnapshotInfo]:
        req = admin_pb2.ListSnapshotsRequest(agent=agent, source=source)
        return list(self._unary("ListSnapshots", req).snapshots)

    def get_snapshot(self, snapshot_id: str) -> common_pb2.SnapshotInfo:
        result: common_pb2.SnapshotInfo = self._unary(
            "GetSnapshot",
            admin_pb2.GetSnapshotRequest(snapshot_id=snapshot_id),
            f"snapshot {snapshot_id}",
        )
        return result

    def read_blobs(self, ids: Sequence[bytes]) -> Iterator[agent_pb2.BlobData]:
        """The sealed blobs for `ids` (any order); a blob that cannot be read has `error` set."""
        for start in range(0, len(ids), MAX_IDS_PER_QUERY):
            batch = ids[start : start + MAX_IDS_PER_QUERY]
            if any(len(i) != ID_SIZE for i in batch):
                raise errors.UsageError("blob ids are 32 bytes")
            stream: Stream[agent_pb2.DownloadResponse] = self._stream(
                "ReadBlobs", admin_pb2.ReadBlobsRequest(ids=b"".join(batch)), "reading blobs"
            )
            for response in stream:
                yield from response.blobs

    def get_keys(self, key_ids: Sequence[bytes]) -> list[common_pb2.WrappedKey]:
        req = agent_pb2.GetKeysRequest(key_ids=list(key_ids))
        return list(self._unary("GetKeys", req, "fetching wrapped keys").keys)

    def list_keys(self) -> list[common_pb2.WrappedKey]:
        return list(
            self._unary("ListKeys", admin_pb2.ListKeysRequest(), "listing wrapped keys").keys
        )

    def put_keys(self, keys: Sequence[common_pb2.WrappedKey]) -> int:
        """Replace the wrapped form of stored keys (after a rewrap); returns how many changed."""
        req = admin_pb2.UpdateKeysRequest(keys=list(keys))
        return int(self._unary("UpdateKeys", req, "storing rewrapped keys").updated)

    def check(
        self, read_data: bool = False, read_data_percent: int = 0
    ) -> Stream[admin_pb2.CheckEvent]:
        req = admin_pb2.CheckRequest(read_data=read_data, read_data_percent=read_data_percent)
        return self._stream("Check", req, "check")
