"""Tests for agent/tree.py: Nodes from lstat, deterministic serialization in parts, validated parsing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent import tree
from agent.tree import (
    DIR,
    FIFO,
    FILE,
    SYMLINK,
    Owners,
    node_from_stat,
    parse_root,
    parse_tree,
    read_xattrs,
    serialize_root,
    serialize_tree,
)
from core.errors import IntegrityError
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


def test_serialize_is_sorted_and_deterministic() -> None:
    names = [b"b", b"a", b"\xff\xfe", b"A", b"a b\n"]
    parts1 = serialize_tree([file_node(n) for n in names])
    parts2 = serialize_tree([file_node(n) for n in reversed(names)])
    assert parts1 == parts2 and len(parts1) == 1
    assert [n.name for n in parse_tree(parts1[0])] == sorted(names)


def test_empty_tree_is_one_empty_part() -> None:
    assert serialize_tree([]) == [b""]
    assert parse_tree(b"") == []


def test_large_tree_split_into_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tree, "TREE_PART_SIZE", 1000)
    nodes = [file_node(b"file-%05d" % i) for i in range(200)]
    parts = serialize_tree(nodes)
    assert len(parts) > 5 and all(len(p) <= 1000 for p in parts)
    back = parse_tree(b"".join(parts))
    assert [n.name for n in back] == [n.name for n in nodes]


def test_real_part_size_bound() -> None:
    big = [file_node(b"n%07d" % i) for i in range(100_000)]  # ~5.4 MB serialized
    parts = serialize_tree(big)
    assert len(parts) == 2 and len(parts[0]) == tree.TREE_PART_SIZE


@pytest.mark.parametrize("bad", [b"", b".", b"..", b"a/b", b"/", b"a\0b"])
def test_parse_refuses_bad_names(bad: bytes) -> None:
    data = repo_pb2.Tree(nodes=[file_node(bad)]).SerializeToString()
    with pytest.raises(IntegrityError):
        parse_tree(data)
    with pytest.raises(ValueError):
        serialize_tree([file_node(bad)])


def test_parse_refuses_unsorted_duplicates_and_garbage() -> None:
    unsorted = repo_pb2.Tree(nodes=[file_node(b"b"), file_node(b"a")]).SerializeToString()
    dup = repo_pb2.Tree(nodes=[file_node(b"a"), file_node(b"a")]).SerializeToString()
    for data in (unsorted, dup, b"\xff\xff\xff\xff"):
        with pytest.raises(IntegrityError):
            parse_tree(data)
    with pytest.raises(ValueError):
        serialize_tree([file_node(b"a"), file_node(b"a")])


def test_parse_refuses_inconsistent_nodes() -> None:
    bad_size = repo_pb2.Node(name=b"f", type=FILE, size=5, content=[ID], content_sizes=[3])
    bad_id = repo_pb2.Node(name=b"f", type=FILE, size=3, content=[b"short"], content_sizes=[3])
    no_subtree = repo_pb2.Node(name=b"d", type=DIR)
    unknown = repo_pb2.Node(name=b"u", type=0)
    for n in (bad_size, bad_id, no_subtree, unknown):
        with pytest.raises(IntegrityError):
            parse_tree(repo_pb2.Tree(nodes=[n]).SerializeToString())


def test_root_round_trip_and_validation() -> None:
    root = repo_pb2.Node(name=b".", type=DIR, mode=0o755, subtree=[ID])
    assert parse_root(serialize_root(root)) == root
    with pytest.raises(ValueError):
        serialize_root(repo_pb2.Node(name=b"x", type=DIR, subtree=[ID]))
    two = repo_pb2.Tree(nodes=[root, root]).SerializeToString()
    with pytest.raises(IntegrityError):
        parse_root(two)
    with pytest.raises(IntegrityError):
        parse_root(repo_pb2.Tree(nodes=[file_node(b".")]).SerializeToString())
