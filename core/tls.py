"""Mutual TLS for every connection: loading credentials and mapping a certificate to an identity.

A clawback certificate's subject carries the identity: CN is the name
(an agent's name, "coordinator", or an operator's name) and OU the role
(`agent`, `admin`, `coordinator`). design.md §Identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from core.errors import ConfigError, PermissionDenied

if TYPE_CHECKING:
    import grpc

# grpc and cryptography are imported by the functions that use them: every run of the
# `clawback` CLI imports this module (for TlsFiles) but, with certificate files, parses no
# certificate (cryptography.x509 costs ~35 ms), and `--help` or `certs init` dial nothing.

ROLES = ("agent", "admin", "coordinator")


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path

    def read(self, what: str = "tls") -> tuple[bytes, bytes, bytes]:
        out = []
        for name in ("ca", "cert", "key"):
            p = getattr(self, name)
            try:
                out.append(p.read_bytes())
            except OSError as exc:
                raise ConfigError(
                    str(p), f"{what}.{name}", f"cannot read: {exc.strerror}"
                ) from None
        return out[0], out[1], out[2]


@dataclass(frozen=True)
class Identity:
    name: str
    role: str
    serial: int


def identity_from_pem(pem: bytes) -> Identity:
    import cryptography.x509 as x509  # ~0.3 µs once loaded: this runs for every RPC

    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise PermissionDenied(f"unreadable peer certificate: {exc}") from None
    cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    ou = cert.subject.get_attributes_for_oid(x509.NameOID.ORGANIZATIONAL_UNIT_NAME)
    if not cn or not ou:
        raise PermissionDenied("peer certificate has no CN/OU: not a clawback certificate")
    role = str(ou[0].value)
    if role not in ROLES:
        raise PermissionDenied(f"peer certificate has unknown role {role!r}")
    return Identity(str(cn[0].value), role, cert.serial_number)


def peer_identity(auth_context: dict[str, list[bytes]]) -> Identity:
    """The identity of a gRPC peer, from the certificate it presented (verified by the TLS layer)."""
    pems = auth_context.get("x509_pem_cert")
    if not pems:
        raise PermissionDenied("no client certificate presented")
    return identity_from_pem(pems[0])


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    import grpc

    ca, cert, key = files.read()
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=True
    )


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    import grpc

    ca, cert, key = files.read()
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )
