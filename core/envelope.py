"""The sealed blob envelope (design.md §Blob envelope): compress, then AEAD-encrypt with a named key.

    offset  size  field
    0       1     version (1)
    1       1     flags: bit 0 = zstd-compressed, other bits 0
    2       1     blob type (1 data, 2 tree)
    3       1     cipher (1 = aes256-gcm)
    4       16    key id: names the data key that sealed the blob
    20      12    nonce, random per blob
    32      n     ciphertext
    32+n    16    GCM tag
    AAD = bytes 0..31 (the header) || blob id (32 bytes)

Binding the blob id into the AAD means a blob cannot be served under
another id; after opening, the caller re-derives the id from the plaintext.
The coordinator never imports this module.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from core.compression import Compressor, decompress, decompress_into
from core.errors import IntegrityError, KeyMaterialError
from core.format import ENVELOPE_KEY_ID, ID_SIZE, KEY_ID_SIZE, MAX_BLOB_SIZE

VERSION = 1
FLAG_COMPRESSED = 0x01
CIPHER_AES256_GCM = 1
HEADER = struct.Struct("<BBBB16s12s")
HEADER_SIZE = HEADER.size  # 32
TAG_SIZE = 16
OVERHEAD = HEADER_SIZE + TAG_SIZE
CIPHERS = {"aes256-gcm": CIPHER_AES256_GCM}
NONCE_SIZE = 12
NONCES_PER_DRAW = 341  # 4092 bytes of the OS's CSPRNG per getrandom call


class _NoncePool(threading.local):
    """Random 96-bit nonces, drawn from the OS's CSPRNG (os.urandom) NONCES_PER_DRAW at a
    time per thread: one system call per 341 blobs instead of one per blob (a 2 GB backup
    seals ~45k), which also spares the GIL a hand-over each time. The bytes are the same
    kind either way; what matters is that none is used twice, so a forked child, which
    inherits its parent's pools, starts them afresh."""

    def __init__(self) -> None:
        self.buf = b""
        self.pos = 0
        self.generation = -1

    def take(self) -> bytes:
        if self.pos >= len(self.buf) or self.generation != _fork_generation:
            self.buf = os.urandom(NONCE_SIZE * NONCES_PER_DRAW)
            self.pos = 0
            self.generation = _fork_generation
        nonce = self.buf[self.pos : self.pos + NONCE_SIZE]
        self.pos += NONCE_SIZE
        return nonce


_fork_generation = 0


def _forked() -> None:
    global _fork_generation
    _fork_generation += 1


os.register_at_fork(after_in_child=_forked)
_nonces = _NoncePool()


class SealingKey:
    """A data key ready to seal and open blobs (AES-256-GCM)."""

    __slots__ = ("_aead", "key_id")

    def __init__(self, key_id: bytes, key: bytes) -> None:
        if len(key_id) != KEY_ID_SIZE or len(key) != 32:
            raise KeyMaterialError("a data key is 32 bytes with a 16-byte key id")
        self.key_id = key_id
        self._aead = AESGCM(key)


def seal(
    key: SealingKey,
    blob_id: bytes,
    blob_type: int,
    plaintext: bytes | memoryview,
    compressor: Compressor | None,
) -> bytes:
    """Compress (when it helps) and encrypt one blob into its envelope."""
    packed = compressor.compress(plaintext) if compressor is not None else None
    flags = FLAG_COMPRESSED if packed is not None else 0
    nonce = _nonces.take()
    header = HEADER.pack(VERSION, flags, blob_type, CIPHER_AES256_GCM, key.key_id, nonce)
    body = packed if packed is not None else plaintext
    return header + key._aead.encrypt(nonce, body, header + blob_id)


class Prepared:
    """A blob compressed and given its header, ready to be encrypted into a buffer of
    `size` bytes (`seal_into`): the slow half of sealing, done outside any lock."""

    __slots__ = ("aad", "body", "header", "nonce", "size")

    def __init__(
        self,
        key: SealingKey,
        blob_id: bytes,
        blob_type: int,
        plaintext: bytes | memoryview,
        compressor: Compressor | None,
    ) -> None:
        packed = compressor.compress(plaintext) if compressor is not None else None
        self.nonce = _nonces.take()
        self.header = HEADER.pack(
            VERSION,
            FLAG_COMPRESSED if packed is not None else 0,
            blob_type,
            CIPHER_AES256_GCM,
            key.key_id,
            self.nonce,
        )
        self.body = packed if packed is not None else plaintext
        self.aad = self.header + blob_id
        self.size = HEADER_SIZE + len(self.body) + TAG_SIZE  # the envelope's


