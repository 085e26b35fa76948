"""deploy/vault/policies against a real OpenBao: for each role, what it may do succeeds and the rest gets 403."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from coordinator.cli.vaultsetup import setup_vault
from core.errors import PermissionDenied
from core.vault import VaultClient
from deploy.vaultdev import DevVault

T, K = "clawback-transit", "clawback-data"


def _csr(cn: str) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
        .decode()
    )


def _subject(cert_pem: str) -> dict[str, str]:
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    return {a.oid._name: str(a.value) for a in cert.subject}


def _denied(call: Callable[[], Any]) -> None:
    with pytest.raises(PermissionDenied, match=r"^Vault refused .*: permission denied$"):
        call()


def _ciphertext(vault: DevVault) -> str:
    return vault.operator_client.request("POST", f"{T}/datakey/wrapped/{K}", {})["data"][
        "ciphertext"
    ]


def test_agent_policy(vault: DevVault) -> None:
    a = vault.client_for("agent-node1")
    pt, ct = a.datakey(T, K)
    assert len(pt) == 32
    _denied(lambda: a.decrypt_datakey(T, K, ct))
    _denied(lambda: a.rewrap(T, K, ct))
    _denied(lambda: a.key_info(T, K))
    _denied(lambda: a.rotate(T, K))
    assert set(a.read_kv("clawback-kv", "id-key")) == {"key"}
    _denied(lambda: a.request("POST", "clawback-kv/data/id-key", {"data": {"key": "x"}}))
    _denied(lambda: a.request("DELETE", "clawback-kv/metadata/id-key"))
    cert, chain = a.sign_csr("clawback-pki", "agent", _csr("node1"), "node1", "1h")
    assert _subject(cert) == {
        "commonName": "node1",
        "organizationalUnitName": "agent",
        "organizationName": "clawback",
    }
    assert "BEGIN CERTIFICATE" in chain
    _denied(lambda: a.sign_csr("clawback-pki", "agent", _csr("node2"), "node2", "1h"))
    _denied(lambda: a.sign_csr("clawback-pki", "coordinator", _csr("node1"), "node1", "1h"))
    _denied(lambda: a.sign_csr("clawback-pki", "admin", _csr("node1"), "node1", "1h"))
    _denied(lambda: a.request("POST", "clawback-pki/issue/agent", {"common_name": "node1"}))
    _denied(lambda: a.request("GET", "sys/mounts"))
    _denied(lambda: a.request("GET", "sys/policies/acl/clawback-agent"))
    _denied(lambda: a.mint_restore_grant())
    # node2's own policy lets node2 sign for node2, not node1.
    b = vault.client_for("agent-node2")
    b.sign_csr("clawback-pki", "agent", _csr("node2"), "node2", "1h")
    _denied(lambda: b.sign_csr("clawback-pki", "agent", _csr("node1"), "node1", "1h"))


def test_coordinator_policy(vault: DevVault) -> None:
    c = vault.client_for("coordinator")
    cert, _ = c.sign_csr("clawback-pki", "coordinator", _csr("coordinator"), "coordinator", "1h")
    assert _subject(cert)["organizationalUnitName"] == "coordinator"
    ct = _ciphertext(vault)
    _denied(lambda: c.decrypt_datakey(T, K, ct))
    _denied(lambda: c.datakey(T, K))
    _denied(lambda: c.rewrap(T, K, ct))
    _denied(lambda: c.read_kv("clawback-kv", "id-key"))
    _denied(lambda: c.request("GET", "clawback-kv/metadata/id-key"))
    _denied(lambda: c.sign_csr("clawback-pki", "agent", _csr("node1"), "node1", "1h"))
    _denied(lambda: c.sign_csr("clawback-pki", "admin", _csr("ops"), "ops", "1h"))
    _denied(lambda: c.request("GET", "sys/mounts"))


def test_restore_policy(vault: DevVault) -> None:
    r = vault.client_for("restore")
    assert len(r.decrypt_datakey(T, K, _ciphertext(vault))) == 32
    assert set(r.read_kv("clawback-kv", "id-key")) == {"key"}
    _denied(lambda: r.datakey(T, K))
    _denied(lambda: r.request("POST", "clawback-kv/data/id-key", {"data": {"key": "x"}}))
    _denied(lambda: r.rotate(T, K))
    _denied(lambda: r.set_min_decryption_version(T, K, 1))
    _denied(lambda: r.sign_csr("clawback-pki", "agent", _csr("node1"), "node1", "1h"))
    _denied(lambda: r.mint_restore_grant())


def test_operator_policy(vault: DevVault) -> None:
    token = vault.operator.auth.token.create(policies=["clawback-operator"], ttl="10m")["auth"][
        "client_token"
    ]
    op = vault.track(VaultClient.for_token(vault.settings, token))
    ct = _ciphertext(vault)
    op.rotate(T, K)
    assert op.key_info(T, K)["latest_version"] == 2
    assert op.rewrap(T, K, ct).startswith("vault:v2:")
    op.set_min_decryption_version(T, K, 1)
    wrapping = op.mint_restore_grant(ttl="5m", uses=1)
    assert wrapping
    cert, _ = op.sign_csr("clawback-pki", "admin", _csr("ops"), "ops", "1h")
    assert _subject(cert)["organizationalUnitName"] == "admin"
    _denied(lambda: op.decrypt_datakey(T, K, ct))
    _denied(lambda: op.datakey(T, K))
    _denied(lambda: op.read_kv("clawback-kv", "id-key"))
    # Written once: the operator may create the id key but never overwrite it.
    _denied(lambda: op.request("POST", "clawback-kv/data/id-key", {"data": {"key": "x"}}))
    _denied(lambda: op.request("POST", f"{T}/keys/{K}/config", {"deletion_allowed": True}))
    _denied(lambda: op.request("POST", f"{T}/keys/{K}/config", {"exportable": True}))
    _denied(lambda: op.request("DELETE", f"{T}/keys/{K}"))
    _denied(lambda: op.request("GET", f"{T}/export/encryption-key/{K}"))
    _denied(lambda: op.request("POST", "sys/policies/acl/default", {"policy": ""}))
    _denied(lambda: op.sign_csr("clawback-pki", "agent", _csr("node1"), "node1", "1h"))
    # The operator's token is enough to re-run setup (and add an agent).
    result = setup_vault(op, vault.settings, ["node1", "node2", "node3"])
    statuses = {(i.kind, i.name): i.status for i in result.items}
    assert statuses[("approle", "clawback-agent-node3")] == "created"
    assert statuses[("policy", "clawback-agent-pki-node3")] == "created"
    assert statuses[("kv-secret", "clawback-kv/id-key")] == "present"


def test_restore_grant_policy(vault: DevVault) -> None:
    agent = vault.client_for("agent-node1")
    grant = agent.with_token(agent.unwrap_grant(vault.operator_client.mint_restore_grant(uses=2)))
    vault.track(grant)
    ct = _ciphertext(vault)
    assert len(grant.decrypt_datakey(T, K, ct)) == 32
    _denied(lambda: grant.datakey(T, K))  # the second and last use
    _denied(lambda: grant.decrypt_datakey(T, K, ct))  # num_uses spent: the token is gone
    g2 = agent.with_token(agent.unwrap_grant(vault.operator_client.mint_restore_grant(uses=5)))
    vault.track(g2)
    assert g2.read_kv("clawback-kv", "id-key")  # to re-derive blob ids (the operator's ls)
    _denied(lambda: g2.request("POST", "clawback-kv/data/id-key", {"data": {"key": "x"}}))
    _denied(lambda: g2.rewrap(T, K, ct))
    _denied(lambda: g2.request("GET", "auth/token/lookup-self"))  # no default policy either
    assert len(g2.decrypt_datakey(T, K, ct)) == 32
