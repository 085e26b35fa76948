"""Backend conformance suite: every storage backend must pass it (design.md §Repository layout)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from coordinator.storage import Backend
from core.errors import NotFound, ResourceExhausted, UsageError


def test_put_get_roundtrip(backend: Backend) -> None:
    backend.put("data/ab/file", b"hello world")
    assert backend.get("data/ab/file") == b"hello world"
    assert backend.stat("data/ab/file") == 11


def test_put_replaces_atomically(backend: Backend) -> None:
    backend.put("config", b"one")
    backend.put("config", b"two!")
    assert backend.get("config") == b"two!"
    assert list(backend.list("config")) == ["config"]


def test_ranged_get(backend: Backend) -> None:
    data = bytes(range(256)) * 40
    backend.put("x/y", data)
    assert backend.get("x/y", 10, 20) == data[10:30]
    assert backend.get("x/y", 100) == data[100:]
    assert backend.get("x/y", len(data) - 5, 100) == data[-5:]  # past the end: what exists
    assert backend.get("x/y", len(data) + 10, 5) == b""
    assert backend.get("x/y", 0, 0) == b""


def test_missing_raises_not_found(backend: Backend) -> None:
    with pytest.raises(NotFound):
        backend.get("nope")
    with pytest.raises(NotFound):
        backend.stat("nope/deeper")
    with pytest.raises(NotFound):
        backend.delete("nope")
    backend.put("dir/file", b"x")
    with pytest.raises(NotFound):
        backend.stat("dir")  # a directory is not a file


def test_list_by_prefix(backend: Backend) -> None:
    paths = ["data/00/aa", "data/00/ab", "data/01/bb", "snapshots/s1", "keys/k1", "config"]
    for p in paths:
        backend.put(p, p.encode())
    assert sorted(backend.list("data/")) == ["data/00/aa", "data/00/ab", "data/01/bb"]
    assert sorted(backend.list("data/00/a")) == ["data/00/aa", "data/00/ab"]
    assert sorted(backend.list("snap")) == ["snapshots/s1"]
    assert sorted(backend.list("")) == sorted(paths)
    assert list(backend.list("nothing/")) == []


def test_staging_is_never_listed(backend: Backend) -> None:
    staged = backend.staging_dir() / "upload.tmp"
    staged.write_bytes(b"in progress")
    backend.put("config", b"{}")
    assert list(backend.list("")) == ["config"]
    assert list(backend.list("tmp/")) == []


def test_put_file_moves_staged_file(backend: Backend) -> None:
    staged = backend.staging_dir() / "pack.tmp"
    staged.write_bytes(b"pack bytes")
    backend.put_file("data/12/1234", staged)
    assert not staged.exists()
    assert backend.get("data/12/1234") == b"pack bytes"
    assert list(backend.staging_dir().iterdir()) == []


def test_put_leaves_no_staging_files(backend: Backend) -> None:
    for i in range(5):
        backend.put(f"snapshots/{i}", b"r" * i)
    assert list(backend.staging_dir().iterdir()) == []


def test_delete(backend: Backend) -> None:
    backend.put("keys/k", b"key")
    backend.delete("keys/k")
    with pytest.raises(NotFound):
        backend.get("keys/k")
    assert list(backend.list("keys/")) == []


@pytest.mark.parametrize(
    "bad", ["", "/etc/passwd", "../escape", "data/../../x", "a//b", "./config", "a/./b", "a/"]
)
def test_rejects_unsafe_paths(backend: Backend, bad: str) -> None:
    with pytest.raises(UsageError):
        backend.put(bad, b"x")
    with pytest.raises(UsageError):
        backend.get(bad)
    with pytest.raises(UsageError):
        backend.stat(bad)
    with pytest.raises(UsageError):
        backend.delete(bad)


@pytest.mark.root
def test_disk_full_raises_resource_exhausted_and_leaves_nothing(
    make_backend: Callable[[Path], Backend], small_disk: Path
) -> None:
    backend = make_backend(small_disk / "repo")
    backend.put("small", b"s" * 1000)
    with pytest.raises(ResourceExhausted, match="coordinator disk full"):
        backend.put("big", os.urandom(3 * 1024 * 1024))
    with pytest.raises(NotFound):
        backend.stat("big")
    assert list(backend.list("")) == ["small"]
    assert list(backend.staging_dir().iterdir()) == []
    # The space is back: writes work again.
    backend.put("after", b"ok")
    assert backend.get("after") == b"ok"


def test_get_ranges(backend: Backend) -> None:
    data = bytes(range(256)) * 40
    backend.put("x/y", data)
    ranges = [(100, 20), (0, 10), (len(data) - 5, 100), (len(data) + 10, 5), (3, 0)]
    got = [bytes(v) for v in backend.get_ranges("x/y", ranges)]
    assert got == [
        data[o : o + n] for o, n in ranges
    ]  # in the order given; past the end: what exists
    assert list(backend.get_ranges("x/y", [])) == []
    with pytest.raises(NotFound):
        list(backend.get_ranges("nope", [(0, 1)]))
    with pytest.raises(UsageError):
        list(backend.get_ranges("x/y", [(-1, 1)]))
