"""Protocol v1 plumbing both sides share: message limits, id lists, bitmaps, and error <-> status mapping."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import grpc

from core import errors, format
from core.format import ID_SIZE, MAX_IDS_PER_QUERY, MAX_MESSAGE_SIZE
from protos.clawback.v1 import common_pb2

# Keepalives let a dialling agent notice a dead link within ~30 s even when idle.
CHANNEL_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_SIZE),
    ("grpc.max_receive_message_length", MAX_MESSAGE_SIZE),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
SERVER_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_SIZE),
    ("grpc.max_receive_message_length", MAX_MESSAGE_SIZE),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
]


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


# Lengths of names and tree nodes: looked up, not computed, once per entry in a backup's walk
# and tree build.
_VARINTS = tuple(_varint(i) for i in range(1 << 14))


def varint(n: int) -> bytes:
    """A protobuf base-128 varint (for building wire bytes without message objects)."""
    if 0 <= n < 1 << 14:
        return _VARINTS[n]
    return _varint(n)


def _read_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise errors.UsageError("malformed message: truncated or overlong varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _skip(buf: bytes, pos: int, end: int, wire_type: int) -> int:
    """The position after an unknown field's value (protobuf: unknown fields are ignored)."""
    if wire_type == 0:
        return _read_varint(buf, pos, end)[1]
    if wire_type == 1:
        pos += 8
    elif wire_type == 2:
        n, pos = _read_varint(buf, pos, end)
        pos += n
    elif wire_type == 5:
        pos += 4
    else:
        raise errors.UsageError(f"malformed message: wire type {wire_type}")
    if pos > end:
        raise errors.UsageError("malformed message: field runs past its end")
    return pos


def parse_blobs(
    msg: bytes, blobs_field: int, text_field: int = 0
) -> tuple[str, list[tuple[bytes, int, memoryview, str]]]:
    """A message of repeated BlobData (field `blobs_field`), read straight from its wire bytes:
    (the string in `text_field`, if any; [(id, type, envelope, error)]).

    Envelopes are views into `msg`: no copy of up to MAX_MESSAGE_SIZE bytes
    per message, as reading them from a parsed message makes (empty when
    absent). Accepts what
    protobuf's parser accepts (fields in any order, the last value of a
    non-repeated field wins, unknown fields skipped); raises UsageError
    otherwise. Validating ids, types and sizes is the caller's.
    """
    view = memoryview(msg)
    end = len(msg)
    pos = 0
    text = b""
    blobs: list[tuple[bytes, int, memoryview, str]] = []
    while pos < end:
        key, pos = _read_varint(msg, pos, end)
        field, wt = key >> 3, key & 7
        if wt != 2 or field not in (blobs_field, text_field):
            pos = _skip(msg, pos, end, wt)
            continue
        n, pos = _read_varint(msg, pos, end)
        stop = pos + n
        if stop > end:
            raise errors.UsageError("malformed message: field runs past its end")
        if field == blobs_field:
            blobs.append(_parse_blob(msg, view, pos, stop))
        else:
            text = msg[pos:stop]
        pos = stop
    return _utf8(text), blobs


def parse_upload(msg: bytes) -> tuple[str, list[tuple[bytes, int, memoryview]]]:
    """An UploadRequest's (job_id, [(id, type, envelope)]) from its wire bytes (`parse_blobs`)."""
    job_id, blobs = parse_blobs(msg, 2, 1)
    return job_id, [(i, t, e) for i, t, e, _ in blobs]


def _utf8(raw: bytes) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise errors.UsageError("malformed message: a string field is not UTF-8") from None


def _parse_blob(
    msg: bytes, view: memoryview, pos: int, end: int
) -> tuple[bytes, int, memoryview, str]:
    blob_id = b""
    btype = 0
    envelope = view[0:0]
    error = b""
    while pos < end:
        key, pos = _read_varint(msg, pos, end)
        field, wt = key >> 3, key & 7
        if field == 2 and wt == 0:
            btype, pos = _read_varint(msg, pos, end)
            continue
        if wt != 2 or field not in (1, 3, 4):
            pos = _skip(msg, pos, end, wt)
            continue
        n, pos = _read_varint(msg, pos, end)
        stop = pos + n
        if stop > end:
            raise errors.UsageError("malformed message: field runs past its end")
        if field == 1:
            blob_id = msg[pos:stop]
        elif field == 3:
            envelope = view[pos:stop]
        else:
            error = msg[pos:stop]
        pos = stop
    return blob_id, btype, envelope, _utf8(error)


def pack_ids(ids: Iterable[bytes]) -> bytes:
    return b"".join(ids)


def unpack_ids(blob: bytes, limit: int = MAX_IDS_PER_QUERY) -> list[bytes]:
    """Split concatenated ids; raises UsageError for a ragged or oversized list."""
    if len(blob) % ID_SIZE:
        raise errors.UsageError(f"id list length {len(blob)} is not a multiple of {ID_SIZE}")
    n = len(blob) // ID_SIZE
    if n > limit:
        raise errors.UsageError(f"{n} ids in one request; the limit is {limit}")
    return [blob[i : i + ID_SIZE] for i in range(0, len(blob), ID_SIZE)]


