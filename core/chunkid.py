"""Blob ids: a keyed BLAKE3 MAC of the plaintext (design.md §Blob ids).

Equal plaintext gets the same id on every agent holding the repository's id
key, so data deduplicates across the fleet; without the key nobody can tell
which content an id stands for. The coordinator never imports this module.
"""

from __future__ import annotations

import blake3

from core.format import ID_SIZE

KEY_CHECK_CONTEXT = b"clawback/v1 key check"


class IdHasher:
    def __init__(self, id_key: bytes) -> None:
        if len(id_key) != 32:
            raise ValueError("the id key must be 32 bytes")
        self._key = id_key

    def blob_id(self, data: bytes | bytearray | memoryview) -> bytes:
        return blake3.blake3(data, key=self._key).digest(ID_SIZE)

    def key_check(self) -> bytes:
        """A value that shows whether two parties hold the same id key, and nothing else."""
        return key_check(self._key)


def key_check(id_key: bytes) -> bytes:
    return blake3.blake3(KEY_CHECK_CONTEXT, key=id_key).digest(16)
