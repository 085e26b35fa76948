"""Tree nodes from the filesystem: lstat, owners and xattrs into `repo_pb2.Node` (design.md §Trees; the codec is core/tree.py)."""

from __future__ import annotations

import errno
import grp
import os
import pwd
import stat
from collections.abc import Iterable

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
_NO_XATTRS = frozenset({errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENODATA})


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

    def known(self) -> tuple[dict[int, str], dict[int, str]]:
        """Copies of the names looked up so far: (uid -> user, gid -> group)."""
        return dict(self._users), dict(self._groups)


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
