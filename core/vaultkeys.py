"""The Vault transit key provider: per-snapshot data keys from transit, the chunk-id key from KV (design.md §Keys).

`new_data_key` asks transit for a fresh key and its wrapped form; the agent
keeps the plaintext in memory for one snapshot and stores only the wrapped
form. `unwrap` asks transit to decrypt, which only the restore role and
restore grants may do: an agent's token is refused (write-only agents). The
chunk-id key is read from KV once and cached in memory; it is never rotated.
"""

from __future__ import annotations

import base64
import binascii
import os
import threading

from core.chunkid import key_check
from core.errors import KeyMaterialError, NotFound, PermissionDenied
from core.format import KEY_ID_SIZE
from core.keys import DataKey
from core.vault import VaultAuthError, VaultClient, VaultSettings

PROVIDER_NAME = "vault-transit"


class VaultKeyProvider:
    """KeyProvider backed by Vault transit + KV v2; Unavailable (naming Vault) passes through untouched."""

    name = PROVIDER_NAME

    def __init__(
        self,
        client: VaultClient,
        settings: VaultSettings | None = None,
        *,
        _id_key_source: VaultKeyProvider | None = None,
    ) -> None:
        self.client = client
        self.settings = settings or client.settings
        self._lock = threading.Lock()
        self._id_key: bytes | None = None
        self._id_key_source = _id_key_source
        # Only a grant provider caches unwrapped keys: a grant has few uses and a
        # restore may need one key many times; it lives as long as the restore.
        self._unwrapped: dict[bytes, bytes] | None = {} if _id_key_source is not None else None

    def __repr__(self) -> str:
        return f"VaultKeyProvider({self.settings.address!r})"

    def id_key(self) -> bytes:
        """The chunk-id key from KV, read once and then served from memory."""
        if self._id_key_source is not None:
            return self._id_key_source.id_key()
        with self._lock:
            if self._id_key is not None:
                return self._id_key
            s = self.settings
            where = f"{s.kv_mount}/{s.id_key_path}"
            try:
                data = self.client.read_kv(s.kv_mount, s.id_key_path)
            except VaultAuthError:
                raise
            except PermissionDenied as exc:
                raise KeyMaterialError(
                    f"this token's Vault role may not read the chunk-id key at {where}: "
                    "only the agent and restore roles may"
                ) from exc
            except NotFound as exc:
                raise KeyMaterialError(
                    f"the chunk-id key is missing from Vault at {where}: run `clawback vault setup`"
                ) from exc
            try:
                key = base64.b64decode(str(data[s.id_key_field]), validate=True)
            except (KeyError, binascii.Error, ValueError) as exc:
                raise KeyMaterialError(
                    f"the chunk-id key at {where} (field {s.id_key_field!r}) is not base64"
                ) from exc
            if len(key) != 32:
                raise KeyMaterialError(f"the chunk-id key at {where} is {len(key)} bytes, not 32")
            self._id_key = key
            return key

    def new_data_key(self) -> DataKey:
        """A fresh data key from transit `datakey`, with a random key id and its wrapped form."""
        s = self.settings
        try:
            plaintext, ciphertext = self.client.datakey(s.transit_mount, s.transit_key)
        except VaultAuthError:
            raise
        except PermissionDenied as exc:
            raise KeyMaterialError(
                f"this token's Vault role cannot create data keys with {s.transit_mount}/{s.transit_key}: "
                "backing up needs the agent role"
            ) from exc
        return DataKey(os.urandom(KEY_ID_SIZE), plaintext, ciphertext.encode("ascii"), self.name)

    def unwrap(self, key_id: bytes, wrapped: bytes) -> bytes:
        """Transit decrypt of a wrapped data key; KeyMaterialError if this role may not or it is not ours."""
        if self._unwrapped is not None and key_id in self._unwrapped:
            return self._unwrapped[key_id]
        try:
            ciphertext = wrapped.decode("ascii")
        except UnicodeDecodeError:
            ciphertext = ""
        if not ciphertext.startswith("vault:v"):
            raise KeyMaterialError(
                f"data key {key_id.hex()} is not wrapped by Vault transit: wrong key provider for this repository?"
            )
        s = self.settings
        try:
            key = self.client.decrypt_datakey(s.transit_mount, s.transit_key, ciphertext)
        except VaultAuthError:
            raise
        except PermissionDenied as exc:
            raise KeyMaterialError(
                "this token's Vault role cannot unwrap data keys: restoring needs the restore role "
                "or a restore grant"
            ) from exc
        if len(key) != 32:
            raise KeyMaterialError(f"data key {key_id.hex()} unwrapped to {len(key)} bytes, not 32")
        if self._unwrapped is not None:
            self._unwrapped[key_id] = key
        return key

    def for_grant(self, grant_token: str) -> VaultKeyProvider:
        """A provider that unwraps with a restore grant's token (from `VaultClient.unwrap_grant`).

        The id key still comes from this provider (the grant has no KV right).
        """
        return VaultKeyProvider(
            self.client.with_token(grant_token), self.settings, _id_key_source=self
        )

    def key_check(self) -> bytes:
        return key_check(self.id_key())

    def close(self) -> None:
        """Forget cached key material (a grant provider also drops its HTTP sessions)."""
        with self._lock:
            self._id_key = None
            if self._unwrapped is not None:
                self._unwrapped.clear()
        if self._id_key_source is not None:
            self.client.close()
