"""core.vaultkeys against a real OpenBao: data keys, write-only agents, restore grants, rotation and rewrap."""

from __future__ import annotations

import logging

import pytest

from coordinator.cli.vaultsetup import rewrap_all, rotate_and_rewrap, wrapped_version
from core.chunkid import key_check
from core.errors import KeyMaterialError, PermissionDenied
from core.keys import DataKey
from core.vault import GRANT_REFUSED
from core.vaultkeys import VaultKeyProvider
from deploy.vaultdev import DevVault
from protos.clawback.v1 import common_pb2

NOT_PERMITTED = "this token's Vault role cannot unwrap data keys: restoring needs the restore role or a restore grant"


def _wk(dk: DataKey) -> common_pb2.WrappedKey:
    return common_pb2.WrappedKey(key_id=dk.key_id, wrapped=dk.wrapped, provider=dk.provider)


def test_data_key_round_trip_with_the_restore_role(vault: DevVault) -> None:
    agent = VaultKeyProvider(vault.client_for("agent-node1"), vault.settings)
    restore = VaultKeyProvider(vault.client_for("restore"))
    dk = agent.new_data_key()
    assert dk.provider == agent.name == "vault-transit"
    assert len(dk.key_id) == 16 and len(dk.key) == 32
    assert dk.wrapped.startswith(b"vault:v1:") and dk.key not in dk.wrapped
    assert "key=" not in repr(dk) and dk.key.hex() not in repr(dk)
    assert agent.new_data_key().key != dk.key  # per snapshot, fresh
    assert restore.unwrap(dk.key_id, dk.wrapped) == dk.key
    assert agent.id_key() == restore.id_key() and len(agent.id_key()) == 32
    assert agent.key_check() == key_check(agent.id_key())


def test_agent_role_cannot_unwrap(vault: DevVault) -> None:
    agent = VaultKeyProvider(vault.client_for("agent-node1"))
    dk = agent.new_data_key()
    with pytest.raises(KeyMaterialError) as e:
        agent.unwrap(dk.key_id, dk.wrapped)
    assert str(e.value) == NOT_PERMITTED
    with pytest.raises(KeyMaterialError, match="not wrapped by Vault transit"):
        agent.unwrap(dk.key_id, b"")  # a file-provider key


def test_coordinator_role_has_no_decrypt_and_no_id_key(vault: DevVault) -> None:
    agent = VaultKeyProvider(vault.client_for("agent-node1"))
    coordinator = VaultKeyProvider(vault.client_for("coordinator"))
    dk = agent.new_data_key()
    with pytest.raises(KeyMaterialError, match="cannot unwrap data keys"):
        coordinator.unwrap(dk.key_id, dk.wrapped)
    with pytest.raises(
        KeyMaterialError, match="may not read the chunk-id key at clawback-kv/id-key"
    ):
        coordinator.id_key()
    with pytest.raises(KeyMaterialError, match="cannot create data keys"):
        coordinator.new_data_key()


def test_id_key_is_read_once_and_cached(vault: DevVault, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="clawback.vault.audit")
    agent = VaultKeyProvider(vault.client_for("agent-node1"))
    first = agent.id_key()
    assert agent.id_key() == first and agent.key_check() == key_check(first)
    assert caplog.text.count("GET clawback-kv/data/id-key") == 1


def test_restore_grant_unwrapped_once_then_decrypts(vault: DevVault) -> None:
    agent_client = vault.client_for("agent-node1")
    agent = VaultKeyProvider(agent_client)
    keys = [agent.new_data_key() for _ in range(3)]
    wrapping = vault.operator_client.mint_restore_grant(ttl="5m", uses=3)
    grant = agent_client.unwrap_grant(wrapping)
    info = vault.operator.lookup_token(grant)["data"]
    assert info["policies"] == ["clawback-restore-grant"] and info["orphan"]
    assert info["num_uses"] == 3 and not info["renewable"]
    granted = agent.for_grant(grant)
    for dk in keys:
        assert granted.unwrap(dk.key_id, dk.wrapped) == dk.key
        assert granted.unwrap(dk.key_id, dk.wrapped) == dk.key  # cached: no use spent
    assert granted.id_key() == agent.id_key()  # from the agent's own role
    # The grant is spent (num_uses=3): Vault revoked it.
    extra = agent.new_data_key()
    with pytest.raises(KeyMaterialError, match="cannot unwrap"):
        granted.unwrap(extra.key_id, extra.wrapped)
    # The same wrapping token a second time: refused.
    with pytest.raises(PermissionDenied) as e:
        agent_client.unwrap_grant(wrapping)
    assert str(e.value) == GRANT_REFUSED
    granted.close()


