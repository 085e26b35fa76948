"""A development PKI: one CA and the coordinator, agent and admin certificates it signs (design.md §Identity).

Every certificate names its holder: O=clawback, OU=role (`coordinator`,
`agent`, `admin`), CN=name. Keys are EC P-256, written 0600 and never
overwritten. For production, Vault PKI issues short-lived certificates
(next version).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from core.clock import SYSTEM, Clock
from core.errors import AlreadyExists, KeyMaterialError, NotFound, UsageError
from core.tls import TlsFiles

ORGANIZATION = "clawback"
CA_DAYS = 3650
DEFAULT_DAYS = 365
COORDINATOR_NAME = "coordinator"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def create_dev_pki(
    dir: str | os.PathLike[str],
    agents: Sequence[str] = (),
    admins: Sequence[str] = (),
    hosts: Sequence[str] = (),
    days: int = DEFAULT_DAYS,
    *,
    add: bool = False,
    clock: Clock = SYSTEM,
) -> dict[str, Any]:
    """Create a CA and certificates in `dir`; returns where everything is.

    Files: `ca.pem`, `ca.key`, `coordinator.pem/.key`, `agent-<name>.pem/.key`,
    `admin-<name>.pem/.key`. Without `add`, refuses (AlreadyExists) if a CA is
    already there; with `add`, signs the new certificates with the existing CA
    (and creates the coordinator's only if it has none). Never overwrites a
    file: every target is checked before anything is written.

    Returns {"dir": Path, "ca": Path, "ca_key": Path, "coordinator": TlsFiles | None,
    "agents": {name: TlsFiles}, "admins": {name: TlsFiles}, "created": [Path, ...]}
    (the agents/admins maps hold only the certificates made by this call).
    """
    if days < 1:
        raise UsageError(f"--days must be at least 1, not {days}")
    for name in (*agents, *admins):
        if not _NAME.match(name):
            raise UsageError(
                f"certificate name {name!r} must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
    sans = [_san(h) for h in ("localhost", "127.0.0.1", *hosts)]
    out = Path(dir)
    ca_pem, ca_key_path = out / "ca.pem", out / "ca.key"
    coord_pem, coord_key = out / "coordinator.pem", out / "coordinator.key"
    now = dt.datetime.fromtimestamp(clock.now_ns() / 1e9, tz=dt.UTC)

    ca_cert: x509.Certificate | None
    ca_key: ec.EllipticCurvePrivateKey | None
    if add:
        ca_cert, ca_key = _load_ca(ca_pem, ca_key_path)
        make_coordinator = not coord_pem.exists()
        if hosts and not make_coordinator:
            raise UsageError(
                f"{coord_pem} exists: remove coordinator.pem/.key to reissue it with new --host names"
            )
    else:
        ca_cert, ca_key = None, None
        for p in (ca_pem, ca_key_path):
            if p.exists():
                raise AlreadyExists(
                    f"{p} exists: refusing to replace the CA (use --add to sign more certificates with it)"
                )
        make_coordinator = True

    wanted: list[tuple[str, str, Path, Path]] = []  # (role, name, cert, key)
    if make_coordinator:
        wanted.append(("coordinator", COORDINATOR_NAME, coord_pem, coord_key))
    for role, names in (("agent", agents), ("admin", admins)):
        for name in dict.fromkeys(names):
            wanted.append((role, name, out / f"{role}-{name}.pem", out / f"{role}-{name}.key"))
    targets = [p for _, _, c, k in wanted for p in (c, k)]
    if not add:
        targets += [ca_pem, ca_key_path]
    for p in targets:
        if p.exists():
            raise AlreadyExists(f"{p} exists: refusing to overwrite it")

    out.mkdir(parents=True, exist_ok=True)
    created: list[Path] = []
    if ca_cert is None or ca_key is None:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = _ca_certificate(ca_key, now)
        _write_key(ca_key_path, ca_key)
        _write_cert(ca_pem, ca_cert)
        created += [ca_pem, ca_key_path]

    result: dict[str, Any] = {
        "dir": out,
        "ca": ca_pem,
        "ca_key": ca_key_path,
        "coordinator": TlsFiles(ca_pem, coord_pem, coord_key) if coord_pem.exists() else None,
        "agents": {},
        "admins": {},
        "created": created,
    }
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    for role, name, cert_path, key_path in wanted:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _leaf_certificate(
            ca_cert, ca_key, key, role, name, sans if role == "coordinator" else [], now, not_after
        )
        _write_key(key_path, key)
        _write_cert(cert_path, cert)
        created += [cert_path, key_path]
        files = TlsFiles(ca_pem, cert_path, key_path)
        if role == "coordinator":
            result["coordinator"] = files
        else:
            result[role + "s"][name] = files
    return result


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not re.match(r"^[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?$", host):
        raise UsageError(f"--host {host!r} is neither an IP address nor a DNS name")
    return x509.DNSName(host)


def _name(role: str | None, cn: str) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION)]
    if role:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attrs)


def _ca_certificate(key: ec.EllipticCurvePrivateKey, now: dt.datetime) -> x509.Certificate:
    name = _name(None, "clawback development CA")
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def _leaf_certificate(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    key: ec.EllipticCurvePrivateKey,
    role: str,
    name: str,
    sans: list[x509.GeneralName],
    now: dt.datetime,
    not_after: dt.datetime,
) -> x509.Certificate:
    usage = (
        ExtendedKeyUsageOID.SERVER_AUTH
        if role == "coordinator"
        else ExtendedKeyUsageOID.CLIENT_AUTH
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(role, name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def _load_ca(
    cert_path: Path, key_path: Path
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise NotFound(
            f"--add needs an existing CA: {exc.filename} does not exist (run certs init without --add)"
        ) from None
    except (ValueError, TypeError) as exc:
        raise KeyMaterialError(f"the CA in {cert_path.parent} is unreadable: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeyMaterialError(f"{key_path} is not an EC private key")
    if cert.public_key() != key.public_key():
        raise KeyMaterialError(f"{key_path} is not the key of {cert_path}")
    return cert, key


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write(path, pem, 0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    _write(path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _write(path: Path, data: bytes, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise AlreadyExists(f"{path} exists: refusing to overwrite it") from None
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)  # the umask must not loosen (or tighten) what we meant
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
