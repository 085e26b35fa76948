"""core.vault against a real OpenBao: settings, AppRole and token-file login, renewal, revocation, outage, audit."""

from __future__ import annotations

import base64
import json
import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.config import Table
from core.errors import ConfigError, KeyMaterialError, NotFound, PermissionDenied, Unavailable
from core.vault import VaultClient, VaultSettings, load_vault_settings
from core.vaultkeys import VaultKeyProvider
from deploy.vaultdev import DevVault, _free_port

REPO = Path(__file__).resolve().parents[2]
AUDIT_LINE = re.compile(r"^vault (GET|POST|PUT|LIST|DELETE) \S+ -> (ok|denied|error) \(\d+ ms\)$")


def _table(data: dict[str, object]) -> Table:
    return Table(data, "/etc/clawback/agent.toml", "vault.")


# ---- settings -------------------------------------------------------------------


def test_settings_from_toml(tmp_path: Path) -> None:
    s = load_vault_settings(
        Table(
            {
                "address": "https://vault.example:8200/",
                "role_id_file": "creds/role_id",
                "secret_id_file": "/run/clawback/secret_id",
                "transit_key": "other-key",
                "timeout": 3,
            },
            str(tmp_path / "agent.toml"),
            "vault.",
        )
    )
    assert s.address == "https://vault.example:8200"
    assert s.auth == "approle" and s.secret_id_wrapped
    assert s.role_id_file == tmp_path / "creds" / "role_id"
    assert s.secret_id_file == Path("/run/clawback/secret_id")
    assert (s.transit_mount, s.transit_key, s.kv_mount, s.pki_mount) == (
        "clawback-transit",
        "other-key",
        "clawback-kv",
        "clawback-pki",
    )
    assert s.timeout == 3.0
    t = load_vault_settings(
        _table({"address": "http://127.0.0.1:8200", "auth": "token_file", "token_file": "/t"})
    )
    assert t.auth == "token_file" and t.token_file == Path("/t")


@pytest.mark.parametrize(
    ("data", "key", "reason"),
    [
        ({"address": "http://a", "role_id_file": "r"}, "vault.secret_id_file", "is required"),
        ({"address": "http://a", "auth": "token_file"}, "vault.token_file", "is required"),
        (
            {"address": "vault:8200", "auth": "token_file", "token_file": "t"},
            "vault.address",
            "https://",
        ),
        ({"address": "http://a", "auth": "ldap"}, "vault.auth", "must be one of"),
        ({"address": "http://a", "token": "s.abc"}, "vault.token", "secrets do not belong"),
        ({"address": "http://a", "secret_id": "x"}, "vault.secret_id", "secrets do not belong"),
        (
            {"address": "http://a", "auth": "token_file", "token_file": "t", "transit_mont": "x"},
            "vault.transit_mont",
            "unknown key",
        ),
        (
            {"address": "http://a", "auth": "token_file", "token_file": "t", "kv_mount": "/x"},
            "vault.kv_mount",
            "Vault path name",
        ),
    ],
)
def test_settings_errors_name_file_key_reason(
    data: dict[str, object], key: str, reason: str
) -> None:
    with pytest.raises(ConfigError) as e:
        load_vault_settings(_table(data))
    assert e.value.key == key and reason in e.value.reason
    assert "agent.toml" in str(e.value)
    assert "s.abc" not in str(e.value)


# ---- AppRole ----------------------------------------------------------------------


