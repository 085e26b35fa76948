"""Tests for agent/tree.py: Nodes from lstat, owners and xattrs (the codec is tested in tests/core/test_tree.py)."""

from __future__ import annotations

import os
from pathlib import Path

from agent import tree
from agent.tree import (
    DIR,
    FIFO,
    FILE,
    SYMLINK,
    Owners,
    node_from_stat,
    read_xattrs,
)
from protos.clawback.v1 import repo_pb2

ID = b"\x01" * 32


def file_node(name: bytes, size: int = 3) -> repo_pb2.Node:
    return repo_pb2.Node(name=name, type=FILE, size=size, content=[ID], content_sizes=[size])


def test_node_from_stat_file_fields(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"abc")
    os.chmod(p, 0o4755)
    os.utime(p, ns=(1_000_000_123, 2_000_000_456))
    os.setxattr(p, b"user.k", b"v")
    st = os.lstat(p)
    n = node_from_stat(b"f", st, Owners())
    tree.add_xattrs(n, read_xattrs(os.fsencode(p)))
    assert n.type == FILE and n.mode == 0o4755 and n.size == 3
    assert (n.mtime_ns, n.atime_ns) == (2_000_000_456, 1_000_000_123)
    assert n.ctime_ns == st.st_ctime_ns and n.inode == st.st_ino and n.device == st.st_dev
    assert n.nlink == 1 and n.uid == st.st_uid and n.user == "root"
    assert [(x.name, x.value) for x in n.xattrs] == [(b"user.k", b"v")]
    assert not n.sparse


def test_node_types_and_sparse(tmp_path: Path) -> None:
    os.symlink(b"target\xff", tmp_path / "l")
    os.mkfifo(tmp_path / "p")
    with open(tmp_path / "s", "wb") as f:
        f.truncate(10 * 1024 * 1024)
    o = Owners()
    assert node_from_stat(b"l", os.lstat(tmp_path / "l"), o).type == SYMLINK
    assert node_from_stat(b"p", os.lstat(tmp_path / "p"), o).type == FIFO
    assert node_from_stat(b"d", os.lstat(tmp_path), o).type == DIR
    assert node_from_stat(b"s", os.lstat(tmp_path / "s"), o).sparse
    assert read_xattrs(os.fsencode(tmp_path / "l")) == []  # symlink itself, not followed


def test_owner_names_unknown_ids_are_empty() -> None:
    o = Owners()
    assert o.user(0) == "root"
    assert o.user(4_000_000_000) == "" and o.group(4_000_000_000) == ""
