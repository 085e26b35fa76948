"""`clawback ls SNAPSHOT [PATH] [--recursive]`: list a snapshot's files, decrypting its trees locally.

The coordinator cannot read trees (design.md §Threat model), so the CLI
fetches the sealed TREE blobs (AdminService.ReadBlobs), unwraps their data
keys with the key provider, opens each envelope and re-derives its id from
the plaintext before trusting it (design.md §Blob envelope).
"""

from __future__ import annotations

import argparse
import os
import posixpath
import stat
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from coordinator.cli.output import (
    JsonArrayWriter,
    enum_label,
    escape_bytes,
    format_time,
    human_size,
    iso_time,
    render_table,
)
from core.errors import IntegrityError, KeyMaterialError, NotFound
from protos.clawback.v1 import common_pb2, repo_pb2

if TYPE_CHECKING:
    from coordinator.cli.client import AdminClient
    from coordinator.cli.main import Context
    from core import envelope
    from core.keys import KeyProvider

_TYPE_CHAR: dict[int, str] = {
    repo_pb2.NODE_TYPE_FILE: "-",
    repo_pb2.NODE_TYPE_DIR: "d",
    repo_pb2.NODE_TYPE_SYMLINK: "l",
    repo_pb2.NODE_TYPE_FIFO: "p",
    repo_pb2.NODE_TYPE_SOCKET: "s",
    repo_pb2.NODE_TYPE_CHARDEV: "c",
    repo_pb2.NODE_TYPE_BLOCKDEV: "b",
}


