"""What the backup and restore pipelines need from the coordinator, as one narrow async interface.

`agent/client.py` implements it over gRPC (protocol v1). Every method raises
a `core.errors.ClawbackError` subclass: `TransportError` when the coordinator
cannot be reached (callers may retry), `PermissionDenied`, `ResourceExhausted`
(coordinator disk full), `NotFound`, `UsageError` for a refused message.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from protos.clawback.v1 import common_pb2


@dataclass(frozen=True)
class Blob:
    """A sealed blob on its way to or from the coordinator."""

    id: bytes
    type: int  # common_pb2.BLOB_TYPE_DATA / BLOB_TYPE_TREE
    envelope: bytes | None  # None on download when `error` is set
    error: str = ""


@dataclass(frozen=True)
class UploadStats:
    blobs_stored: int = 0
    blobs_duplicate: int = 0
    bytes_stored: int = 0
    packs_written: int = 0


class UploadStream(Protocol):
    async def send_message(self, message: bytes) -> None:
        """Queue sealed blobs in wire form, an UploadRequest's BlobData fields without the
        job id (agent/client.py UploadBuilder); waits when the stream is congested
        (back-pressure)."""

    async def close(self) -> UploadStats:
        """End the stream; returns once every blob sent is durable on the coordinator."""

    async def abort(self) -> None:
        """Cancel the stream; blobs in packs the coordinator completed stay stored."""


class RepoClient(Protocol):
    async def missing(self, ids: Sequence[bytes]) -> list[bool]:
        """For each id (at most core.format.MAX_IDS_PER_QUERY), True if the repository lacks it."""

    async def open_upload(self, job_id: str) -> UploadStream: ...

    def download(self, job_id: str, ids: Sequence[bytes]) -> AsyncIterator[Blob]:
        """Sealed blobs for a restore job, in any order; unreadable ones carry `error`."""

    async def put_keys(self, keys: Sequence[common_pb2.WrappedKey]) -> None: ...

    async def get_keys(
        self, job_id: str, key_ids: Sequence[bytes]
    ) -> list[common_pb2.WrappedKey]: ...

    async def commit(self, info: common_pb2.SnapshotInfo, refs: Sequence[bytes]) -> bool:
        """Make a snapshot visible; True if it had already been committed (a retry)."""
