"""Key providers: where the id key and the data keys come from (design.md §Keys).

A provider hands out the chunk-id key, fresh data keys to seal a snapshot's
new blobs (with their wrapped form, the only form the coordinator stores),
and unwraps a wrapped key for a restore. The file provider is for
development: one key file, one long-lived data key. Vault transit replaces it
as the default (next issue); the interface stays this narrow so that swap is clean.
"""

from __future__ import annotations

import base64
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import blake3

from core.chunkid import key_check
from core.errors import KeyMaterialError
from core.format import KEY_ID_SIZE


@dataclass(frozen=True)
class DataKey:
    key_id: bytes
    key: bytes = b""  # plaintext key; never leaves the agent's memory
    wrapped: bytes = b""  # what the coordinator stores
    provider: str = ""

    def __repr__(self) -> str:  # never print key material
        return f"DataKey(key_id={self.key_id.hex()}, provider={self.provider!r})"


class KeyProvider(Protocol):
    name: str

    def id_key(self) -> bytes:
        """The repository-wide chunk-id MAC key (32 bytes)."""

    def new_data_key(self) -> DataKey:
        """A data key to seal one snapshot's new blobs, with its wrapped form."""

    def unwrap(self, key_id: bytes, wrapped: bytes) -> bytes:
        """The plaintext data key for `key_id`; KeyMaterialError if not permitted or not known."""


KEY_FILE_VERSION = 1


class FileKeyProvider:
    """Development provider: key material in one file (mode 0600) that the agents read."""

    name = "file"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            st = self.path.stat()
            raw = json.loads(self.path.read_bytes())
            if raw.get("version") != KEY_FILE_VERSION:
                raise ValueError(f"unsupported key file version {raw.get('version')!r}")
            self._id_key = base64.b64decode(raw["id_key"], validate=True)
            self._data_key = base64.b64decode(raw["data_key"], validate=True)
            self.repo_id = str(raw.get("repo_id", ""))
        except FileNotFoundError:
            raise KeyMaterialError(f"key file {self.path} does not exist") from None
        except PermissionError:
            raise KeyMaterialError(f"key file {self.path} is not readable by this user") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise KeyMaterialError(f"key file {self.path} is malformed: {exc}") from None
        if len(self._id_key) != 32 or len(self._data_key) != 32:
            raise KeyMaterialError(f"key file {self.path} is malformed: keys must be 32 bytes")
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyMaterialError(
                f"key file {self.path} is readable by group or others (mode {stat.S_IMODE(st.st_mode):o}); chmod 600 it"
            )
        self._key_id = file_key_id(self._data_key)

    def id_key(self) -> bytes:
        return self._id_key

    def new_data_key(self) -> DataKey:
        return DataKey(self._key_id, self._data_key, b"", self.name)

    def unwrap(self, key_id: bytes, wrapped: bytes) -> bytes:
        if key_id != self._key_id:
            raise KeyMaterialError(
                f"data key {key_id.hex()} is not the key in {self.path}: wrong key file for this repository?"
            )
        return self._data_key

    def key_check(self) -> bytes:
        return key_check(self._id_key)


def file_key_id(data_key: bytes) -> bytes:
    return blake3.blake3(b"clawback/v1 file key id" + data_key).digest(KEY_ID_SIZE)


def create_key_file(path: str | os.PathLike[str], repo_id: str = "") -> bytes:
    """Write fresh key material to `path` (0600, refusing to overwrite); returns its key check."""
    id_key, data_key = os.urandom(32), os.urandom(32)
    body = json.dumps(
        {
            "version": KEY_FILE_VERSION,
            "kind": "clawback development key file: anyone holding it can read every backup",
            "repo_id": repo_id,
            "id_key": base64.b64encode(id_key).decode(),
            "data_key": base64.b64encode(data_key).decode(),
        },
        indent=1,
    ).encode()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyMaterialError(
            f"key file {p} already exists; refusing to overwrite key material"
        ) from None
    with os.fdopen(fd, "wb") as f:
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    return key_check(id_key)
