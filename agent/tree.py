"""Directory trees (design.md §Trees): Nodes from lstat, deterministic Tree serialization in parts, validated parsing."""

from __future__ import annotations

import errno
import grp
import os
import pwd
import stat
from collections.abc import Iterable, Sequence

from core.errors import IntegrityError
from core.format import ID_SIZE, TREE_PART_SIZE
from protos.clawback.v1 import repo_pb2

Node = repo_pb2.Node

FILE = repo_pb2.NODE_TYPE_FILE
DIR = repo_pb2.NODE_TYPE_DIR
SYMLINK = repo_pb2.NODE_TYPE_SYMLINK
FIFO = repo_pb2.NODE_TYPE_FIFO
SOCKET = repo_pb2.NODE_TYPE_SOCKET
CHARDEV = repo_pb2.NODE_TYPE_CHARDEV
BLOCKDEV = repo_pb2.NODE_TYPE_BLOCKDEV

NODE_TYPES: dict[int, repo_pb2.NodeType.ValueType] = {
    stat.S_IFREG: FILE,
    stat.S_IFDIR: DIR,
    stat.S_IFLNK: SYMLINK,
    stat.S_IFIFO: FIFO,
    stat.S_IFSOCK: SOCKET,
    stat.S_IFCHR: CHARDEV,
    stat.S_IFBLK: BLOCKDEV,
}
_KNOWN_TYPES = frozenset(NODE_TYPES.values())
_NO_XATTRS = frozenset({errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENODATA})
ROOT_NAME = b"."


class Owners:
    """uid/gid to user/group names, looked up once each (names are informational; best effort)."""

    def __init__(self) -> None:
        self._users: dict[int, str] = {}
        self._groups: dict[int, str] = {}

    def user(self, uid: int) -> str:
        name = self._users.get(uid)
        if name is None:
            try:
                name = pwd.getpwuid(uid).pw_name
            except (KeyError, OverflowError):
                name = ""
            self._users[uid] = name
        return name

    def group(self, gid: int) -> str:
        name = self._groups.get(gid)
        if name is None:
            try:
                name = grp.getgrgid(gid).gr_name
            except (KeyError, OverflowError):
                name = ""
            self._groups[gid] = name
        return name


def node_type(st_mode: int) -> repo_pb2.NodeType.ValueType:
    """The NodeType of an lstat mode (UNSPECIFIED for a type clawback does not know)."""
    return NODE_TYPES.get(stat.S_IFMT(st_mode), repo_pb2.NODE_TYPE_UNSPECIFIED)


def node_from_stat(name: bytes, st: os.stat_result, owners: Owners) -> repo_pb2.Node:
    """A Node carrying the metadata of `st` (an lstat result); content, link target and xattrs are added by the caller."""
    kind = node_type(st.st_mode)
    node = Node(
        name=name,
        type=kind,
        mode=st.st_mode & 0o7777,
        uid=st.st_uid,
        gid=st.st_gid,
        user=owners.user(st.st_uid),
        group=owners.group(st.st_gid),
        mtime_ns=st.st_mtime_ns,
        atime_ns=st.st_atime_ns,
        ctime_ns=st.st_ctime_ns,
        inode=st.st_ino,
        device=st.st_dev,
        nlink=st.st_nlink,
    )
    if kind == FILE:
        node.size = st.st_size
        if st.st_blocks * 512 < st.st_size:
            node.sparse = True
    elif kind in (CHARDEV, BLOCKDEV):
        node.rdev = st.st_rdev
    return node


def read_xattrs(path: bytes | int) -> list[tuple[bytes, bytes]]:
    """Extended attributes of `path` (not followed if a symlink) or an open fd, sorted by name.

    A filesystem without xattr support gives []; other OSErrors propagate.
    """
    follow = isinstance(path, int)
    try:
        names = os.listxattr(path, follow_symlinks=follow)
    except OSError as exc:
        if exc.errno in _NO_XATTRS:
            return []
        raise
    if not names:
        return []
    out = []
    for name in sorted(names):
        try:
            value = os.getxattr(path, name, follow_symlinks=follow)
        except OSError as exc:
            if exc.errno in _NO_XATTRS:  # removed since listed
                continue
            raise
        out.append((os.fsencode(name), value))
    return out


