"""Catalog conformance: every catalog implementation must pass these (design.md §Catalog)."""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

import pytest

from coordinator.catalog import MIGRATIONS, Catalog, SqliteCatalog
from coordinator.pack import PackEntry
from core.errors import ClawbackError, NotFound, UsageError
from protos.clawback.v1 import common_pb2


def entries(n: int, start: int = 0) -> list[PackEntry]:
    return [
        PackEntry(i.to_bytes(32, "big"), 1 + i % 2, (i - start) * 100, 100, bytes(16))
        for i in range(start, start + n)
    ]


def snap(
    sid: str, agent: str = "a1", source: str = "vol", started: int = 0
) -> common_pb2.SnapshotInfo:
    return common_pb2.SnapshotInfo(
        id=sid,
        agent=agent,
        source=source,
        started_ns=started,
        finished_ns=started + 5,
        root=b"r" * 32,
    )


def test_fresh_database_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    SqliteCatalog(path).close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"blobs", "packs", "snapshots", "keys", "agents", "jobs"} <= tables
    sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'blobs'").fetchone()[0]
    assert "WITHOUT ROWID" in sql
    conn.close()
    # Re-opening applies nothing twice; a newer schema is refused.
    cat = SqliteCatalog(path)
    assert cat.schema_version() == len(MIGRATIONS)
    cat.close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(ClawbackError, match="newer"):
        SqliteCatalog(path)


def test_add_pack_and_missing(catalog: Catalog) -> None:
    ents = entries(10)
    ids = [e.id for e in ents]
    assert catalog.missing(ids) == [True] * 10
    assert catalog.add_pack(b"p" * 32, 1044, 7, ents) == 10
    assert catalog.add_pack(b"p" * 32, 1044, 7, ents) == 0  # idempotent
    assert catalog.missing([*ids, b"z" * 32, ids[0]]) == [False] * 10 + [True, False]
    assert catalog.has_pack(b"p" * 32) and not catalog.has_pack(b"q" * 32)
    assert catalog.list_pack_ids() == [b"p" * 32]
    assert catalog.count_blobs() == 10
    assert catalog.pack_blobs(b"p" * 32) == ents
    assert [tuple(r) for r in catalog.iter_packs()] == [(b"p" * 32, 1044, 10, 7)]


def test_ref_keys_counts_indexed_ids_and_names_their_keys(catalog: Catalog) -> None:
    ents = entries(6)
    k1, k2 = b"1" * 16, b"2" * 16
    keys = {ents[0].id: k1, ents[1].id: k1, ents[2].id: k2}  # 3..5 indexed without a key
    catalog.add_pack(b"p" * 32, 600, 1, ents, keys)
    ids = [e.id for e in ents]
    absent = (99).to_bytes(32, "big")
    assert catalog.ref_keys(ids) == (6, {k1, k2})
    assert catalog.ref_keys([*ids, ids[0], absent, b"short"]) == (6, {k1, k2})  # distinct ids
    assert catalog.ref_keys([absent]) == (0, set())
    assert catalog.ref_keys(ids[3:]) == (3, set())
    assert catalog.blob_key_ids(ids) == {k1, k2}


def test_duplicate_blob_keeps_first_location(catalog: Catalog) -> None:
    catalog.add_pack(b"a" * 32, 100, 1, entries(3))
    assert catalog.add_pack(b"b" * 32, 100, 2, entries(4)) == 1
    locs = catalog.blob_locations([e.id for e in entries(4)])
    assert [locs[e.id].pack for e in entries(4)] == [b"a" * 32] * 3 + [b"b" * 32]
    assert catalog.count_blobs() == 4


def test_missing_many_ids(catalog: Catalog) -> None:
    stored = entries(3000)
    catalog.add_pack(b"p" * 32, 1, 1, stored)
    queried = [e.id for e in stored[::2]] + [os.urandom(32) for _ in range(2500)]
    result = catalog.missing(queried)
    assert result == [False] * 1500 + [True] * 2500
    locs = catalog.blob_locations(queried)
    assert set(locs) == {e.id for e in stored[::2]}
    loc = locs[stored[2].id]
    assert (loc.pack, loc.offset, loc.length, loc.checksum, loc.type) == (
        b"p" * 32,
        200,
        100,
        bytes(16),
        1,
    )


def test_missing_answers_a_large_mixed_batch(catalog: Catalog) -> None:
    """Speed is bench.scale's to measure; here, the answers for a batch larger than one query."""
    catalog.add_pack(b"p" * 32, 1, 1, entries(65536))
    absent = [os.urandom(32) for _ in range(32768)]
    ids = [e.id for e in entries(32768)] + absent
    assert catalog.missing(ids) == [False] * 32768 + [True] * 32768