def seal_into(key: SealingKey, blob: Prepared, out: memoryview) -> None:
    """Write the envelope of a prepared blob into `out` (exactly `blob.size` bytes): the
    bytes `seal` returns, encrypted in place instead of assembled from copies."""
    out[:HEADER_SIZE] = blob.header
    key._aead.encrypt_into(blob.nonce, blob.body, blob.aad, out[HEADER_SIZE:])


def key_id_of(envelope: bytes | memoryview) -> bytes:
    """The key id an envelope names, without opening it."""
    if len(envelope) < OVERHEAD:
        raise IntegrityError("blob envelope is truncated")
    return bytes(envelope[ENVELOPE_KEY_ID])


def _check_header(
    blob_id: bytes, blob_type: int, envelope: bytes | memoryview
) -> tuple[int, bytes, bytes]:
    """(flags, key id, nonce) of an envelope that is well-formed for `blob_id` and `blob_type`."""
    if len(envelope) < OVERHEAD:
        raise IntegrityError(
            f"blob {blob_id.hex()[:16]}: envelope truncated ({len(envelope)} bytes)"
        )
    if len(blob_id) != ID_SIZE:
        raise IntegrityError("blob id must be 32 bytes")
    version, flags, btype, cipher, key_id, nonce = HEADER.unpack_from(envelope)
    if version != VERSION or cipher != CIPHER_AES256_GCM or flags & ~FLAG_COMPRESSED:
        raise IntegrityError(f"blob {blob_id.hex()[:16]}: unknown envelope version/cipher/flags")
    if btype != blob_type:
        raise IntegrityError(
            f"blob {blob_id.hex()[:16]}: type {btype} where {blob_type} was expected"
        )
    return flags, key_id, nonce


def _tampered(blob_id: bytes) -> IntegrityError:
    return IntegrityError(
        f"blob {blob_id.hex()[:16]}: authentication failed (damaged, or sealed under another key)"
    )


def open_(
    lookup: Callable[[bytes], SealingKey],
    blob_id: bytes,
    blob_type: int,
    envelope: bytes | memoryview,
    max_size: int = MAX_BLOB_SIZE,
) -> bytes:
    """Authenticate, decrypt and decompress one envelope; `lookup` maps a key id to its key.

    Raises IntegrityError if the envelope was altered, names another blob id or
    type, or is malformed; KeyMaterialError if its key is not available.
    """
    flags, key_id, nonce = _check_header(blob_id, blob_type, envelope)
    key = lookup(key_id)
    view = memoryview(envelope)
    try:
        body = key._aead.decrypt(nonce, view[HEADER_SIZE:], bytes(view[:HEADER_SIZE]) + blob_id)
    except InvalidTag:
        raise _tampered(blob_id) from None
    if flags & FLAG_COMPRESSED:
        return decompress(body, max_size)
    return body


_scratch = threading.local()  # per thread: the decrypted, still compressed body of open_into


def open_into(
    lookup: Callable[[bytes], SealingKey],
    blob_id: bytes,
    blob_type: int,
    envelope: bytes | memoryview,
    out: memoryview,
) -> int:
    """`open_`, but the plaintext goes into `out` and its length is returned: no buffer is
    allocated per blob (a restore reuses its buffers; fresh memory is expensive to fault in).

    Raises what `open_` raises; a plaintext longer than `out` is an IntegrityError.
    """
    flags, key_id, nonce = _check_header(blob_id, blob_type, envelope)
    key = lookup(key_id)
    view = memoryview(envelope)
    n = len(view) - OVERHEAD
    aad = bytes(view[:HEADER_SIZE]) + blob_id
    if flags & FLAG_COMPRESSED:
        buf: bytearray | None = getattr(_scratch, "buf", None)
        if buf is None or len(buf) < n:
            buf = _scratch.buf = bytearray(max(n, 1 << 20))
        body = memoryview(buf)[:n]
    elif n > len(out):
        raise IntegrityError(
            f"blob {blob_id.hex()[:16]}: {n} bytes, more than the {len(out)} allowed"
        )
    else:
        body = out[:n]
    try:
        key._aead.decrypt_into(nonce, view[HEADER_SIZE:], aad, body)
    except InvalidTag:
        raise _tampered(blob_id) from None
    if flags & FLAG_COMPRESSED:
        return decompress_into(body, out)
    return n
