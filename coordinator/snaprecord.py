"""Snapshot records: the durable file that names a snapshot and every blob it uses (design.md §Snapshot records).

record   = "CBSN" version:u8(=1) reserved:u8[3] info_len:u32 info
           ref_count:u32 ref*ref_count checksum
info     = clawback.v1.SnapshotInfo (protobuf)
ref      = id:32, sorted, unique
checksum = BLAKE3(everything before it), 32 bytes
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterable
from dataclasses import dataclass

import blake3
from google.protobuf.message import DecodeError

from core.errors import IntegrityError, UsageError
from core.format import ID_SIZE
from protos.clawback.v1 import common_pb2

MAGIC = b"CBSN"
VERSION = 1
PREFIX = struct.Struct("<4sB3sI")  # magic, version, reserved, info_len
COUNT = struct.Struct("<I")
CHECKSUM_SIZE = 32


@dataclass(frozen=True)
class SnapshotRecord:
    info: common_pb2.SnapshotInfo
    refs: tuple[bytes, ...]  # sorted, unique


def record_path(snapshot_id: str) -> str:
    """design.md §Repository layout: snapshots/<32 hex>."""
    return f"snapshots/{snapshot_id}"


def sorted_refs(refs: Iterable[bytes]) -> list[bytes]:
    """The reference list in record order: sorted and unique; UsageError on a bad id."""
    # Sorting first and dropping repeats after (in C) is linear on a list that is in order
    # already: the record's encoder gets the list the commit sorted.
    out = list(dict.fromkeys(sorted(refs)))
    if out and set(map(len, out)) != {ID_SIZE}:
        bad = next(r for r in out if len(r) != ID_SIZE)
        raise UsageError(f"snapshot reference of {len(bad)} bytes (ids are {ID_SIZE})")
    return out


def encode_record(info: common_pb2.SnapshotInfo, refs: Iterable[bytes]) -> bytes:
    """Serialize a record; `refs` may come in any order and with repeats."""
    ordered = sorted_refs(refs)
    info_bytes = info.SerializeToString(deterministic=True)
    body = b"".join(
        [
            PREFIX.pack(MAGIC, VERSION, b"\0\0\0", len(info_bytes)),
            info_bytes,
            COUNT.pack(len(ordered)),
            *ordered,
        ]
    )
    return body + blake3.blake3(body).digest()


def decode_record(data: bytes, name: str = "snapshot record") -> SnapshotRecord:
    """Parse and verify a record; IntegrityError naming `name` on any mismatch."""
    minimum = PREFIX.size + COUNT.size + CHECKSUM_SIZE
    if len(data) < minimum:
        raise IntegrityError(f"{name}: too short ({len(data)} bytes)")
    body, stored = data[:-CHECKSUM_SIZE], data[-CHECKSUM_SIZE:]
    if blake3.blake3(body).digest() != stored:
        raise IntegrityError(f"{name}: checksum mismatch")
    magic, version, reserved, info_len = PREFIX.unpack_from(body, 0)
    if magic != MAGIC:
        raise IntegrityError(f"{name}: bad magic {magic!r}")
    if version != VERSION:
        raise IntegrityError(f"{name}: record version {version} is not supported")
    if reserved != b"\0\0\0":
        raise IntegrityError(f"{name}: reserved bytes are not zero")
    pos = PREFIX.size
    if info_len > len(body) - pos - COUNT.size:
        raise IntegrityError(f"{name}: info length {info_len} exceeds the record")
    info = common_pb2.SnapshotInfo()
    try:
        info.ParseFromString(body[pos : pos + info_len])
    except DecodeError as exc:
        raise IntegrityError(f"{name}: snapshot info does not parse: {exc}") from exc
    pos += info_len
    (count,) = COUNT.unpack_from(body, pos)
    pos += COUNT.size
    if len(body) - pos != count * ID_SIZE:
        raise IntegrityError(f"{name}: {count} references do not fill {len(body) - pos} bytes")
    refs = tuple(body[i : i + ID_SIZE] for i in range(pos, len(body), ID_SIZE))
    if any(a >= b for a, b in itertools.pairwise(refs)):
        raise IntegrityError(f"{name}: references are not sorted and unique")
    return SnapshotRecord(info, refs)