def setup(
    subs: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    p = subs.add_parser(
        "ls",
        help="list files in a snapshot (needs the key file)",
        parents=[common],
        description="List the directory PATH (default: the source's root) of SNAPSHOT, like `ls -l`. "
        "Trees are decrypted here with the key file; the coordinator only serves sealed blobs.",
    )
    p.add_argument("snapshot", metavar="SNAPSHOT", help="snapshot id or unique prefix")
    p.add_argument(
        "path",
        nargs="?",
        default="/",
        metavar="PATH",
        help="a path inside the snapshot (default /)",
    )
    p.add_argument("-r", "--recursive", action="store_true", help="descend into subdirectories")
    p.add_argument("-H", "--human-readable", action="store_true", help="sizes in KiB/MiB/GiB")
    p.set_defaults(func=run)


class TreeReader:
    """Fetches, opens and verifies tree blobs: every id is re-derived from the plaintext."""

    def __init__(self, client: AdminClient, provider: KeyProvider) -> None:
        # Decryption is imported by `ls` alone: every other command starts without it.
        from core import envelope
        from core.chunkid import IdHasher
        from core.tree import decode_tree

        self._envelope, self._decode_tree = envelope, decode_tree
        self.client = client
        self.provider = provider
        self.hasher = IdHasher(provider.id_key())
        self._keys: dict[bytes, envelope.SealingKey] = {}

    def load_keys(self, key_ids: Sequence[bytes]) -> None:
        wanted = [k for k in dict.fromkeys(key_ids) if k not in self._keys]
        if not wanted:
            return
        for wk in self.client.get_keys(wanted):
            if wk.key_id in wanted and wk.key_id not in self._keys:
                self._keys[wk.key_id] = self._envelope.SealingKey(
                    wk.key_id, self.provider.unwrap(wk.key_id, wk.wrapped)
                )

    def key(self, key_id: bytes) -> envelope.SealingKey:
        if key_id not in self._keys:
            self.load_keys([key_id])
        if key_id not in self._keys:
            raise KeyMaterialError(f"the coordinator has no wrapped data key {key_id.hex()}")
        return self._keys[key_id]

    def read_tree(self, ids: Sequence[bytes], *, root: bool = False) -> repo_pb2.Tree:
        got = {b.id: b for b in self.client.read_blobs(list(dict.fromkeys(ids)))}
        parts = []
        for blob_id in ids:
            blob = got.get(blob_id)
            if blob is None:
                raise IntegrityError(
                    f"tree blob {blob_id.hex()} was not returned by the coordinator"
                )
            if blob.error:
                raise IntegrityError(f"tree blob {blob_id.hex()}: {blob.error}")
            plain = self._envelope.open_(
                self.key, blob_id, common_pb2.BLOB_TYPE_TREE, blob.envelope
            )
            if self.hasher.blob_id(plain) != blob_id:
                raise IntegrityError(f"tree blob {blob_id.hex()}: content does not match its id")
            parts.append(plain)
        return self._decode_tree(parts, root=root)

    def children(self, node: repo_pb2.Node) -> list[repo_pb2.Node]:
        if not node.subtree:
            return []
        return list(self.read_tree(node.subtree).nodes)


def mode_string(node_type: int, mode: int) -> str:
    """`-rwxr-xr-x` with setuid/setgid/sticky as s/S, s/S, t/T."""
    chars = [_TYPE_CHAR.get(node_type, "?")]
    for shift, special, letter in (
        (6, stat.S_ISUID, "s"),
        (3, stat.S_ISGID, "s"),
        (0, stat.S_ISVTX, "t"),
    ):
        bits = mode >> shift & 7
        chars.append("r" if bits & 4 else "-")
        chars.append("w" if bits & 2 else "-")
        x = bool(bits & 1)
        if mode & special:
            chars.append(letter if x else letter.upper())
        else:
            chars.append("x" if x else "-")
    return "".join(chars)


def _owner(node: repo_pb2.Node) -> str:
    return f"{node.user or node.uid}/{node.group or node.gid}"


def _size(node: repo_pb2.Node, human: bool) -> str:
    if node.type in (repo_pb2.NODE_TYPE_CHARDEV, repo_pb2.NODE_TYPE_BLOCKDEV):
        return f"{os.major(node.rdev)}, {os.minor(node.rdev)}"
    return human_size(node.size) if human else str(node.size)


def _display(path: bytes, node: repo_pb2.Node) -> str:
    text = escape_bytes(path)
    if node.type == repo_pb2.NODE_TYPE_SYMLINK:
        text += " -> " + escape_bytes(node.link_target)
    return text


def _text(raw: bytes) -> dict[str, str]:
    """A name for JSON: the text, plus the exact bytes (hex) when they are not clean UTF-8."""
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError:
        return {"": escape_bytes(raw), "_hex": raw.hex()}
    return {"": decoded}


def node_dict(path: bytes, node: repo_pb2.Node) -> dict[str, Any]:
    d: dict[str, Any] = {}
    d.update({"path" + k: v for k, v in _text(path).items()})
    d.update({"name" + k: v for k, v in _text(node.name).items()})
    d.update(
        {
            "type": enum_label(repo_pb2.NodeType, node.type, "NODE_TYPE_"),
            "mode": f"{node.mode:04o}",
            "mode_string": mode_string(node.type, node.mode),
            "uid": node.uid,
            "gid": node.gid,
            "user": node.user,
            "group": node.group,
            "size": node.size,
            "mtime": iso_time(node.mtime_ns),
            "mtime_ns": node.mtime_ns,
            "nlink": node.nlink,
            "inode": node.inode,
            "device": node.device,
        }
    )
    if node.type == repo_pb2.NODE_TYPE_SYMLINK:
        d.update({"link_target" + k: v for k, v in _text(node.link_target).items()})
    if node.type in (repo_pb2.NODE_TYPE_CHARDEV, repo_pb2.NODE_TYPE_BLOCKDEV):
        d["rdev"] = node.rdev
    if node.type == repo_pb2.NODE_TYPE_FILE:
        d["chunks"] = len(node.content)
        d["sparse"] = node.sparse
    if node.xattrs:
        d["xattrs"] = [escape_bytes(x.name) for x in node.xattrs]
    return d


def split_path(path: str) -> list[bytes]:
    """A path inside the snapshot as its name components (raw bytes; `..` cannot climb above the root)."""
    norm = posixpath.normpath(b"/" + os.fsencode(path))
    return [part for part in norm.split(b"/") if part]


def find(reader: TreeReader, root: repo_pb2.Node, parts: Sequence[bytes]) -> repo_pb2.Node:
    node = root
    for i, name in enumerate(parts):
        here = escape_bytes(b"/" + b"/".join(parts[:i])) if i else "/"
        if node.type != repo_pb2.NODE_TYPE_DIR:
            raise NotFound(f"{here} is not a directory in this snapshot")
        match = next((c for c in reader.children(node) if c.name == name), None)
        if match is None:
            raise NotFound(
                f"{escape_bytes(b'/' + b'/'.join(parts[: i + 1]))} is not in this snapshot"
            )
        node = match
    return node


def walk(
    reader: TreeReader, node: repo_pb2.Node, path: bytes, recursive: bool
) -> Iterator[list[tuple[bytes, repo_pb2.Node]]]:
    """Batches of (path, node), one per directory listed, depth first."""
    if node.type != repo_pb2.NODE_TYPE_DIR:
        yield [(path, node)]
        return
    entries = [(posixpath.join(path, c.name), c) for c in reader.children(node)]
    yield entries
    if recursive:
        for child_path, child in entries:
            if child.type == repo_pb2.NODE_TYPE_DIR:
                yield from walk(reader, child, child_path, recursive)


def open_snapshot(
    ctx: Context, snapshot: str
) -> tuple[TreeReader, common_pb2.SnapshotInfo, repo_pb2.Node]:
    """The snapshot, a verified reader for its trees and its root node (`.`)."""
    client = ctx.client()
    from core.chunkid import IdHasher

    provider = ctx.key_provider()
    repo = client.get_repository()
    if repo.key_check and IdHasher(provider.id_key()).key_check() != repo.key_check:
        raise KeyMaterialError(
            f"{ctx.key_source()} does not hold the keys of the repository at {client.address}"
        )
    info = client.get_snapshot(snapshot)
    reader = TreeReader(client, provider)
    reader.load_keys(list(info.key_ids))
    root = reader.read_tree([info.root], root=True).nodes[0]
    return reader, info, root


def run(ctx: Context, args: argparse.Namespace) -> int:
    reader, _info, root = open_snapshot(ctx, args.snapshot)
    parts = split_path(args.path)
    node = find(reader, root, parts)
    start = b"/" + b"/".join(parts)
    if ctx.out.json_mode:
        with JsonArrayWriter(ctx.out.stdout) as w:
            for batch in walk(reader, node, start, args.recursive):
                for path, n in batch:
                    w.add(node_dict(path, n))
        return 0
    for batch in walk(reader, node, start, args.recursive):
        if not batch:
            continue
        # Fixed minimum widths keep the columns steady across directories of a recursive listing.
        rows = [
            (
                mode_string(n.type, n.mode),
                _owner(n).ljust(13),
                _size(n, args.human_readable).rjust(10),
                format_time(n.mtime_ns).ljust(19),
                _display(path, n),
            )
            for path, n in batch
        ]
        ctx.out.line(render_table(("", "", "", "", ""), rows, right=(2,), header=False))
    return 0