def test_approle_wrapped_secret_id_is_unwrapped_once(vault: DevVault) -> None:
    settings = vault.settings_for("agent-node1")
    wrapped_before = settings.secret_id_file.read_bytes()  # type: ignore[union-attr]
    client = vault.track(VaultClient(settings, renew=False))
    client.login()
    assert "clawback-agent" in client.lookup_self()["policies"]
    # A re-login (e.g. after revocation) uses the secret_id kept in memory: the file is not touched again.
    client.revoke_self()
    client.login()
    assert settings.secret_id_file.read_bytes() == wrapped_before  # type: ignore[union-attr]
    # A second process given the same file is refused: the wrapping token was already used.
    code = (
        "import sys, pathlib\n"
        "from core.vault import VaultClient, VaultSettings\n"
        "from core.errors import ClawbackError\n"
        f"s = VaultSettings(address={settings.address!r}, role_id_file=pathlib.Path({str(settings.role_id_file)!r}),"
        f" secret_id_file=pathlib.Path({str(settings.secret_id_file)!r}))\n"
        "try:\n    VaultClient(s, renew=False).login()\n"
        "except ClawbackError as e:\n    print(type(e).__name__, e); sys.exit(int(e.exit_code))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 7, r.stderr
    assert r.stdout.startswith("VaultAuthError")  # a PermissionDenied (exit 7)
    assert "already unwrapped or has expired" in r.stdout and "possible interception" in r.stdout
    assert str(settings.secret_id_file) in r.stdout


def test_approle_plain_secret_id_and_bad_credentials(vault: DevVault) -> None:
    s = vault.settings_for("restore", secret_id_wrapped=False)
    c = vault.track(VaultClient(s, renew=False))
    c.login()
    c.login()  # a plain secret_id file is read at every login
    assert "clawback-restore" in c.lookup_self()["policies"]
    s.secret_id_file.write_text("not-a-secret-id\n")  # type: ignore[union-attr]
    with pytest.raises(PermissionDenied, match="Vault refused the AppRole login"):
        VaultClient(s, renew=False).login()


def test_token_file_is_reread_when_it_changes(vault: DevVault, tmp_path: Path) -> None:
    def new_token() -> str:
        resp = vault.operator.auth.token.create(policies=["clawback-agent"], ttl="1h")
        return str(resp["auth"]["client_token"])

    token_file = tmp_path / "token"
    first = new_token()
    token_file.write_text(first + "\n")
    s = VaultSettings(address=vault.server.address, auth="token_file", token_file=token_file)
    c = vault.track(VaultClient(s, renew=False))
    c.login()
    kp = VaultKeyProvider(c)
    kp.new_data_key()
    # Vault Agent writes a new token and the old one is revoked: the client follows the file.
    second = new_token()
    token_file.write_text(second + "\n")
    vault.operator.auth.token.revoke(first)
    kp.new_data_key()
    assert c.lookup_self()["id"] == second
    # A dead token with no replacement: a clear error naming the file.
    vault.operator.auth.token.revoke(second)
    with pytest.raises(PermissionDenied, match=r"is not valid.*Vault Agent"):
        kp.new_data_key()


# ---- renewal and revocation ---------------------------------------------------------


def test_renewal_keeps_a_short_ttl_token_alive(
    vault: DevVault, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="clawback.vault.audit")
    vault.operator.write(
        "auth/approle/role/clawback-agent-node1", token_ttl="2s", token_max_ttl="1m"
    )
    c = vault.client_for("agent-node1", renew=True)
    token = c.lookup_self()["id"]
    assert c.token_ttl() <= 2
    time.sleep(3.5)  # well past the 2 s TTL: only renewal keeps it valid
    vault.operator.lookup_token(token)  # raises if it had expired
    VaultKeyProvider(c).new_data_key()
    assert c.lookup_self()["id"] == token  # renewed, not replaced
    assert "vault POST auth/token/renew-self -> ok" in caplog.text
    assert caplog.text.count("auth/approle/login") == 1


def test_revoked_token_logs_in_again(vault: DevVault) -> None:
    c = vault.client_for("agent-node1")
    kp = VaultKeyProvider(c)
    kp.new_data_key()
    old = c.lookup_self()["accessor"]
    vault.operator.auth.token.revoke_accessor(old)
    kp.new_data_key()  # denied, token found dead, re-login with the in-memory secret_id, retried
    assert c.lookup_self()["accessor"] != old


def test_renewal_thread_logs_in_again_after_revocation(vault: DevVault) -> None:
    vault.operator.write(
        "auth/approle/role/clawback-agent-node2", token_ttl="3s", token_max_ttl="1m"
    )
    c = vault.client_for("agent-node2", renew=True)
    old = c.lookup_self()["accessor"]
    vault.operator.auth.token.revoke_accessor(old)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with c._lock:
            token = c._token
        try:
            if vault.operator.lookup_token(token)["data"]["accessor"] != old:
                break
        except Exception:
            pass
        time.sleep(0.2)
    else:
        pytest.fail("the renewal thread did not log in again after revocation")
    c.close()


# ---- outage ---------------------------------------------------------------------


def test_unreachable_vault_is_unavailable_naming_vault() -> None:
    addr = f"http://127.0.0.1:{_free_port()}"
    c = VaultClient.for_token(VaultSettings(address=addr, timeout=2), "t")
    with pytest.raises(Unavailable, match=rf"^Vault at {re.escape(addr)} is unreachable"):
        c.key_info("clawback-transit", "clawback-data")


def test_outage_fails_fast_and_recovers_by_itself(tmp_path: Path) -> None:
    with DevVault(tmp_path, ("node1",), persistent=True) as dv:
        c = dv.client_for("agent-node1", renew=True, backoff_initial=0.1, backoff_max=0.5)
        kp = VaultKeyProvider(c)
        held = kp.new_data_key()  # a running backup holds this key
        id_key = kp.id_key()
        dv.server.stop()
        t0 = time.monotonic()
        with pytest.raises(Unavailable) as e:
            kp.new_data_key()
        assert time.monotonic() - t0 < 2
        assert f"Vault at {dv.server.address} is unreachable" in str(e.value)
        assert len(held.key) == 32 and kp.id_key() == id_key  # what it holds keeps working
        dv.server.start()
        fresh = kp.new_data_key()  # no restart, no re-configuration
        assert fresh.key != held.key
        r = VaultKeyProvider(dv.client_for("restore"))
        assert r.unwrap(held.key_id, held.wrapped) == held.key


# ---- errors and audit -----------------------------------------------------------------


def test_error_translation(vault: DevVault) -> None:
    op = vault.operator_client
    with pytest.raises(NotFound, match="Vault has nothing at clawback-transit/keys/nope"):
        op.key_info("clawback-transit", "nope")
    r = vault.client_for("restore")
    with pytest.raises(KeyMaterialError, match="Vault rejected clawback-transit/decrypt"):
        r.decrypt_datakey(
            "clawback-transit", "clawback-data", "vault:v1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
        )
    a = vault.client_for("agent-node1")
    with pytest.raises(
        PermissionDenied,
        match=r"^Vault refused clawback-transit/decrypt/clawback-data: permission denied$",
    ):
        a.decrypt_datakey("clawback-transit", "clawback-data", "vault:v1:AAAA")


def test_audit_logs_every_call_and_never_a_secret(
    vault: DevVault, caplog: pytest.LogCaptureFixture
) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    caplog.set_level(logging.DEBUG)  # everything, urllib3 included
    agent_settings = vault.settings_for("agent-node1")
    restore_settings = vault.settings_for("restore")
    secrets: list[str] = [
        vault.server.root_token,
        agent_settings.secret_id_file.read_text().strip(),  # type: ignore[union-attr]
        restore_settings.secret_id_file.read_text().strip(),  # type: ignore[union-attr]
        agent_settings.role_id_file.read_text().strip(),  # type: ignore[union-attr]
    ]
    agent = vault.track(VaultClient(agent_settings, renew=True))
    agent.login()
    restore = vault.track(VaultClient(restore_settings, renew=False))
    kp, rp = VaultKeyProvider(agent), VaultKeyProvider(restore)
    dk = kp.new_data_key()
    assert rp.unwrap(dk.key_id, dk.wrapped) == dk.key
    idk = kp.id_key()
    with pytest.raises(KeyMaterialError):
        kp.unwrap(dk.key_id, dk.wrapped)
    wrapping = vault.operator_client.mint_restore_grant(ttl="5m", uses=2)
    grant = agent.unwrap_grant(wrapping)
    assert kp.for_grant(grant).unwrap(dk.key_id, dk.wrapped) == dk.key
    with pytest.raises(PermissionDenied):
        agent.unwrap_grant(wrapping)
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "node1")]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
        .decode()
    )
    agent.sign_csr("clawback-pki", "agent", csr, "node1", "1h")
    secrets += [
        agent._token,
        restore._token,
        agent._secret_id or "",
        restore._secret_id or "",
        wrapping,
        grant,
        base64.b64encode(dk.key).decode(),
        dk.key.hex(),
        base64.b64encode(idk).decode(),
        idk.hex(),
    ]
    agent.revoke_self()
    agent.close()
    records = caplog.records
    text = caplog.text + "\n".join(json.dumps(r.args, default=str) for r in records)
    for secret in secrets:
        assert len(secret) >= 16
        assert secret not in text, "a secret reached the logs"
    audit = [r.getMessage() for r in records if r.name == "clawback.vault.audit"]
    assert audit and all(AUDIT_LINE.match(line) for line in audit), audit
    for expected in (
        "vault POST sys/wrapping/unwrap -> ok",
        "vault POST auth/approle/login -> ok",
        "vault POST clawback-transit/datakey/plaintext/clawback-data -> ok",
        "vault POST clawback-transit/decrypt/clawback-data -> ok",
        "vault POST clawback-transit/decrypt/clawback-data -> denied",
        "vault GET clawback-kv/data/id-key -> ok",
        "vault POST auth/token/create/clawback-restore-grant -> ok",
        "vault POST sys/wrapping/lookup -> error",
        "vault POST clawback-pki/sign/agent -> ok",
        "vault POST auth/token/revoke-self -> ok",
    ):
        assert any(line.startswith(expected) for line in audit), expected
