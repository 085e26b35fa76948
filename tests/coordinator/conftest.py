"""Shared fixtures for the coordinator tests: backends, catalogs, a store, a tiny full disk."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import blake3
import pytest

from coordinator.catalog import SqliteCatalog
from coordinator.storage import Backend, LocalBackend
from coordinator.store import BlobStore
from core.clock import ManualClock

BACKENDS: dict[str, Callable[[Path], Backend]] = {"local": LocalBackend}
CATALOGS: dict[str, Callable[[Path], SqliteCatalog]] = {
    "sqlite": lambda d: SqliteCatalog(d / "catalog.db")
}


@pytest.fixture(params=sorted(BACKENDS))
def make_backend(request: pytest.FixtureRequest) -> Callable[[Path], Backend]:
    return BACKENDS[request.param]


@pytest.fixture
def backend(make_backend: Callable[[Path], Backend], tmp_path: Path) -> Backend:
    return make_backend(tmp_path / "repo")


@pytest.fixture(params=sorted(CATALOGS))
def catalog(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqliteCatalog]:
    cat = CATALOGS[request.param](tmp_path)
    yield cat
    cat.close()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def store(tmp_path: Path, clock: ManualClock) -> Iterator[BlobStore]:
    cat = SqliteCatalog(tmp_path / "store-catalog.db")
    yield BlobStore(LocalBackend(tmp_path / "repo"), cat, pack_size=64 * 1024, clock=clock)
    cat.close()


TEST_KEY_ID = b"k" * 16


def fake_blob(seed: int, size: int = 1000) -> tuple[bytes, bytes]:
    """A fake (id, envelope): the coordinator reads nothing of an envelope but the clear
    key id in its header (design.md §Blob envelope), so only that part is real."""
    header = bytes([1, 0, 1, 1]) + TEST_KEY_ID
    envelope = header + blake3.blake3(seed.to_bytes(8, "little")).digest(length=max(size, 48) - 20)
    return blake3.blake3(b"id" + envelope).digest(), envelope


@pytest.fixture
def make_blob() -> Callable[..., tuple[bytes, bytes]]:
    return fake_blob


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs: the fill-a-disk fault injection. Needs root; fails (not skips) otherwise."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.fail(
            f"cannot mount a 2 MiB tmpfs for the full-disk test (uid {os.getuid()}): "
            f"{proc.stderr.strip() or proc.returncode}"
        )
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