def test_grant_unwrapped_by_someone_else_is_refused(vault: DevVault) -> None:
    agent_client = vault.client_for("agent-node2")
    wrapping = vault.operator_client.mint_restore_grant(ttl="5m", uses=2)
    vault.operator.sys.unwrap(wrapping)  # an eavesdropper got there first
    with pytest.raises(PermissionDenied) as e:
        agent_client.unwrap_grant(wrapping)
    assert str(e.value) == GRANT_REFUSED
    # A wrapping token from elsewhere (a wrapped secret_id) is not a grant.
    other = vault.operator.auth.approle.generate_secret_id("clawback-restore", wrap_ttl="1m")
    with pytest.raises(
        PermissionDenied, match="was not made by auth/token/create/clawback-restore-grant"
    ):
        agent_client.unwrap_grant(other["wrap_info"]["token"])
    with pytest.raises(PermissionDenied, match="already used or has expired"):
        agent_client.unwrap_grant("s.not-a-wrapping-token")


def test_rotation_and_rewrap_keep_old_keys_decryptable(vault: DevVault) -> None:
    s = vault.settings
    agent = VaultKeyProvider(vault.client_for("agent-node1"))
    restore = VaultKeyProvider(vault.client_for("restore"))
    op = vault.operator_client
    old = [agent.new_data_key() for _ in range(3)]
    store = {bytes(wk.key_id): wk for wk in map(_wk, old)}
    store[b"f" * 16] = common_pb2.WrappedKey(key_id=b"f" * 16, wrapped=b"", provider="file")

    op.rotate(s.transit_mount, s.transit_key)
    assert op.key_info(s.transit_mount, s.transit_key)["latest_version"] == 2
    new = agent.new_data_key()
    assert wrapped_version(new.wrapped) == 2
    for dk in [*old, new]:  # both versions still decrypt
        assert restore.unwrap(dk.key_id, dk.wrapped) == dk.key

    rewrapped = rewrap_all(op, s, store.values())
    assert len(rewrapped) == 3  # the file-provider key is skipped
    for wk, dk in zip(rewrapped, old, strict=True):
        assert bytes(wk.key_id) == dk.key_id and wrapped_version(bytes(wk.wrapped)) == 2
        assert restore.unwrap(dk.key_id, bytes(wk.wrapped)) == dk.key

    # The full flow behind `clawback keys rotate --raise-min-version`.
    def put_keys(keys: list[common_pb2.WrappedKey]) -> None:
        for wk in keys:
            store[bytes(wk.key_id)] = wk

    store[new.key_id] = _wk(new)
    report = rotate_and_rewrap(op, s, lambda: list(store.values()), put_keys, raise_min=True)
    assert (report.old_version, report.new_version, report.rewrapped) == (2, 3, 4)
    assert report.min_decryption_version == 3
    info = op.key_info(s.transit_mount, s.transit_key)
    assert info["min_decryption_version"] == 3
    for dk in [*old, new]:
        assert restore.unwrap(dk.key_id, bytes(store[dk.key_id].wrapped)) == dk.key
    # The original v1 ciphertexts are now refused: rotation retired them.
    with pytest.raises(KeyMaterialError, match="Vault rejected clawback-transit/decrypt"):
        VaultKeyProvider(vault.client_for("restore")).unwrap(old[0].key_id, old[0].wrapped)


def test_min_version_is_not_raised_while_a_key_is_unwrapped(vault: DevVault) -> None:
    s = vault.settings
    agent = VaultKeyProvider(vault.client_for("agent-node1"))
    dk = agent.new_data_key()
    stored = [_wk(dk)]
    with pytest.raises(KeyMaterialError, match="not raising min_decryption_version"):
        # put_keys that loses the writes: the stored key stays at v1
        rotate_and_rewrap(
            vault.operator_client, s, lambda: stored, lambda keys: None, raise_min=True
        )
    assert (
        vault.operator_client.key_info(s.transit_mount, s.transit_key)["min_decryption_version"]
        == 1
    )
