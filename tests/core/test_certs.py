"""core.certs against a real OpenBao: certificates from Vault PKI, per-agent names, renewal, outage."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import pytest
from cryptography import x509

from core.certs import (
    FileCertSource,
    VaultCertSource,
    duration_seconds,
    load_cert_settings,
)
from core.config import Table
from core.errors import ConfigError, PermissionDenied, Unavailable
from core.tls import TlsFiles, identity_from_pem
from deploy.vaultdev import DevVault


def _fast(dv: DevVault, role: str):  # type: ignore[no-untyped-def]
    """A logged-in client of `role` whose retries are quick (short outages in tests)."""
    s = dataclasses.replace(dv.settings_for(role), backoff_initial=0.2, backoff_max=1.0)
    from core.vault import VaultClient

    c = dv.track(VaultClient(s))
    c.login()
    return c, s


def test_vault_issues_a_certificate_naming_the_agent(vault: DevVault) -> None:
    client, s = _fast(vault, "agent-node1")
    src = VaultCertSource(client, s, "agent", "node1", "1h").start()
    try:
        ca, cert, key = src.current()
        assert src.generation == 1
        ident = identity_from_pem(cert)
        assert (ident.name, ident.role) == ("node1", "agent")
        assert b"PRIVATE KEY" in key
        c = x509.load_pem_x509_certificate(cert)
        lifetime = (c.not_valid_after_utc - c.not_valid_before_utc).total_seconds()
        assert lifetime <= 3600 + 60  # Vault backdates not_before by 30 s
        # The chain is the PKI's CA: it verifies the certificate.
        root = x509.load_pem_x509_certificates(ca)[-1]
        c.verify_directly_issued_by(root)
        assert "clawback Vault CA" in root.subject.rfc4514_string()
    finally:
        src.close()


def test_coordinator_certificate_carries_its_host_names(vault: DevVault) -> None:
    client, s = _fast(vault, "coordinator")
    src = VaultCertSource(
        client, s, "coordinator", "coordinator", "1h", hosts=["localhost", "127.0.0.1"]
    ).start()
    try:
        cert = x509.load_pem_x509_certificate(src.current()[1])
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert "localhost" in san.get_values_for_type(x509.DNSName)
        assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
        assert identity_from_pem(src.current()[1]).role == "coordinator"
    finally:
        src.close()


def test_an_agent_cannot_get_a_certificate_for_another_name(vault: DevVault) -> None:
    client, s = _fast(vault, "agent-node1")
    with pytest.raises(PermissionDenied, match="node2"):
        VaultCertSource(client, s, "agent", "node2", "1h").start()
    with pytest.raises(PermissionDenied):  # nor an admin or coordinator certificate
        VaultCertSource(client, s, "admin", "node1", "1h").start()
    coord, cs = _fast(vault, "coordinator")
    with pytest.raises(PermissionDenied):
        VaultCertSource(coord, cs, "agent", "node1", "1h").start()


def test_renewal_bumps_the_generation_before_expiry(
    vault: DevVault, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "clawback.certs")
    client, s = _fast(vault, "agent-node1")
    src = VaultCertSource(client, s, "agent", "node1", "3s").start()
    try:
        first = src.current()[1]
        first_end = x509.load_pem_x509_certificate(first).not_valid_after_utc
        start = time.monotonic()
        assert src.wait_generation(2, timeout=10)
        assert time.monotonic() - start < 3.0  # at ~2/3 of the lifetime, not after it
        second = src.current()[1]
        assert second != first
        assert x509.load_pem_x509_certificate(second).not_valid_after_utc > first_end
        assert src.wait_generation(3, timeout=10)
    finally:
        src.close()
    assert "certificate for node1 renewed, valid until" in caplog.text
    gen = src.generation
    time.sleep(2.5)
    assert src.generation == gen  # closed: no more renewals


def test_vault_down_keeps_the_certificate_and_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "clawback.certs")
    with DevVault(tmp_path, ("node1",), persistent=True) as dv:
        client, s = _fast(dv, "agent-node1")
        src = VaultCertSource(client, s, "agent", "node1", "4s").start()
        try:
            material = src.current()
            dv.server.stop()
            time.sleep(4.5)  # renewal due at ~2.7 s fails; the certificate outlives its TTL
            assert src.generation == 1 and src.current() == material
            assert "certificate renewal for node1 failed" in caplog.text
            assert "unreachable" in caplog.text
            dv.server.start()
            assert src.wait_generation(2, timeout=15), caplog.text
            assert src.current() != material
        finally:
            src.close()


def test_no_certificate_yet_is_unavailable(tmp_path: Path) -> None:
    from core.vault import VaultClient, VaultSettings

    s = VaultSettings(address="http://127.0.0.1:9", auth="token_file", timeout=0.5)
    src = VaultCertSource(VaultClient.for_token(s, "t"), s, "admin", "ops", "1h")
    with pytest.raises(Unavailable, match="no certificate for ops yet"):
        src.current()
    src.start()  # Vault unreachable: not fatal, the thread keeps trying
    try:
        with pytest.raises(Unavailable):
            src.current()
    finally:
        src.close()


# ---- settings ---------------------------------------------------------------------


def _tls(data: dict[str, object], **kw: object) -> object:
    return load_cert_settings(Table(data, "/etc/clawback/x.toml", "tls."), **kw)  # type: ignore[arg-type]


def test_cert_settings() -> None:
    files = _tls({"ca": "/p/ca.pem", "cert": "/p/c.pem", "key": "/p/c.key"})
    assert files.source == "files" and files.files == TlsFiles(  # type: ignore[attr-defined]
        Path("/p/ca.pem"), Path("/p/c.pem"), Path("/p/c.key")
    )
    v = _tls(
        {"source": "vault", "ttl": "8s"}, default_name="coordinator", default_hosts=["localhost"]
    )
    assert (v.source, v.ttl, v.name, v.hosts, v.files) == (  # type: ignore[attr-defined]
        "vault",
        "8s",
        "coordinator",
        ("localhost",),
        None,
    )
    assert duration_seconds("24h") == 86400 and duration_seconds("90") == 90
    for data, key, reason in [
        ({"source": "acme"}, "tls.source", "must be one of files, vault"),
        ({"ca": "/ca"}, "tls.cert", "is required"),
        ({"source": "vault", "ttl": "1 day"}, "tls.ttl", "duration"),
        ({"source": "vault", "ttl": "1s"}, "tls.ttl", "at least 2s"),
        ({"source": "vault", "cert": "/c"}, "tls.cert", "in memory"),
        ({"source": "vault", "name": "a b"}, "tls.name", "letters"),
        ({"source": "vault", "hosts": ["h"]}, "tls.hosts", "unknown key"),
    ]:
        with pytest.raises(ConfigError) as exc:
            _tls(data, default_name="x")
        assert exc.value.key == key and reason in exc.value.reason, exc.value


def test_file_source_reads_at_start(tmp_path: Path) -> None:
    for n in ("ca", "c", "k"):
        (tmp_path / n).write_bytes(n.encode())
    src = FileCertSource(TlsFiles(tmp_path / "ca", tmp_path / "c", tmp_path / "k"))
    assert src.current() == (b"ca", b"c", b"k") and src.generation == 0
    with pytest.raises(ConfigError, match="cannot read"):
        FileCertSource(TlsFiles(tmp_path / "none", tmp_path / "c", tmp_path / "k"))


def test_file_source_reloads_changed_files(tmp_path: Path) -> None:
    from coordinator.cli.certs import create_dev_pki

    create_dev_pki(tmp_path / "a", agents=["node1"], admins=[], hosts=[], days=1)
    create_dev_pki(tmp_path / "b", agents=["node1"], admins=[], hosts=[], days=1)
    files = TlsFiles(
        *(tmp_path / "a" / n for n in ("ca.pem", "agent-node1.pem", "agent-node1.key"))
    )
    src = FileCertSource(files)
    first = src.current()
    assert src.generation == 0
    new_cert = (tmp_path / "b" / "agent-node1.pem").read_bytes()
    files.cert.write_bytes(new_cert)  # the key is not replaced yet: a mismatched pair is ignored
    assert src.generation == 0 and src.current() == first
    files.key.write_bytes((tmp_path / "b" / "agent-node1.key").read_bytes())
    assert src.generation == 1 and src.current()[1] == new_cert
