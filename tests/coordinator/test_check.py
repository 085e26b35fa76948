"""check (design.md §Check): a clean repository passes; damage is found and named."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest

from coordinator.check import CheckEvent, check
from coordinator.pack import pack_path
from coordinator.snaprecord import record_path
from coordinator.store import BlobStore
from core.errors import UsageError
from protos.clawback.v1 import common_pb2

MakeBlob = Callable[..., tuple[bytes, bytes]]
SID = "00112233445566778899aabbccddeeff"


def populate(store: BlobStore, make_blob: MakeBlob) -> list[tuple[bytes, bytes]]:
    blobs = [make_blob(i, 12_000) for i in range(16)]  # 3 packs at 64 KiB
    with store.upload() as session:
        for blob_id, env in blobs:
            session.add(blob_id, common_pb2.BLOB_TYPE_DATA, env)
    store.put_keys([common_pb2.WrappedKey(key_id=b"k" * 16, provider="file")])
    info = common_pb2.SnapshotInfo(id=SID, agent="n", source="s", root=blobs[0][0])
    store.commit_snapshot(info, [b[0] for b in blobs])
    return blobs


def run(store: BlobStore, **kw: object) -> tuple[list[CheckEvent], CheckEvent]:
    events = list(check(store, **kw))  # type: ignore[arg-type]
    assert events[-1].kind == "summary"
    return [e for e in events if e.kind == "error"], events[-1]


def local_file(store: BlobStore, path: str) -> Path:
    return store.backend.root / path  # type: ignore[attr-defined,no-any-return]


def test_clean_repository_passes(store: BlobStore, make_blob: MakeBlob) -> None:
    populate(store, make_blob)
    events = list(check(store, read_data=True))
    progress = [e for e in events if e.kind == "progress"]
    assert [e.packs_done for e in progress] == [1, 2, 3]
    assert all(e.packs_total == 3 for e in progress)
    summary = events[-1]
    assert summary.kind == "summary" and summary.errors == 0
    assert "no errors" in summary.message and "3 packs, 3 read, 1 snapshots" in summary.message
    _, summary = run(store, percent=34, rng=random.Random(1))
    assert "2 read" in summary.message and summary.errors == 0


def test_pack_under_another_name_is_found_without_reading_data(
    store: BlobStore, make_blob: MakeBlob
) -> None:
    blobs = populate(store, make_blob)
    loc = store.catalog.blob_locations([blobs[0][0]])[blobs[0][0]]
    other = "ab" * 32
    copy = local_file(store, f"data/ab/{other}")
    copy.parent.mkdir(exist_ok=True)
    copy.write_bytes(local_file(store, pack_path(loc.pack)).read_bytes())
    expected = [
        f"pack {other}: header does not match its name",
        f"pack {other}: not indexed (restart the coordinator to recover it)",
    ]
    errors, _ = run(store)
    assert sorted(e.message for e in errors if e.pack == other) == expected
    errors, _ = run(store, read_data=True)  # said once, not again by the data pass
    assert sorted(e.message for e in errors if e.pack == other) == expected
    assert all(e.pack == other for e in errors)


def test_flipped_byte_is_named(store: BlobStore, make_blob: MakeBlob) -> None:
    blobs = populate(store, make_blob)
    victim_id = blobs[9][0]
    loc = store.catalog.blob_locations([victim_id])[victim_id]
    path = local_file(store, pack_path(loc.pack))
    data = bytearray(path.read_bytes())
    data[loc.offset + 100] ^= 0x40
    path.write_bytes(bytes(data))

    # Structural check reads only headers: the flip is inside an envelope.
    errors, _ = run(store)
    assert errors == []
    errors, summary = run(store, read_data=True)
    # A version 2 pack is named by its header, which the flip left alone: the blob's checksum
    # alone tells (test_pack.py covers version 1, where the name tells as well).
    assert summary.errors == len(errors) == 1
    blob_error = next(e for e in errors if e.blob)
    assert blob_error.blob == victim_id and blob_error.pack == loc.pack.hex()
    assert victim_id.hex() in blob_error.message and loc.pack.hex() in blob_error.message
    assert "checksum mismatch" in blob_error.message

    # A checked read gets an error for that blob only.
    results = {r[0]: r for r in store.read_blobs([b[0] for b in blobs])}
    bad = results.pop(victim_id)
    assert bad[2] is None
    assert bad[3] == f"blob {victim_id.hex()[:16]} in pack {loc.pack.hex()[:16]}: checksum mismatch"
    assert all(
        r[3] == "" and r[2] == env
        for (bid, env) in blobs
        if bid != victim_id
        for r in [results[bid]]
    )

    # An unchecked read (an agent's restore, which authenticates every envelope itself)
    # returns the damaged envelope as stored.
    unchecked = {r[0]: r for r in store.read_blobs([victim_id], verify=False)}
    assert unchecked[victim_id][3] == ""
    assert unchecked[victim_id][2] != dict(blobs)[victim_id]


def test_damaged_header_is_named(store: BlobStore, make_blob: MakeBlob) -> None:
    populate(store, make_blob)
    pack = store.catalog.list_pack_ids()[1]
    path = local_file(store, pack_path(pack))
    data = bytearray(path.read_bytes())
    data[-50] ^= 1  # inside the header
    path.write_bytes(bytes(data))
    errors, _ = run(store)
    assert len(errors) == 1 and errors[0].pack == pack.hex() and "header hash" in errors[0].message


def test_deleted_pack_is_reported(store: BlobStore, make_blob: MakeBlob) -> None:
    populate(store, make_blob)
    pack = store.catalog.list_pack_ids()[0]
    store.backend.delete(pack_path(pack))
    errors, summary = run(store)
    missing = [e for e in errors if "missing from storage" in e.message]
    assert len(missing) == 1 and missing[0].pack == pack.hex()
    assert summary.errors == len(errors)
    # A restore of its blobs gets errors, not an exception.
    ids = [e.id for e in store.catalog.pack_blobs(pack)]
    assert all("pack missing" in r[3] for r in store.read_blobs(ids))


def test_snapshot_damage(store: BlobStore, make_blob: MakeBlob) -> None:
    populate(store, make_blob)
    path = local_file(store, record_path(SID))
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    orphan = "ff" * 16
    store.catalog.put_snapshot(common_pb2.SnapshotInfo(id=orphan, root=b"r" * 32))
    errors, _ = run(store)
    messages = " | ".join(e.message for e in errors)
    assert "checksum mismatch" in messages and SID in messages
    assert f"snapshot {orphan}: in the catalog but" in messages


def test_unindexed_pack_and_bad_percent(store: BlobStore, make_blob: MakeBlob) -> None:
    populate(store, make_blob)
    store.catalog.close()
    from coordinator.catalog import SqliteCatalog

    fresh = BlobStore(store.backend, SqliteCatalog(local_file(store, "..") / "fresh.db"))
    errors, _ = run(fresh)
    assert sum("not indexed" in e.message for e in errors) == 3
    with pytest.raises(UsageError):
        list(check(fresh, percent=0))
    fresh.catalog.close()
