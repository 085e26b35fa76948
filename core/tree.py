"""Directory trees: encoding a directory's nodes into TREE blob parts and decoding them safely (design.md §Trees).

A reader MUST refuse a tree whose node names could escape the directory
being restored or listed (empty, `.`, `..`, `/`, NUL), so every tree that
comes back from the repository goes through `decode_tree`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from google.protobuf.message import DecodeError

from core.errors import IntegrityError
from core.format import ID_SIZE, TREE_PART_SIZE
from core.wire import varint
from protos.clawback.v1 import repo_pb2

ROOT_NAME = b"."


def encode_tree(nodes: Iterable[repo_pb2.Node], part_size: int = TREE_PART_SIZE) -> list[bytes]:
    """Serialize one directory's nodes (sorted bytewise by name) into parts of at most `part_size` bytes.

    An empty directory is one empty part, so every directory node has at
    least one subtree id. Names are not validated here: the writer takes
    them from the filesystem; readers validate with `decode_tree`.
    """
    return encode_serialized(
        [(n.name, n.SerializeToString(deterministic=True)) for n in nodes], part_size
    )


def encode_serialized(
    keyed: list[tuple[bytes, bytes]], part_size: int = TREE_PART_SIZE
) -> list[bytes]:
    """`encode_tree` for nodes serialized already: (name, the node's deterministic
    serialization) pairs in any order; the list is sorted in place."""
    if part_size <= 0:
        raise ValueError("part_size must be positive")
    # The Tree's wire form built from each node's own serialization: a repeated message
    # field is the concatenation of (tag 1, length, message), exactly what
    # Tree(nodes=...).SerializeToString(deterministic=True) writes, without copying every
    # node into a new Tree first (tests pin the two as byte-identical).
    keyed.sort()
    data = b"".join(b"\x0a" + varint(len(body)) + body for _, body in keyed)
    if not data:
        return [b""]
    return [data[i : i + part_size] for i in range(0, len(data), part_size)]


def encode_root(node: repo_pb2.Node) -> bytes:
    """The snapshot's root blob: a Tree holding exactly one DIR node named `.`."""
    if node.name != ROOT_NAME or node.type != repo_pb2.NODE_TYPE_DIR:
        raise ValueError("the root node must be a directory named '.'")
    data = repo_pb2.Tree(nodes=[node]).SerializeToString(deterministic=True)
    if len(data) > TREE_PART_SIZE:
        raise ValueError("root tree larger than one part")
    return data


def decode_tree(parts: Sequence[bytes], *, root: bool = False) -> repo_pb2.Tree:
    """Parse and validate a tree from its parts, in order.

    With `root=True` the tree must be a snapshot root: exactly one DIR node
    named `.`. Raises IntegrityError for anything a writer following the
    spec could not have produced.
    """
    data = b"".join(parts)
    tree = repo_pb2.Tree()
    try:
        tree.ParseFromString(data)
    except DecodeError as exc:
        raise IntegrityError(f"tree does not parse: {exc}") from None
    if root:
        if len(tree.nodes) != 1:
            raise IntegrityError(f"root tree has {len(tree.nodes)} nodes; exactly one is required")
        node = tree.nodes[0]
        if node.name != ROOT_NAME or node.type != repo_pb2.NODE_TYPE_DIR:
            raise IntegrityError("root tree's node must be a directory named '.'")
        _check_node(node)
        return tree
    previous: bytes | None = None
    for node in tree.nodes:
        _check_name(node.name)
        if previous is not None and node.name <= previous:
            what = "duplicate name" if node.name == previous else "names not sorted"
            raise IntegrityError(f"tree has {what} at {node.name!r}")
        previous = node.name
        _check_node(node)
    return tree


def _check_name(name: bytes) -> None:
    if not name:
        raise IntegrityError("tree has a node with an empty name")
    if name in (b".", b".."):
        raise IntegrityError(f"tree has a node named {name.decode()!r}")
    if b"/" in name:
        raise IntegrityError(f"tree has a node name containing '/': {name!r}")
    if b"\0" in name:
        raise IntegrityError(f"tree has a node name containing NUL: {name!r}")


def _check_node(node: repo_pb2.Node) -> None:
    """Structural checks every reader relies on."""
    name = node.name
    if node.type not in repo_pb2.NodeType.values() or node.type == repo_pb2.NODE_TYPE_UNSPECIFIED:
        raise IntegrityError(f"tree node {name!r} has unknown type {node.type}")
    if len(node.content) != len(node.content_sizes):
        raise IntegrityError(
            f"tree node {name!r} has {len(node.content)} content ids but {len(node.content_sizes)} sizes"
        )
    if node.type == repo_pb2.NODE_TYPE_FILE and sum(node.content_sizes) != node.size:
        raise IntegrityError(f"tree node {name!r}: chunk sizes do not add up to its size")
    if node.type == repo_pb2.NODE_TYPE_DIR and not node.subtree:
        raise IntegrityError(f"tree node {name!r} is a directory without a subtree")
    for blob_id in (*node.content, *node.subtree):
        if len(blob_id) != ID_SIZE:
            raise IntegrityError(f"tree node {name!r} names a blob id of {len(blob_id)} bytes")