def test_snapshots(catalog: Catalog) -> None:
    assert catalog.put_snapshot(snap("ab01" + "0" * 28, started=30))
    assert not catalog.put_snapshot(snap("ab01" + "0" * 28, started=99))  # first row kept
    catalog.put_snapshot(snap("ab02" + "0" * 28, started=10))
    catalog.put_snapshot(snap("cd00" + "0" * 28, agent="a2", started=20))
    assert [s.id[:4] for s in catalog.list_snapshots()] == ["ab02", "cd00", "ab01"]
    assert [s.id[:4] for s in catalog.list_snapshots(agent="a1")] == ["ab02", "ab01"]
    assert catalog.list_snapshots(agent="a1", source="other") == []
    latest = catalog.latest_snapshot("a1", "vol")
    assert latest is not None and latest.id.startswith("ab01") and latest.started_ns == 30
    assert catalog.latest_snapshot("nobody", "vol") is None
    assert catalog.get_snapshot("cd").agent == "a2"
    assert catalog.get_snapshot("AB01").id == "ab01" + "0" * 28
    assert catalog.get_snapshot("ab01" + "0" * 28).root == b"r" * 32
    with pytest.raises(UsageError, match="ambiguous prefix"):
        catalog.get_snapshot("ab")
    with pytest.raises(NotFound):
        catalog.get_snapshot("ef")
    with pytest.raises(UsageError):
        catalog.get_snapshot("")


def test_keys(catalog: Catalog) -> None:
    k1 = common_pb2.WrappedKey(key_id=b"1" * 16, wrapped=b"w1", provider="file")
    k2 = common_pb2.WrappedKey(key_id=b"2" * 16, wrapped=b"", provider="file")
    catalog.put_keys([k1, k2], 5)
    catalog.put_keys([common_pb2.WrappedKey(key_id=b"1" * 16, wrapped=b"other")], 6)
    got = catalog.get_keys([b"1" * 16, b"2" * 16, b"3" * 16])
    assert got == {b"1" * 16: k1, b"2" * 16: k2}


def test_agents(catalog: Catalog) -> None:
    src = common_pb2.SourceSpec(
        name="uploads", kind=common_pb2.SOURCE_KIND_VOLUME, path="/srv", driver="none"
    )
    catalog.upsert_agent("n1", "host1", "0.1", [src], ["backup.volume.v1"], 100)
    catalog.upsert_agent("n1", "host1b", "0.2", [src], ["restore.v1"], 200)
    catalog.upsert_agent("n0", "h0", "0.1", [], [], 150)
    agents = catalog.list_agents()
    assert [a.name for a in agents] == ["n0", "n1"]
    n1 = agents[1]
    assert (n1.hostname, n1.version, n1.first_seen_ns, n1.last_seen_ns) == (
        "host1b",
        "0.2",
        100,
        200,
    )
    assert list(n1.sources) == [src] and list(n1.capabilities) == ["restore.v1"]
    assert not catalog.is_revoked("n1") and not catalog.is_revoked("never-seen")
    assert catalog.set_revoked("n1", True).revoked
    catalog.upsert_agent("n1", "host1b", "0.2", [src], [], 300)  # Hello does not un-revoke
    assert catalog.is_revoked("n1")
    catalog.set_revoked("n1", False)
    assert not catalog.is_revoked("n1")
    with pytest.raises(NotFound):
        catalog.set_revoked("ghost", True)


def test_jobs(catalog: Catalog) -> None:
    for i in range(5):
        catalog.put_job(
            common_pb2.JobInfo(
                id=f"j{i}",
                kind=common_pb2.JOB_KIND_BACKUP,
                agent="a" if i % 2 else "b",
                state=common_pb2.JOB_STATE_PENDING,
                created_ns=i,
                updated_ns=i,
            )
        )
    job = catalog.get_job("j3")
    job.state = common_pb2.JOB_STATE_SUCCEEDED
    job.progress.files_done = 7
    catalog.put_job(job)
    catalog.put_job(job)
    assert catalog.get_job("j3") == job
    assert [j.id for j in catalog.list_jobs()] == ["j4", "j3", "j2", "j1", "j0"]
    assert [j.id for j in catalog.list_jobs(agent="a")] == ["j3", "j1"]
    assert [j.id for j in catalog.list_jobs(limit=2)] == ["j4", "j3"]
    with pytest.raises(NotFound):
        catalog.get_job("nope")
    # By unique prefix, as `clawback jobs` shows them (8 characters).
    catalog.put_job(common_pb2.JobInfo(id="ab12cd34ef", agent="a"))
    catalog.put_job(common_pb2.JobInfo(id="ab12ff00", agent="a"))
    assert catalog.get_job("ab12cd").id == "ab12cd34ef"
    assert catalog.get_job("ab12ff00").id == "ab12ff00"  # a full id that prefixes no other
    with pytest.raises(UsageError, match="job ab12: ambiguous prefix"):
        catalog.get_job("ab12")
    with pytest.raises(UsageError, match="empty job id"):
        catalog.get_job(" ")


def test_threads_share_one_catalog(catalog: Catalog) -> None:
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for k in range(20):
                base = n * 1000 + k * 10
                catalog.add_pack(bytes([n, k]) * 16, 1, 1, entries(10, start=base))
                assert not any(catalog.missing([e.id for e in entries(10, start=base)]))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert catalog.count_blobs() == 8 * 20 * 10
