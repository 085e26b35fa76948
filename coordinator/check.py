"""Repository check without any key (design.md §Check): structure always, pack contents with --read-data."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from coordinator.pack import MISNAMED, pack_id_from_path, pack_path, read_pack_header, verify_pack
from coordinator.snaprecord import decode_record, record_path
from coordinator.store import BlobStore
from core.errors import IntegrityError, NotFound, UsageError

Kind = Literal["progress", "error", "summary"]


@dataclass(frozen=True)
class CheckEvent:
    """One finding or progress report; `pack` is the pack's hex name, `blob` a blob id."""

    kind: Kind
    message: str
    pack: str = ""
    blob: bytes = b""
    packs_done: int = 0
    packs_total: int = 0
    errors: int = 0


def check(
    store: BlobStore,
    read_data: bool = False,
    percent: int | None = None,
    rng: random.Random | None = None,
) -> Iterator[CheckEvent]:
    """Check the repository, yielding progress, one error event per problem and a summary.

    Structure (always): every pack's trailer and header parse and hash; the
    index entries of each pack match its header; every indexed pack exists;
    every snapshot record parses, its checksum holds, and every reference is
    indexed. `read_data` reads every pack whole; `percent` (1..100) reads a
    random subset of packs instead and implies `read_data`.
    """
    if percent is not None and not 1 <= percent <= 100:
        raise UsageError(f"read-data subset must be 1..100 percent, not {percent}")
    rng = rng or random.Random()
    backend, catalog = store.backend, store.catalog
    errors = done = total = 0

    def error(message: str, pack: bytes | None = None, blob: bytes | None = None) -> CheckEvent:
        nonlocal errors
        errors += 1
        return CheckEvent(
            "error", message, pack.hex() if pack else "", blob or b"", done, total, errors
        )

    stored: list[bytes] = []
    for path in backend.list("data/"):
        pack_id = pack_id_from_path(path)
        if pack_id is None:
            yield error(f"{path}: not a pack name")
        else:
            stored.append(pack_id)
    stored.sort()
    indexed = {row.id: row for row in catalog.iter_packs()}
    total = len(stored)

    for pack_id in sorted(set(indexed) - set(stored)):
        yield error(f"pack {pack_id.hex()}: indexed but missing from storage", pack_id)

    to_read: set[bytes] = set()
    if percent is not None:
        count = math.ceil(total * percent / 100)  # at least N%, and at least one pack
        to_read = set(rng.sample(stored, count))
    elif read_data:
        to_read = set(stored)

    for pack_id in stored:
        path = pack_path(pack_id)
        name = f"pack {pack_id.hex()}"
        try:
            size = backend.stat(path)
            header = read_pack_header(backend, path, size)
        except (IntegrityError, NotFound) as exc:
            yield error(str(exc), pack_id)
            entries = None
        else:
            entries = header.entries
            misnamed = header.names(pack_id) is False  # version 2: named by its header hash
            if misnamed:
                yield error(f"{name}: {MISNAMED}", pack_id)
        if entries is not None:
            row = indexed.get(pack_id)
            if row is None:
                yield error(f"{name}: not indexed (restart the coordinator to recover it)", pack_id)
            elif row.size != size or row.blob_count != len(entries):
                yield error(
                    f"{name}: index says {row.size} bytes / {row.blob_count} blobs, "
                    f"storage has {size} bytes / {len(entries)} blobs",
                    pack_id,
                )
            by_id = {e.id: e for e in entries}
            for blob in catalog.pack_blobs(pack_id) if row is not None else ():
                if by_id.get(blob.id) != blob:
                    yield error(
                        f"blob {blob.id.hex()} in {name}: index entry does not match the pack header",
                        pack_id,
                        blob.id,
                    )
        if pack_id in to_read and entries is not None:
            for problem in verify_pack(backend, pack_id):
                if misnamed and problem.blob is None and problem.message.endswith(MISNAMED):
                    continue  # said above
                yield error(problem.message, pack_id, problem.blob)
        done += 1
        yield CheckEvent("progress", f"{name}: checked", pack_id.hex(), b"", done, total, errors)

    snapshots = 0
    rows = {info.id for info in catalog.list_snapshots()}
    on_disk: set[str] = set()
    for path in backend.list("snapshots/"):
        snapshot_id = path.split("/", 1)[1]
        on_disk.add(snapshot_id)
        snapshots += 1
        try:
            record = decode_record(backend.get(path), f"snapshot record {path}")
        except (IntegrityError, NotFound) as exc:
            yield error(str(exc))
            continue
        if record.info.id != snapshot_id:
            yield error(f"snapshot record {path}: holds snapshot {record.info.id!r}")
        if snapshot_id not in rows:
            yield error(f"snapshot {snapshot_id}: record not in the catalog (restart to recover)")
        absent = [r for r, m in zip(record.refs, catalog.missing(record.refs), strict=True) if m]
        for ref in absent[:10]:
            yield error(
                f"snapshot {snapshot_id}: referenced blob {ref.hex()} is not stored", blob=ref
            )
        if len(absent) > 10:
            yield error(
                f"snapshot {snapshot_id}: {len(absent) - 10} more referenced blobs are not stored"
            )
    for snapshot_id in sorted(rows - on_disk):
        yield error(
            f"snapshot {snapshot_id}: in the catalog but {record_path(snapshot_id)} is missing"
        )

    read = len(to_read)
    yield CheckEvent(
        "summary",
        f"{total} packs, {read} read, {snapshots} snapshots checked: "
        + (f"{errors} errors" if errors else "no errors found"),
        "",
        b"",
        done,
        total,
        errors,
    )
