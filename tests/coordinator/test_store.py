"""BlobStore tests: uploads, dedup, snapshot commits, keys, crash recovery and a full disk (design.md §Write ordering)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.catalog import SqliteCatalog
from coordinator.pack import PackWriter, pack_path
from coordinator.snaprecord import decode_record, encode_record, record_path
from coordinator.storage import LocalBackend
from coordinator.store import BlobStore, UploadStats
from core.errors import (
    AlreadyExists,
    IntegrityError,
    NotFound,
    RepositoryMissing,
    ResourceExhausted,
    UsageError,
)
from core.format import MAX_BLOB_SIZE, RepoConfig
from protos.clawback.v1 import common_pb2

MakeBlob = Callable[..., tuple[bytes, bytes]]
SID = "0123456789abcdef0123456789abcdef"
KEY = common_pb2.WrappedKey(key_id=b"k" * 16, wrapped=b"", provider="file")


def info(sid: str, root: bytes, keys: tuple[bytes, ...] = ()) -> common_pb2.SnapshotInfo:
    return common_pb2.SnapshotInfo(
        id=sid, agent="node1", source="vol", started_ns=1, finished_ns=2, root=root, key_ids=keys
    )


def upload(store: BlobStore, blobs: list[tuple[bytes, bytes]]) -> tuple[int, int, int, int]:
    with store.upload() as session:
        for blob_id, env in blobs:
            session.add(blob_id, common_pb2.BLOB_TYPE_DATA, env)
        stats = session.finish()
    return stats.blobs_stored, stats.blobs_duplicate, stats.bytes_stored, stats.packs_written


def test_config(store: BlobStore) -> None:
    with pytest.raises(RepositoryMissing):
        store.config()
    cfg = RepoConfig(repo_id="ab" * 16, key_check="cd" * 16)
    store.init_repository(cfg)
    with pytest.raises(AlreadyExists):
        store.init_repository(cfg)
    fresh = BlobStore(store.backend, store.catalog)
    assert fresh.config() == cfg


def test_update_config_rewrites_it_and_keeps_its_identity(store: BlobStore) -> None:
    with pytest.raises(RepositoryMissing):
        store.update_config(lambda c: c)
    cfg = RepoConfig(repo_id="ab" * 16, key_check="cd" * 16)
    store.init_repository(cfg)
    other = BlobStore(store.backend, store.catalog)  # another reader, its config cached
    assert other.config() == cfg
    new = store.update_config(lambda c: dataclasses.replace(c, compression="zstd-3"))
    assert new == dataclasses.replace(cfg, compression="zstd-3") == store.config()
    assert BlobStore(store.backend, store.catalog).config() == new  # written
    # Read afresh, not from a cache: a change made elsewhere is the one changed further.
    assert other.update_config(lambda c: c) == new == other.config()
    for identity in ({"repo_id": "ef" * 16}, {"key_check": "00" * 16}):
        with pytest.raises(UsageError, match="cannot change"):
            store.update_config(lambda c, f=identity: dataclasses.replace(c, **f))  # type: ignore[misc]
    with pytest.raises(ValueError):
        store.update_config(lambda c: (_ for _ in ()).throw(ValueError("refused")))
    assert BlobStore(store.backend, store.catalog).config() == new == store.config()


def test_upload_dedup_and_pack_rolling(store: BlobStore, make_blob: MakeBlob) -> None:
    blobs = [make_blob(i, 10_000) for i in range(20)]  # 200 kB at 64 KiB packs
    stored, dup, nbytes, packs = upload(store, [*blobs, blobs[0]])
    assert (stored, dup, nbytes) == (20, 1, 200_000)
    assert packs == 3  # a pack closes once it reaches 64 KiB: 7 + 7 + 6 blobs
    assert store.missing([b[0] for b in blobs]) == [False] * 20
    assert store.catalog.count_blobs() == 20
    # A second stream re-sending everything stores nothing.
    assert upload(store, blobs) == (0, 20, 0, 0)
    assert list(store.backend.staging_dir().iterdir()) == []
    got = {i: (t, e, err) for i, t, e, err in store.read_blobs([b[0] for b in blobs])}
    assert all(got[i] == (1, env, "") for i, env in blobs)


def test_upload_validates_input(store: BlobStore, make_blob: MakeBlob) -> None:
    blob_id, env = make_blob(1)
    with store.upload() as session:
        for bad in [
            (b"short", 1, env),
            (blob_id, 0, env),
            (blob_id, 3, env),
            (blob_id, 1, b"x" * 47),
            (blob_id, 1, b"x" * (MAX_BLOB_SIZE + 1)),
        ]:
            with pytest.raises(UsageError):
                session.add(*bad)
        assert session.add(blob_id, 2, env)
    assert store.read_blobs([blob_id]).__next__()[1] == 2


def test_abort_discards_open_pack(store: BlobStore, make_blob: MakeBlob) -> None:
    blobs = [make_blob(i, 10_000) for i in range(10)]
    with pytest.raises(RuntimeError), store.upload() as session:
        for blob_id, env in blobs:
            session.add(blob_id, 1, env)
        raise RuntimeError("stream cut")
    # The first full pack (7 blobs) was indexed; the open one is gone.
    assert store.missing([b[0] for b in blobs]) == [False] * 7 + [True] * 3
    assert list(store.backend.staging_dir().iterdir()) == []


def test_read_blobs_unknown_and_order(store: BlobStore, make_blob: MakeBlob) -> None:
    blobs = [make_blob(i, 30_000) for i in range(6)]
    upload(store, blobs)
    unknown = os.urandom(32)
    result = list(store.read_blobs([blobs[5][0], unknown, blobs[0][0], blobs[1][0]]))
    assert result[0] == (unknown, 0, None, "not stored")
    assert {r[0] for r in result} == {blobs[5][0], unknown, blobs[0][0], blobs[1][0]}
    assert all(r[2] is not None for r in result[1:])


def test_commit_snapshot(store: BlobStore, make_blob: MakeBlob) -> None:
    blobs = [make_blob(i) for i in range(5)]
    upload(store, blobs[:4])
    refs = [b[0] for b in blobs]
    root = refs[0]
    store.put_keys([KEY])
    with pytest.raises(NotFound, match="1 referenced blobs are not stored") as exc:
        store.commit_snapshot(info(SID, root, (KEY.key_id,)), refs)
    assert blobs[4][0].hex() in str(exc.value)
    assert list(store.backend.list("snapshots/")) == []
    assert store.list_snapshots() == []

    upload(store, blobs[4:])
    assert store.commit_snapshot(info(SID, root, (KEY.key_id,)), reversed(refs + refs)) is False
    assert store.commit_snapshot(info(SID, root, (KEY.key_id,)), refs) is True  # idempotent
    assert store.snapshot_refs(SID) == frozenset(refs)
    assert store.get_snapshot(SID[:6]).root == root
    assert [s.id for s in store.list_snapshots(agent="node1")] == [SID]
    record = decode_record(store.backend.get(record_path(SID)))
    assert list(record.refs) == sorted(refs)


def test_commit_refuses_bad_input(store: BlobStore, make_blob: MakeBlob) -> None:
    blob_id, env = make_blob(1)
    upload(store, [(blob_id, env)])
    with pytest.raises(UsageError):
        store.commit_snapshot(info("not-hex", blob_id), [blob_id])
    with pytest.raises(UsageError, match="root"):
        store.commit_snapshot(info(SID, os.urandom(32)), [blob_id])
    with pytest.raises(NotFound, match="data keys are not stored"):  # rule 3
        store.commit_snapshot(info(SID, blob_id, (b"?" * 16,)), [blob_id])


def test_keys(store: BlobStore) -> None:
    other = common_pb2.WrappedKey(key_id=b"o" * 16, wrapped=b"wrapped", provider="vault-transit")
    store.put_keys([KEY, other])
    store.put_keys([KEY])
    assert store.get_keys([b"o" * 16, b"x" * 16, KEY.key_id]) == [other, KEY]
    assert sorted(store.backend.list("keys/")) == sorted(
        f"keys/{k.key_id.hex()}" for k in (KEY, other)
    )
    with pytest.raises(UsageError):
        store.put_keys([common_pb2.WrappedKey(key_id=b"short")])


def test_recover_after_crash(tmp_path: Path, make_blob: MakeBlob) -> None:
    backend = LocalBackend(tmp_path / "repo")
    catalog = SqliteCatalog(tmp_path / "cat.db")
    store = BlobStore(backend, catalog, pack_size=64 * 1024)
    indexed = [make_blob(i) for i in range(3)]
    upload(store, indexed)
    # Crash between rules 1 and 2: a pack renamed into data/ but never indexed.
    writer = PackWriter(backend)
    orphan = [make_blob(100 + i) for i in range(4)]
    for blob_id, env in orphan:
        writer.add(blob_id, 1, env)
    result = writer.finish()
    # Crash inside rule 4: the record is durable, the catalog row is not.
    refs = [b[0] for b in indexed + orphan]
    backend.put(record_path(SID), encode_record(info(SID, refs[0]), refs))
    # A key file without its row, an upload in progress and a broken pack.
    backend.put(f"keys/{KEY.key_id.hex()}", KEY.SerializeToString())
    (backend.staging_dir() / "pack-in-progress.tmp").write_bytes(b"half a pack")
    backend.put("data/ee/" + "ee" * 32, b"not a pack at all, long enough to have a trailer" * 2)
    # A whole pack under another pack's name (a v2 pack is named by its header hash).
    backend.put("data/dd/" + "dd" * 32, backend.get(pack_path(result.pack_id)))
    catalog.close()

    catalog = SqliteCatalog(tmp_path / "cat.db")
    store = BlobStore(backend, catalog)
    assert store.missing([b[0] for b in orphan]) == [True] * 4
    stats = store.recover()
    assert (
        stats.staging_removed,
        stats.packs_indexed,
        stats.snapshots_indexed,
        stats.keys_indexed,
    ) == (1, 1, 1, 1)
    problems = sorted(stats.problems)
    assert len(problems) == 2 and "ee" * 32 in problems[1]
    assert problems[0] == f"pack {'dd' * 32}: header does not match its name (not indexed)"
    assert not catalog.has_pack(bytes.fromhex("dd" * 32))
    assert store.missing(refs) == [False] * 7
    assert catalog.has_pack(result.pack_id)
    assert store.get_snapshot(SID).root == refs[0]
    assert store.get_keys([KEY.key_id]) == [KEY]
    assert list(backend.staging_dir().iterdir()) == []
    again = store.recover()  # idempotent
    assert (again.packs_indexed, again.snapshots_indexed, again.keys_indexed) == (0, 0, 0)
    catalog.close()


def test_catalog_rebuilt_from_repository(tmp_path: Path, make_blob: MakeBlob) -> None:
    backend = LocalBackend(tmp_path / "repo")
    store = BlobStore(backend, SqliteCatalog(tmp_path / "a.db"), pack_size=4096)
    blobs = [make_blob(i, 2000) for i in range(10)]
    upload(store, blobs)
    store.put_keys([KEY])
    store.commit_snapshot(info(SID, blobs[0][0], (KEY.key_id,)), [b[0] for b in blobs])
    rebuilt = BlobStore(backend, SqliteCatalog(tmp_path / "b.db"))
    stats = rebuilt.recover()
    assert (stats.packs_indexed, stats.snapshots_indexed, stats.keys_indexed) == (4, 1, 1)
    assert rebuilt.catalog.count_blobs() == 10
    assert [r[3] for r in rebuilt.read_blobs([b[0] for b in blobs])] == [""] * 10


@pytest.mark.root
def test_disk_full_during_upload(small_disk: Path, tmp_path: Path, make_blob: MakeBlob) -> None:
    backend = LocalBackend(small_disk / "repo")
    catalog = SqliteCatalog(tmp_path / "cat.db")  # the catalog lives elsewhere
    store = BlobStore(backend, catalog, pack_size=256 * 1024)
    blobs = [make_blob(i, 100_000) for i in range(40)]  # 4 MB into 2 MiB
    with pytest.raises(ResourceExhausted, match="coordinator disk full"), store.upload() as session:
        for blob_id, env in blobs:
            session.add(blob_id, 1, env)
    stored = [not m for m in store.missing([b[0] for b in blobs])]
    assert any(stored), "earlier completed packs stay indexed"
    assert not all(stored)
    # Every indexed blob is readable: nothing half-written is visible.
    ids = [b[0] for b, s in zip(blobs, stored, strict=True) if s]
    assert all(r[3] == "" for r in store.read_blobs(ids))
    assert list(backend.staging_dir().iterdir()) == []
    assert store.recover().packs_indexed == 0
    # No pack file exists that the index does not know.
    assert sorted(backend.list("data/")) == sorted(pack_path(p) for p in catalog.list_pack_ids())
    # Disk full on a snapshot record: refused, and nothing becomes visible.
    for size in (64 * 1024, 4096, 1):
        for i in range(1000):
            try:
                backend.put(f"filler/{size}-{i}", os.urandom(size))
            except ResourceExhausted:
                break
    with pytest.raises(ResourceExhausted):
        store.put_keys([KEY])
        store.commit_snapshot(info(SID, ids[0]), ids)
    assert list(backend.list("snapshots/")) == []
    assert store.list_snapshots() == []
    assert list(backend.staging_dir().iterdir()) == []
    catalog.close()


def test_snapshot_refs_detects_damage(store: BlobStore, make_blob: MakeBlob) -> None:
    blob_id, env = make_blob(1)
    upload(store, [(blob_id, env)])
    store.put_keys([KEY])
    store.commit_snapshot(info(SID, blob_id), [blob_id])
    data = bytearray(store.backend.get(record_path(SID)))
    data[10] ^= 1
    store.backend.put(record_path(SID), bytes(data))
    with pytest.raises(IntegrityError):
        store.snapshot_refs(SID)
    with pytest.raises(NotFound):
        store.snapshot_refs("f" * 32)


def test_commit_names_every_key_the_snapshot_needs(store: BlobStore, make_blob: MakeBlob) -> None:
    # Blobs deduplicated from an older snapshot keep the key that sealed them: a commit
    # lists it too (read from the envelopes' clear key ids), so a restore fetches it.
    old_id, old_env = make_blob(1)
    new_id, new_env = make_blob(2)
    newer = b"n" * 16
    new_env = new_env[:4] + newer + new_env[20:]
    upload(store, [(old_id, old_env), (new_id, new_env)])
    store.put_keys([KEY, common_pb2.WrappedKey(key_id=newer, provider="file")])
    snap = info(SID, new_id, (newer,))
    store.commit_snapshot(snap, [old_id, new_id])
    assert list(store.get_snapshot(SID).key_ids) == sorted([KEY.key_id, newer])
    # A blob whose key was never stored makes the snapshot unreadable: refused.
    orphan_id, orphan_env = make_blob(3)
    upload(store, [(orphan_id, orphan_env[:4] + b"?" * 16 + orphan_env[20:])])
    with pytest.raises(NotFound, match="data keys are not stored"):
        store.commit_snapshot(info("ab" * 16, orphan_id), [orphan_id])


def test_session_stats_after_abort(store: BlobStore, make_blob: MakeBlob) -> None:
    blobs = [make_blob(i, 10_000) for i in range(9)]
    session = store.upload()
    for blob_id, env in blobs:
        session.add(blob_id, 1, env)
    session.abort()
    # 7 blobs reached a closed pack; the 2 in the open pack were discarded.
    assert session.stats == UploadStats(7, 0, 70_000, 1)
    with pytest.raises(UsageError):
        session.add(make_blob(99)[0], 1, b"x" * 48)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.binary(min_size=32, max_size=32), max_size=50),
    st.text(max_size=20),
    st.integers(min_value=0, max_value=2**62),
)
def test_snapshot_record_round_trip(refs: list[bytes], agent: str, started: int) -> None:
    snap = common_pb2.SnapshotInfo(id=SID, agent=agent, started_ns=started, root=b"r" * 32)
    data = encode_record(snap, refs + refs[:3])
    record = decode_record(data)
    assert record.info == snap and list(record.refs) == sorted(set(refs))
    assert data[:8] == b"CBSN\x01\0\0\0"
    for cut in (data[:-1], data[:20], data + b"\0"):
        with pytest.raises(IntegrityError):
            decode_record(cut)
    if refs:
        flipped = bytearray(data)
        flipped[-40] ^= 1  # inside the last reference
        with pytest.raises(IntegrityError, match="checksum"):
            decode_record(bytes(flipped))


def test_a_reference_of_the_wrong_size_is_refused() -> None:
    snap = common_pb2.SnapshotInfo(id=SID, root=b"r" * 32)
    with pytest.raises(UsageError, match="reference of 31 bytes"):
        encode_record(snap, [b"a" * 32, b"b" * 31, b"c" * 32])
    with pytest.raises(UsageError, match="reference of 0 bytes"):
        encode_record(snap, [b""])
