"""Fixtures for agent tests: a RepoClient that is a thin adapter over the real coordinator BlobStore."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent import backup as backup_mod
from agent.repo import Blob, UploadStats
from coordinator.catalog import SqliteCatalog
from coordinator.pack import pack_path
from coordinator.storage import LocalBackend
from coordinator.store import BlobStore
from core import wire
from core.errors import UsageError
from core.format import MAX_IDS_PER_QUERY, RepoConfig, new_repo_id
from core.keys import FileKeyProvider, create_key_file
from protos.clawback.v1 import common_pb2


class StoreUpload:
    """UploadStream over one BlobStore upload session (calls run in a thread, one at a time)."""

    def __init__(self, repo: StoreRepo, session: object) -> None:
        self._repo = repo
        self._session = session
        self._lock = asyncio.Lock()

    async def send_message(self, message: bytes) -> None:
        blobs = [Blob(i, t, bytes(e)) for i, t, e in wire.parse_upload(message)[1]]

        def add() -> None:
            for b in blobs:
                assert b.envelope is not None
                self._repo.sent.append((b.id, b.type))
                self._session.add(b.id, b.type, b.envelope)  # type: ignore[attr-defined]

        async with self._lock:
            await asyncio.to_thread(add)

    async def close(self) -> UploadStats:
        async with self._lock:
            s = await asyncio.to_thread(self._session.finish)  # type: ignore[attr-defined]
        return UploadStats(s.blobs_stored, s.blobs_duplicate, s.bytes_stored, s.packs_written)

    async def abort(self) -> None:
        await asyncio.to_thread(self._session.abort)  # type: ignore[attr-defined]


@dataclass
class StoreRepo:
    """RepoClient (agent/repo.py) backed directly by coordinator.store.BlobStore."""

    store: BlobStore
    sent: list[tuple[bytes, int]] = field(default_factory=list)
    missing_calls: int = 0
    downloaded: list[bytes] = field(default_factory=list)
    tamper: Callable[[bytes, bytes], bytes] | None = None  # (id, envelope) -> envelope served

    async def missing(self, ids: Sequence[bytes]) -> list[bool]:
        if len(ids) > MAX_IDS_PER_QUERY:
            raise UsageError("too many ids in one MissingBlobs")
        self.missing_calls += 1
        return await asyncio.to_thread(self.store.missing, list(ids))

    async def open_upload(self, job_id: str) -> StoreUpload:
        return StoreUpload(self, await asyncio.to_thread(self.store.upload))

    async def download(self, job_id: str, ids: Sequence[bytes]) -> AsyncIterator[Blob]:
        items = await asyncio.to_thread(lambda: list(self.store.read_blobs(list(ids))))
        for bid, btype, env, err in items:
            self.downloaded.append(bid)
            if env is not None and self.tamper is not None:
                env = self.tamper(bid, env)
            yield Blob(bid, btype, env, err)

    async def put_keys(self, keys: Sequence[common_pb2.WrappedKey]) -> None:
        await asyncio.to_thread(self.store.put_keys, list(keys))

    async def get_keys(self, job_id: str, key_ids: Sequence[bytes]) -> list[common_pb2.WrappedKey]:
        return await asyncio.to_thread(self.store.get_keys, list(key_ids))

    async def commit(self, info: common_pb2.SnapshotInfo, refs: Sequence[bytes]) -> bool:
        return await asyncio.to_thread(self.store.commit_snapshot, info, list(refs))

    def data_sent(self) -> list[bytes]:
        return [i for i, t in self.sent if t == common_pb2.BLOB_TYPE_DATA]

    def corrupt_on_disk(self, blob_id: bytes) -> None:
        """Flip one byte of a stored envelope inside its pack file."""
        loc = self.store.catalog.blob_locations([blob_id])[blob_id]
        path = Path(self.store.backend.root) / pack_path(loc.pack)  # type: ignore[attr-defined]
        with open(path, "r+b") as f:
            f.seek(loc.offset + loc.length // 2)
            b = f.read(1)
            f.seek(loc.offset + loc.length // 2)
            f.write(bytes([b[0] ^ 0xFF]))


@pytest.fixture(autouse=True)
def files_cache_trusts_fresh_files(
    monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    """These tests write files and back them up within milliseconds; with the real racy
    window (agent/backup.py RACY_WINDOW_NS, 2 s) none of them would go into the files cache.
    The window is 0 here, except in tests marked `racy_window`, which test it."""
    if request.node.get_closest_marker("racy_window") is None:
        monkeypatch.setattr(backup_mod, "RACY_WINDOW_NS", 0)


@dataclass
class Env:
    repo: StoreRepo
    keys: FileKeyProvider
    cfg: RepoConfig
    cache_dir: Path
    key_path: Path
    tmp: Path


def make_env(tmp_path: Path) -> Env:
    """A fresh repository (LocalBackend + SqliteCatalog) and a development key file under `tmp_path`."""
    key_path = tmp_path / "keys" / "clawback.key"
    kc = create_key_file(key_path)
    catalog = SqliteCatalog(tmp_path / "catalog.db")
    store = BlobStore(LocalBackend(tmp_path / "repo"), catalog)
    cfg = (
        store.init_repository(RepoConfig(repo_id=new_repo_id(), key_check=kc.hex()))
        or store.config()
    )
    return Env(
        StoreRepo(store), FileKeyProvider(key_path), cfg, tmp_path / "state", key_path, tmp_path
    )


def close_env(e: Env) -> None:
    with contextlib.suppress(Exception):
        e.repo.store.catalog.close()


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = make_env(tmp_path)
    yield e
    close_env(e)


def _xattrs_work(path: Path) -> bool:
    probe = path / f".xattr-probe-{uuid.uuid4().hex}"
    probe.write_bytes(b"")
    try:
        os.setxattr(probe, b"user.probe", b"1")
        return True
    except OSError:
        return False
    finally:
        probe.unlink()


@pytest.fixture
def workdir(tmp_path: Path, ext4_fs: Callable[[int], Path]) -> Path:
    """A scratch directory on a filesystem that takes user.* xattrs (a loop-mounted ext4 image if needed)."""
    base = tmp_path / "work"
    base.mkdir()
    if _xattrs_work(base):
        return base
    if os.geteuid() != 0:
        pytest.skip("user xattrs unsupported here and not root to mount an ext4 image")
    return ext4_fs(4096)
