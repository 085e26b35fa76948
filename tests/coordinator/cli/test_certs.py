"""`clawback certs init` / create_dev_pki: roles, SANs, key modes, no overwrite, --add, and a real mTLS handshake."""

from __future__ import annotations

import ipaddress
import stat
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from coordinator.cli.certs import create_dev_pki
from coordinator.cli.client import AdminClient
from coordinator.cli.main import main
from core.errors import AlreadyExists, NotFound, Unavailable, UsageError
from core.tls import identity_from_pem, peer_identity, server_credentials
from core.wire import SERVER_OPTIONS
from protos.clawback.v1 import admin_pb2_grpc, common_pb2


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_roles_names_and_files(tmp_path: Path) -> None:
    made = create_dev_pki(
        tmp_path / "pki",
        agents=["node1", "node2"],
        admins=["alice"],
        hosts=["10.1.2.3", "backup.example"],
        days=30,
    )
    d = tmp_path / "pki"
    assert sorted(p.name for p in d.iterdir()) == sorted(
        [
            "ca.pem",
            "ca.key",
            "coordinator.pem",
            "coordinator.key",
            "agent-node1.pem",
            "agent-node1.key",
            "agent-node2.pem",
            "agent-node2.key",
            "admin-alice.pem",
            "admin-alice.key",
        ]
    )
    assert made["ca"] == d / "ca.pem"
    assert made["agents"]["node1"].cert == d / "agent-node1.pem"
    assert made["admins"]["alice"].key == d / "admin-alice.key"
    assert made["coordinator"].ca == d / "ca.pem"
    for files, name, role in [
        (made["coordinator"], "coordinator", "coordinator"),
        (made["agents"]["node2"], "node2", "agent"),
        (made["admins"]["alice"], "alice", "admin"),
    ]:
        ident = identity_from_pem(files.cert.read_bytes())
        assert (ident.name, ident.role) == (name, role)
        cert = _cert(files.cert)
        assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "clawback"
        assert cert.issuer == _cert(d / "ca.pem").subject
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        want = (
            ExtendedKeyUsageOID.SERVER_AUTH
            if role == "coordinator"
            else ExtendedKeyUsageOID.CLIENT_AUTH
        )
        assert list(eku) == [want]
        assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days in (29, 30)
    ca = _cert(d / "ca.pem")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_coordinator_sans(tmp_path: Path) -> None:
    made = create_dev_pki(tmp_path, hosts=["10.1.2.3", "backup.example", "::1"])
    san = (
        _cert(made["coordinator"].cert)
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value
    )
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "backup.example"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("10.1.2.3"),
        ipaddress.ip_address("::1"),
    ]


def test_private_keys_are_0600(tmp_path: Path) -> None:
    create_dev_pki(tmp_path, agents=["a"], admins=["b"])
    for p in tmp_path.iterdir():
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o600 if p.suffix == ".key" else 0o644), p


def test_refuses_to_replace_a_ca(tmp_path: Path) -> None:
    create_dev_pki(tmp_path, agents=["a"])
    before = (tmp_path / "ca.key").read_bytes()
    with pytest.raises(AlreadyExists, match=r"ca\.pem"):
        create_dev_pki(tmp_path, agents=["z"])
    assert (tmp_path / "ca.key").read_bytes() == before
    assert not (tmp_path / "agent-z.pem").exists()


def test_add_reuses_the_ca(tmp_path: Path) -> None:
    first = create_dev_pki(tmp_path, agents=["a"], admins=["admin"])
    coord = first["coordinator"].cert.read_bytes()
    more = create_dev_pki(tmp_path, agents=["b"], admins=["ops"], add=True)
    assert sorted(more["agents"]) == ["b"] and sorted(more["admins"]) == ["ops"]
    assert first["coordinator"].cert.read_bytes() == coord  # left alone
    assert _cert(tmp_path / "agent-b.pem").issuer == _cert(tmp_path / "ca.pem").subject
    _cert(tmp_path / "agent-b.pem").verify_directly_issued_by(_cert(tmp_path / "ca.pem"))
    with pytest.raises(AlreadyExists, match="agent-b"):
        create_dev_pki(tmp_path, agents=["b"], add=True)
    with pytest.raises(UsageError, match=r"coordinator\.pem"):
        create_dev_pki(tmp_path, hosts=["new.example"], add=True)


def test_add_without_ca(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match=r"ca\.pem"):
        create_dev_pki(tmp_path, agents=["a"], add=True)


@pytest.mark.parametrize("bad", ["../x", "a/b", "", "-x", "x" * 65])
def test_bad_names(tmp_path: Path, bad: str) -> None:
    with pytest.raises(UsageError):
        create_dev_pki(tmp_path, agents=[bad])
    assert not any(tmp_path.iterdir())


def test_cli_certs_init(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "pki"
    assert main(["certs", "init", "--dir", str(d), "--agent", "n1", "--host", "10.0.0.9"]) == 0
    out = capsys.readouterr().out
    assert "admin-admin.pem" in out and "agent-n1.key" in out
    assert main(["certs", "init", "--dir", str(d)]) == 6
    assert "refusing" in capsys.readouterr().err
    assert main(["certs", "init", "--dir", str(d), "--add", "--agent", "n2", "--json"]) == 0
    assert '"n2"' in capsys.readouterr().out
    assert not (d / "admin-admin2.pem").exists()


class _WhoAmI(admin_pb2_grpc.AdminServiceServicer):
    def GetRepository(
        self, request: object, context: grpc.ServicerContext
    ) -> common_pb2.RepoConfig:
        ident = peer_identity(context.auth_context())
        return common_pb2.RepoConfig(repo_id=f"{ident.role}:{ident.name}")


@pytest.fixture
def pki_server(tmp_path: Path) -> Iterator[tuple[dict, int]]:
    made = create_dev_pki(tmp_path / "pki", agents=["node1"], admins=["alice"])
    server = grpc.server(futures.ThreadPoolExecutor(2), options=SERVER_OPTIONS)
    admin_pb2_grpc.add_AdminServiceServicer_to_server(_WhoAmI(), server)
    port = server.add_secure_port("127.0.0.1:0", server_credentials(made["coordinator"]))
    server.start()
    yield made, port
    server.stop(0)


def test_mtls_handshake_with_generated_certs(pki_server: tuple[dict, int]) -> None:
    made, port = pki_server
    for address in (f"localhost:{port}", f"127.0.0.1:{port}"):
        with AdminClient(address, made["admins"]["alice"], timeout=10) as client:
            assert client.get_repository().repo_id == "admin:alice"
    with AdminClient(f"localhost:{port}", made["agents"]["node1"], timeout=10) as client:
        assert client.get_repository().repo_id == "agent:node1"


def test_foreign_ca_is_refused(pki_server: tuple[dict, int], tmp_path: Path) -> None:
    _, port = pki_server
    other = create_dev_pki(tmp_path / "other", admins=["mallory"])
    client = AdminClient(f"localhost:{port}", other["admins"]["mallory"], timeout=10)
    with client, pytest.raises(Unavailable, match=f"coordinator at localhost:{port}"):
        client.get_repository()