def add_xattrs(node: repo_pb2.Node, xattrs: Iterable[tuple[bytes, bytes]]) -> None:
    for name, value in xattrs:
        node.xattrs.add(name=name, value=value)


def serialize_tree(nodes: Sequence[repo_pb2.Node]) -> list[bytes]:
    """The serialized Tree of `nodes` (sorted bytewise by name) cut into parts of at most TREE_PART_SIZE.

    Deterministic: equal directories give equal parts, hence equal ids. An
    empty directory is one empty part. Raises ValueError on duplicate or invalid names.
    """
    ordered = sorted(nodes, key=_name)
    prev = None
    for n in ordered:
        check_name(n.name, ValueError)
        if n.name == prev:
            raise ValueError(f"duplicate name {n.name!r} in a tree")
        prev = n.name
    data = repo_pb2.Tree(nodes=ordered).SerializeToString(deterministic=True)
    if not data:
        return [b""]
    return [data[i : i + TREE_PART_SIZE] for i in range(0, len(data), TREE_PART_SIZE)]


def serialize_root(node: repo_pb2.Node) -> bytes:
    """The root blob: a Tree with exactly one DIR node named `.` (design.md §Trees)."""
    if node.name != ROOT_NAME or node.type != DIR:
        raise ValueError("the root node must be a directory named '.'")
    data = repo_pb2.Tree(nodes=[node]).SerializeToString(deterministic=True)
    if len(data) > TREE_PART_SIZE:
        raise ValueError("root tree too large")
    return data


def _name(n: repo_pb2.Node) -> bytes:
    return n.name


def check_name(name: bytes, exc: type[Exception] = IntegrityError) -> None:
    """Refuse a name that could escape its directory: empty, '.', '..', or containing '/' or NUL."""
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise exc(f"invalid entry name {name!r} in a tree")


def parse_tree(data: bytes | bytearray | memoryview) -> list[repo_pb2.Node]:
    """Parse the concatenated parts of one directory's Tree and validate every node (IntegrityError)."""
    tree = _decode(data)
    prev = None
    for n in tree.nodes:
        check_name(n.name)
        if prev is not None and n.name <= prev:
            raise IntegrityError(f"tree entries not sorted or duplicated at {n.name!r}")
        prev = n.name
        validate_node(n)
    return list(tree.nodes)


def parse_root(data: bytes | bytearray | memoryview) -> repo_pb2.Node:
    """The root node of a snapshot's root blob (exactly one DIR node named '.')."""
    tree = _decode(data)
    if len(tree.nodes) != 1 or tree.nodes[0].name != ROOT_NAME or tree.nodes[0].type != DIR:
        raise IntegrityError("root tree must hold exactly one directory node named '.'")
    node = tree.nodes[0]
    validate_node(node)
    return node


def validate_node(n: repo_pb2.Node) -> None:
    """Structural checks a reader relies on (IntegrityError)."""
    if n.type not in _KNOWN_TYPES:
        raise IntegrityError(f"entry {n.name!r} has unknown type {n.type}")
    if n.type == FILE:
        if len(n.content) != len(n.content_sizes):
            raise IntegrityError(f"file {n.name!r}: content ids and sizes differ in number")
        if sum(n.content_sizes) != n.size:
            raise IntegrityError(f"file {n.name!r}: chunk sizes do not add up to its size")
        for cid in n.content:
            if len(cid) != ID_SIZE:
                raise IntegrityError(f"file {n.name!r}: malformed chunk id")
    elif n.type == DIR:
        if not n.subtree:
            raise IntegrityError(f"directory {n.name!r} has no subtree")
        for tid in n.subtree:
            if len(tid) != ID_SIZE:
                raise IntegrityError(f"directory {n.name!r}: malformed subtree id")


def _decode(data: bytes | bytearray | memoryview) -> repo_pb2.Tree:
    tree = repo_pb2.Tree()
    try:
        tree.ParseFromString(bytes(data))
    except Exception as exc:  # google.protobuf.message.DecodeError
        raise IntegrityError(f"tree does not parse: {exc}") from None
    return tree
