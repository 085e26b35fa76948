"""The blob index at scale: schema 3's narrow id index, the one-statement missing query, and batched recovery (design.md §Catalog)."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from coordinator import store as store_mod
from coordinator.catalog import MIGRATIONS, MISSING_SQL, SqliteCatalog
from coordinator.pack import PackEntry, PackWriter
from coordinator.storage import LocalBackend
from coordinator.store import BlobStore
from core.format import MAX_IDS_PER_QUERY

MakeBlob = Callable[..., tuple[bytes, bytes]]


def ids(n: int, start: int = 0) -> list[bytes]:
    return [i.to_bytes(32, "big") for i in range(start, start + n)]


def entries(blob_ids: list[bytes]) -> list[PackEntry]:
    return [PackEntry(b, 1, n * 100, 100, bytes(16)) for n, b in enumerate(blob_ids)]


def test_schema_2_catalog_is_migrated_to_the_narrow_index(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for number, script in enumerate(MIGRATIONS[:2]):
        conn.executescript(script)
        conn.execute(f"PRAGMA user_version = {number + 1}")
    stored = ids(50)
    conn.executemany(
        'INSERT INTO blobs (id, type, pack, "offset", length, checksum, key_id) '
        "VALUES (?, 1, ?, 0, 100, ?, NULL)",
        [(i, b"p" * 32, bytes(16)) for i in stored],
    )
    conn.close()

    catalog = SqliteCatalog(path)
    try:
        assert catalog.schema_version() == len(MIGRATIONS) == 3
        assert catalog.missing([*stored[:3], b"\xff" * 32]) == [False, False, False, True]
    finally:
        catalog.close()
    conn = sqlite3.connect(path)
    (sql,) = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'blobs_ids'").fetchone()
    assert "blobs (id)" in sql
    plan = " ".join(
        str(row[3]) for row in conn.execute("EXPLAIN QUERY PLAN " + MISSING_SQL, (b"", 0))
    )
    assert "COVERING INDEX blobs_ids" in plan
    conn.close()


def test_missing_keeps_order_duplicates_and_odd_ids(catalog: SqliteCatalog) -> None:
    stored = ids(10)
    catalog.add_pack(b"p" * 32, 1000, 1, entries(stored))
    asked = [stored[9], b"short", os.urandom(32), stored[0], stored[9], b"", b"x" * 33, stored[5]]
    assert catalog.missing(asked) == [False, True, True, False, False, True, True, False]
    assert catalog.missing([]) == []


def test_missing_more_ids_than_one_statement_takes(catalog: SqliteCatalog) -> None:
    stored = ids(MAX_IDS_PER_QUERY + 10)
    catalog.add_pack(b"p" * 32, 1, 1, entries(stored))
    asked = stored[::2] + ids(MAX_IDS_PER_QUERY // 2, start=1 << 40)
    result = catalog.missing(asked)
    assert len(result) == len(asked)
    assert result == [False] * len(stored[::2]) + [True] * (MAX_IDS_PER_QUERY // 2)


def test_indexed_packs(catalog: SqliteCatalog) -> None:
    catalog.add_pack(b"a" * 32, 1, 1, entries(ids(2)))
    catalog.add_pack(b"b" * 32, 1, 1, entries(ids(2, start=10)))
    assert catalog.indexed_packs([b"a" * 32, b"c" * 32, b"b" * 32, b"a" * 32]) == {
        b"a" * 32,
        b"b" * 32,
    }
    assert catalog.indexed_packs([]) == set()


def test_recover_checks_packs_in_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_blob: MakeBlob
) -> None:
    monkeypatch.setattr(store_mod, "RECOVER_BATCH", 2)
    backend = LocalBackend(tmp_path / "repo")
    catalog = SqliteCatalog(tmp_path / "cat.db")
    store = BlobStore(backend, catalog, pack_size=1)  # one blob per pack
    with store.upload() as session:
        for i in range(3):
            blob_id, envelope = make_blob(i)
            session.add(blob_id, 1, envelope)
    orphans = []
    for i in range(100, 104):  # packs in data/ that the catalog lacks
        blob_id, envelope = make_blob(i)
        writer = PackWriter(backend)
        writer.add(blob_id, 1, envelope)
        orphans.append(writer.finish())
    backend.put("data/ee/not-a-pack-name", b"x")
    stats = store.recover()
    assert stats.packs_indexed == 4
    assert len(stats.problems) == 1 and "not a pack name" in stats.problems[0]
    assert catalog.count_blobs() == 7
    assert catalog.indexed_packs([o.pack_id for o in orphans]) == {o.pack_id for o in orphans}
    assert store.recover().packs_indexed == 0
    catalog.close()