def make_bitmap(flags: Sequence[bool]) -> bytes:
    out = bytearray((len(flags) + 7) // 8)
    for i, f in enumerate(flags):
        if f:
            out[i >> 3] |= 1 << (i & 7)
    return bytes(out)


def read_bitmap(bitmap: bytes, n: int) -> list[bool]:
    if len(bitmap) < (n + 7) // 8:
        raise errors.TransportError("bitmap shorter than the id list it answers")
    return [bool(bitmap[i >> 3] >> (i & 7) & 1) for i in range(n)]


_TO_STATUS: list[tuple[type[errors.ClawbackError], grpc.StatusCode]] = [
    (errors.UsageError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.ConfigError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.KeyMaterialError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.RepositoryMissing, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.IntegrityError, grpc.StatusCode.DATA_LOSS),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.TransportError, grpc.StatusCode.UNAVAILABLE),
]

# A prefix on the status detail lets the other side rebuild the same error class.
_CLASS_TAG = {cls: cls.__name__ for cls, _ in _TO_STATUS}
_BY_TAG = {name: cls for cls, name in _CLASS_TAG.items()}


def status_for(exc: errors.ClawbackError) -> tuple[grpc.StatusCode, str]:
    for cls, code in _TO_STATUS:
        if isinstance(exc, cls):
            return (
                code,
                f"[{type(exc).__name__ if type(exc).__name__ in _BY_TAG else cls.__name__}] {exc}",
            )
    return grpc.StatusCode.INTERNAL, str(exc)


_FROM_STATUS: dict[grpc.StatusCode, type[errors.ClawbackError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.UsageError,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExists,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: errors.PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
    grpc.StatusCode.DATA_LOSS: errors.IntegrityError,
    grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.TransportError,
    grpc.StatusCode.CANCELLED: errors.TransportError,
}


# What a refused TLS handshake looks like from the client side: the peer just closes.
_TLS_SIGNS = ("Socket closed", "handshake", "SSL", "certificate")
TLS_HINT = (
    "the TLS handshake was refused: check that this certificate is signed by the CA the "
    "other side trusts, is not expired, and names the right host"
)


def error_from_rpc(exc: grpc.RpcError, what: str = "") -> errors.ClawbackError:
    """Translate a gRPC failure into the ClawbackError the server meant (or the closest)."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    detail = (exc.details() if hasattr(exc, "details") else "") or ""
    cls: type[errors.ClawbackError] | None = None
    if detail.startswith("[") and "] " in detail:
        tag, rest = detail[1:].split("] ", 1)
        if tag in _BY_TAG:
            cls, detail = _BY_TAG[tag], rest
    if cls is None:  # not from our server: the transport itself failed
        cls = _FROM_STATUS.get(code, errors.ClawbackError)
        if code == grpc.StatusCode.UNAVAILABLE:
            detail = f"coordinator unreachable: {detail}"
            if any(s in detail for s in _TLS_SIGNS):
                detail += f" ({TLS_HINT})"
    msg = f"{what}: {detail}" if what else detail
    if cls is errors.ConfigError:
        cls = errors.UsageError
    return cls(msg)


def repo_config_to_wire(cfg: format.RepoConfig) -> common_pb2.RepoConfig:
    """The repository config as sent in Welcome and by GetRepository."""
    from core import chunker  # pyfastcdc: not for the CLI, which imports this module

    p = chunker.params(cfg.chunker)
    paged = chunker.params(cfg.paged_chunker) if cfg.paged_chunker else None
    return common_pb2.RepoConfig(
        version=cfg.version,
        repo_id=cfg.repo_id,
        chunker=cfg.chunker,
        chunk_min=p.min_size,
        chunk_avg=p.avg_size,
        chunk_max=p.max_size,
        id_algorithm=cfg.id_algorithm,
        compression=cfg.compression,
        cipher=cfg.cipher,
        key_check=bytes.fromhex(cfg.key_check),
        max_blob_size=format.MAX_BLOB_SIZE,
        max_message_size=format.MAX_MESSAGE_SIZE,
        paged_chunker=cfg.paged_chunker,
        paged_files=cfg.paged_files,
        paged_chunk_max=paged.max_size if paged else 0,
        paged_formats=cfg.paged_formats,
    )


def repo_config_from_wire(msg: common_pb2.RepoConfig) -> format.RepoConfig:
    """The agent's view of the repository config from a Welcome."""
    return format.RepoConfig(
        repo_id=msg.repo_id,
        chunker=msg.chunker,
        compression=msg.compression,
        cipher=msg.cipher,
        id_algorithm=msg.id_algorithm,
        key_check=msg.key_check.hex(),
        version=msg.version,
        paged_chunker=msg.paged_chunker,
        paged_files=tuple(msg.paged_files),
        paged_formats=tuple(msg.paged_formats),
    )
