"""Tests for agent/filescache.py: lookups by stat tuple, atomic saves only when changed, corrupt caches ignored."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from agent.filescache import FilesCache, cache_path

IDS = (b"\x01" * 32, b"\x02" * 32)
ENTRY = (30, 111, 222, 7, 9, IDS, (10, 20))


def test_round_trip_and_lookup(tmp_path: Path) -> None:
    c = FilesCache.open(tmp_path, "src", scope="repo-a")
    assert not c.loaded and c.lookup(b"f", 30, 111, 222, 7, 9) is None
    c.record(b"f", ENTRY)
    c.record(b"\xffname\n", (0, 1, 2, 3, 4, (), ()))
    assert c.save()
    c2 = FilesCache.open(tmp_path, "src", scope="repo-a")
    assert c2.loaded and len(c2) == 2
    assert c2.lookup(b"f", 30, 111, 222, 7, 9) == ENTRY
    for changed in [
        (31, 111, 222, 7, 9),
        (30, 112, 222, 7, 9),
        (30, 111, 223, 7, 9),
        (30, 111, 222, 8, 9),
        (30, 111, 222, 7, 10),
    ]:
        assert c2.lookup(b"f", *changed) is None
    assert c2.lookup(b"\xffname\n", 0, 1, 2, 3, 4) is not None


def test_save_only_when_changed_and_drops_unseen(tmp_path: Path) -> None:
    c = FilesCache.open(tmp_path, "src")
    c.record(b"a", ENTRY)
    c.record(b"b", ENTRY)
    assert c.save()
    mtime = cache_path(tmp_path, "src").stat().st_mtime_ns
    c2 = FilesCache.open(tmp_path, "src")
    assert c2.lookup(b"a", *ENTRY[:5]) and c2.lookup(b"b", *ENTRY[:5])
    assert not c2.changed and not c2.save()
    assert cache_path(tmp_path, "src").stat().st_mtime_ns == mtime
    c3 = FilesCache.open(tmp_path, "src")
    c3.lookup(b"a", *ENTRY[:5])  # b was not seen this run
    assert c3.changed and c3.save()
    assert len(FilesCache.open(tmp_path, "src")) == 1
    assert [p.name for p in tmp_path.iterdir()] == [
        cache_path(tmp_path, "src").name
    ]  # no temp files


@pytest.mark.parametrize("damage", [b"", b"garbage", b"clawback files cache v1\n\x00\x01", None])
def test_corrupt_cache_is_ignored_with_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: bytes | None
) -> None:
    c = FilesCache.open(tmp_path, "src")
    c.record(b"a", ENTRY)
    c.save()
    p = cache_path(tmp_path, "src")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2] if damage is None else damage)
    with caplog.at_level(logging.WARNING):
        c2 = FilesCache.open(tmp_path, "src")
    assert len(c2) == 0 and not c2.loaded
    assert "files cache" in caplog.text


def test_invalid_entries_are_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    c = FilesCache.open(tmp_path, "src")
    c.record(b"a", (30, 1, 2, 3, 4, (b"short",), (30,)))  # a malformed id
    c.save()
    with caplog.at_level(logging.WARNING):
        assert len(FilesCache.open(tmp_path, "src")) == 0
    assert "corrupt" in caplog.text


def test_other_scope_starts_afresh(tmp_path: Path) -> None:
    c = FilesCache.open(tmp_path, "src", scope="repo-a")
    c.record(b"a", ENTRY)
    c.save()
    assert len(FilesCache.open(tmp_path, "src", scope="repo-b")) == 0


def test_per_source_files_and_unsafe_names(tmp_path: Path) -> None:
    assert cache_path(tmp_path, "a") != cache_path(tmp_path, "b")
    weird = cache_path(tmp_path, "../../etc/passwd")
    assert weird.parent == tmp_path and "/" not in weird.name and ".." not in weird.name
    c = FilesCache.open(tmp_path / "new" / "dir", "x")
    c.record(b"a", ENTRY)
    assert c.save()
    assert os.stat(cache_path(tmp_path / "new" / "dir", "x")).st_mode & 0o077 == 0


def test_a_v1_cache_is_migrated_and_written_back_as_v4(tmp_path: Path) -> None:
    import marshal

    from agent.filescache import MAGIC, MAGIC_V1

    p = cache_path(tmp_path, "src")
    p.write_bytes(
        MAGIC_V1 + marshal.dumps(("repo-a", {b"f": ENTRY, b"e": (0, 1, 2, 3, 4, (), ())}))
    )
    c = FilesCache.open(tmp_path, "src", scope="repo-a")
    assert c.loaded and len(c) == 2
    assert c.lookup(b"f", *ENTRY[:5]) == ENTRY
    assert c.lookup(b"e", 0, 1, 2, 3, 4) == (0, 1, 2, 3, 4, (), ())
    assert c.changed and c.save()  # unchanged entries, but the file is rewritten as v4
    assert p.read_bytes().startswith(MAGIC)
    c2 = FilesCache.open(tmp_path, "src", scope="repo-a")
    assert c2.lookup(b"f", *ENTRY[:5]) == ENTRY
    c2.lookup(b"e", 0, 1, 2, 3, 4)
    assert not c2.changed


def test_entries_are_compact_and_unrepresentable_ones_are_not_kept(tmp_path: Path) -> None:
    many = tuple(bytes([i]) * 32 for i in range(5))
    big = (15, -5, 7, 2**64 - 1, 0, many, (1, 2, 3, 4, 5))  # pre-1970 mtime, huge inode
    c = FilesCache.open(tmp_path, "src")
    c.record(b"big", big)
    c.record(b"huge-chunk", (2**32, 1, 2, 3, 4, (IDS[0],), (2**32,)))
    c.record(b"negative", (-1, 1, 2, 3, 4, (), ()))
    assert c.save()
    c2 = FilesCache.open(tmp_path, "src")
    assert len(c2) == 1
    assert c2.lookup(b"big", *big[:5]) == big
    assert c2.lookup(b"big", -1, -5, 7, 2**64 - 1, 0) is None  # an unpackable query is a miss


def test_a_v2_cache_is_migrated_with_flags_unknown(tmp_path: Path) -> None:
    import marshal
    import struct

    from agent.filescache import MAGIC, MAGIC_V2

    head = struct.pack("<QqqQQ", *ENTRY[:5])
    v2 = head + b"".join(IDS) + struct.pack("<2I", *ENTRY[6])
    p = cache_path(tmp_path, "src")
    p.write_bytes(MAGIC_V2 + marshal.dumps(("repo-a", {b"f": v2})))
    c = FilesCache.open(tmp_path, "src", scope="repo-a")
    assert c.lookup(b"f", *ENTRY[:5]) == ENTRY
    assert c.hit(b"f", *ENTRY[:5]) == (IDS, (10, 20), 0, 0, b"")  # xattrs unknown: listed
    assert c.changed and c.save()
    assert p.read_bytes().startswith(MAGIC)
    assert FilesCache.open(tmp_path, "src", scope="repo-a").lookup(b"f", *ENTRY[:5]) == ENTRY


def test_flags_are_kept_with_the_entry(tmp_path: Path) -> None:
    from agent.filescache import NO_XATTRS

    c = FilesCache.open(tmp_path, "src")
    c.record(b"plain", ENTRY, NO_XATTRS)
    c.record(b"with-xattrs", ENTRY)
    c.save()
    c2 = FilesCache.open(tmp_path, "src")
    assert c2.hit(b"plain", *ENTRY[:5]) == (IDS, (10, 20), NO_XATTRS, 0, b"")
    assert c2.hit(b"with-xattrs", *ENTRY[:5]) == (IDS, (10, 20), 0, 0, b"")
    c2.save()  # carried over as they were
    c3 = FilesCache.open(tmp_path, "src")
    assert c3.hit(b"plain", *ENTRY[:5]) == (IDS, (10, 20), NO_XATTRS, 0, b"")


def test_a_v3_cache_is_migrated_with_its_flags(tmp_path: Path) -> None:
    import marshal
    import struct

    from agent.filescache import MAGIC, MAGIC_V3, NO_XATTRS

    head = struct.pack("<QqqQQ", *ENTRY[:5])
    v3 = head + bytes((NO_XATTRS,)) + b"".join(IDS) + struct.pack("<2I", *ENTRY[6])
    one = struct.pack("<QqqQQ", 5, 1, 2, 3, 4) + b"\x00" + IDS[0] + struct.pack("<I", 5)
    empty = struct.pack("<QqqQQ", 0, 1, 2, 3, 4) + b"\x00"
    p = cache_path(tmp_path, "src")
    p.write_bytes(MAGIC_V3 + marshal.dumps(("repo-a", {b"f": v3, b"one": one, b"e": empty})))
    c = FilesCache.open(tmp_path, "src", scope="repo-a")
    assert c.hit(b"f", *ENTRY[:5]) == (IDS, (10, 20), NO_XATTRS, 0, b"")
    assert c.hit(b"one", 5, 1, 2, 3, 4) == ((IDS[0],), (5,), 0, 0, b"")
    assert c.hit(b"e", 0, 1, 2, 3, 4) == ((), (), 0, 0, b"")
    assert c.changed and c.save()
    assert p.read_bytes().startswith(MAGIC)
    c2 = FilesCache.open(tmp_path, "src", scope="repo-a")
    assert c2.lookup(b"f", *ENTRY[:5]) == ENTRY and len(c2) == 3


def test_a_node_is_kept_with_its_entry_until_the_file_is_read_again(tmp_path: Path) -> None:
    from agent.filescache import NO_XATTRS, NODE, SPARSE

    node = b"\x10\x01 serialized node without its name"
    c = FilesCache.open(tmp_path, "src")
    c.record(b"f", ENTRY, NO_XATTRS)
    c.record(b"g", ENTRY)
    c.keep_node(b"f", ENTRY[:5], 12345, True, node)
    c.keep_node(b"g", (31, *ENTRY[1:5]), 1, False, node)  # another stat: not this entry's node
    c.keep_node(b"absent", ENTRY[:5], 1, False, node)  # no entry: nothing kept
    c.names = ({0: "root"}, {0: "root"})
    assert c.save()
    c2 = FilesCache.open(tmp_path, "src")
    assert len(c2) == 2 and c2.names == ({0: "root"}, {0: "root"})
    assert c2.hit(b"f", *ENTRY[:5]) == (IDS, (10, 20), NO_XATTRS | NODE | SPARSE, 12345, node)
    assert c2.hit(b"g", *ENTRY[:5]) == (IDS, (10, 20), 0, 0, b"")
    assert c2.lookup(b"f", *ENTRY[:5]) == ENTRY
    assert not c2.changed  # carried over, node and all
    c2.record(b"f", ENTRY, NO_XATTRS)  # read again: the node goes until the tree is built
    c2.save()
    assert FilesCache.open(tmp_path, "src").hit(b"f", *ENTRY[:5]) == (
        IDS,
        (10, 20),
        NO_XATTRS,
        0,
        b"",
    )


def test_a_truncated_node_entry_makes_the_cache_corrupt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import marshal

    from agent.filescache import MAGIC

    c = FilesCache.open(tmp_path, "src")
    c.record(b"f", ENTRY)
    c.keep_node(b"f", ENTRY[:5], 1, False, b"node")
    c.save()
    p = cache_path(tmp_path, "src")
    scope, entries, names = marshal.loads(p.read_bytes()[len(MAGIC) :])
    entries[b"f"] = entries[b"f"][:-10]  # cut into the atime
    p.write_bytes(MAGIC + marshal.dumps((scope, entries, names)))
    with caplog.at_level(logging.WARNING):
        assert len(FilesCache.open(tmp_path, "src")) == 0
    assert "corrupt" in caplog.text
