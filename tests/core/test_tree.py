"""Trees: encode/decode round trips (one part and many) and every name a reader must refuse (design.md §Trees)."""

from __future__ import annotations

import pytest

from core.errors import IntegrityError
from core.tree import decode_tree, encode_root, encode_tree
from protos.clawback.v1 import repo_pb2

ID = b"\x11" * 32


def _file(name: bytes, size: int = 3) -> repo_pb2.Node:
    return repo_pb2.Node(
        name=name,
        type=repo_pb2.NODE_TYPE_FILE,
        mode=0o644,
        size=size,
        content=[ID],
        content_sizes=[size],
    )


def _raw(*nodes: repo_pb2.Node) -> list[bytes]:
    """Serialize without encode_tree's sorting, as a hostile writer could."""
    return [repo_pb2.Tree(nodes=list(nodes)).SerializeToString()]


def test_round_trip_sorts_bytewise() -> None:
    nodes = [_file(b"b"), _file(b"a\xff"), _file(b"B"), _file(b"a")]
    parts = encode_tree(nodes)
    assert len(parts) == 1
    tree = decode_tree(parts)
    assert [n.name for n in tree.nodes] == [b"B", b"a", b"a\xff", b"b"]
    assert tree.nodes[1] == _file(b"a")


def test_empty_directory_is_one_empty_part() -> None:
    assert encode_tree([]) == [b""]
    assert list(decode_tree([b""]).nodes) == []


def test_multi_part_round_trip() -> None:
    nodes = [_file(f"file-{i:05d}".encode() + b"x" * 40) for i in range(500)]
    parts = encode_tree(nodes, part_size=1000)
    assert len(parts) > 10
    assert all(len(p) <= 1000 for p in parts[:-1])
    assert all(0 < len(p) <= 1000 for p in parts)
    tree = decode_tree(parts)
    assert [n.name for n in tree.nodes] == sorted(n.name for n in nodes)


def test_default_part_size_is_4_mib() -> None:
    big = [
        repo_pb2.Node(
            name=b"f%06d" % i, type=repo_pb2.NODE_TYPE_FILE, size=0, link_target=b"y" * 1000
        )
        for i in range(5000)
    ]
    parts = encode_tree(big)
    assert len(parts) == 2 and len(parts[0]) == 4 * 1024 * 1024
    assert len(decode_tree(parts).nodes) == 5000


def test_parts_out_of_order_are_refused() -> None:
    nodes = [_file(f"n{i:04d}".encode()) for i in range(200)]
    parts = encode_tree(nodes, part_size=512)
    with pytest.raises(IntegrityError):
        decode_tree(list(reversed(parts)))


@pytest.mark.parametrize("name", [b"", b".", b"..", b"a/b", b"/", b"a\0b", b"\0"], ids=repr)
def test_invalid_names_are_refused(name: bytes) -> None:
    with pytest.raises(IntegrityError):
        decode_tree(_raw(_file(name)))


def test_valid_odd_names_are_accepted() -> None:
    names = [b"...", b".hidden", b"a\\b", b"\xff\xfe", b"with space", b"\n"]
    assert len(decode_tree(encode_tree([_file(n) for n in names])).nodes) == len(names)


def test_duplicate_and_unsorted_names_are_refused() -> None:
    with pytest.raises(IntegrityError, match="duplicate"):
        decode_tree(_raw(_file(b"a"), _file(b"a")))
    with pytest.raises(IntegrityError, match="sorted"):
        decode_tree(_raw(_file(b"b"), _file(b"a")))


def test_content_and_sizes_must_pair() -> None:
    bad = repo_pb2.Node(
        name=b"f", type=repo_pb2.NODE_TYPE_FILE, size=3, content=[ID, ID], content_sizes=[3]
    )
    with pytest.raises(IntegrityError, match="content"):
        decode_tree(_raw(bad))


def test_short_ids_and_unknown_types_are_refused() -> None:
    with pytest.raises(IntegrityError):
        decode_tree(_raw(repo_pb2.Node(name=b"d", type=repo_pb2.NODE_TYPE_DIR, subtree=[b"short"])))
    with pytest.raises(IntegrityError):
        decode_tree(_raw(repo_pb2.Node(name=b"x", type=repo_pb2.NODE_TYPE_UNSPECIFIED)))


def test_garbage_does_not_parse() -> None:
    with pytest.raises(IntegrityError):
        decode_tree([b"\xff\xff\xff\xff"])


def test_root_tree() -> None:
    root = repo_pb2.Node(name=b".", type=repo_pb2.NODE_TYPE_DIR, mode=0o755, subtree=[ID])
    tree = decode_tree(encode_tree([root]), root=True)
    assert tree.nodes[0].name == b"."
    # "." is only allowed as the root's single node ...
    with pytest.raises(IntegrityError):
        decode_tree(encode_tree([root]))
    # ... and the root must be exactly one directory named "."
    with pytest.raises(IntegrityError):
        decode_tree(encode_tree([root, _file(b"x")]), root=True)
    with pytest.raises(IntegrityError):
        decode_tree(encode_tree([_file(b".")]), root=True)
    with pytest.raises(IntegrityError):
        decode_tree(encode_tree([repo_pb2.Node(name=b"x", type=repo_pb2.NODE_TYPE_DIR)]), root=True)
    with pytest.raises(IntegrityError):
        decode_tree([b""], root=True)


def test_file_sizes_must_add_up_and_directories_need_a_subtree() -> None:
    ident = b"\x01" * 32
    bad_size = repo_pb2.Node(
        name=b"f", type=repo_pb2.NODE_TYPE_FILE, size=5, content=[ident], content_sizes=[3]
    )
    no_subtree = repo_pb2.Node(name=b"d", type=repo_pb2.NODE_TYPE_DIR)
    for n in (bad_size, no_subtree):
        with pytest.raises(IntegrityError):
            decode_tree([repo_pb2.Tree(nodes=[n]).SerializeToString()])


def test_encode_root_round_trip() -> None:
    root = repo_pb2.Node(name=b".", type=repo_pb2.NODE_TYPE_DIR, mode=0o755, subtree=[b"\x01" * 32])
    assert decode_tree([encode_root(root)], root=True).nodes[0] == root
    with pytest.raises(ValueError):
        encode_root(repo_pb2.Node(name=b"x", type=repo_pb2.NODE_TYPE_DIR, subtree=[b"\x01" * 32]))


def test_encode_tree_is_the_deterministic_tree_serialization() -> None:
    """encode_tree builds the wire bytes node by node: they must be Tree.SerializeToString's."""
    nodes = [_file(n) for n in (b"zeta", b"alpha", b"\xff\xfe", b"m" * 300)]
    nodes[0].xattrs.add(name=b"user.x", value=b"v" * 200)
    nodes[1].content.extend([bytes([i]) * 32 for i in range(5)])
    nodes[1].content_sizes.extend([1 << 20] * 5)
    nodes[1].size = 3 + (5 << 20)
    expected = repo_pb2.Tree(nodes=sorted(nodes, key=lambda n: n.name)).SerializeToString(
        deterministic=True
    )
    assert b"".join(encode_tree(nodes)) == expected
    assert b"".join(encode_tree(nodes, part_size=97)) == expected
