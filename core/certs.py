"""Where a process's mTLS certificate comes from: files on disk, or short-lived certificates from Vault PKI renewed in the background.

A `CertSource` hands out the current (ca_pem, cert_pem, key_pem) and a
`generation` that increases each time the material changes; callers build
new TLS contexts from it when the generation moves (the coordinator's
certificate fetcher, the agent's channel pool) and leave existing connections
alone: TLS checks a certificate only during the handshake (design.md §Identity).

`VaultCertSource` makes an EC P-256 key in memory (never written anywhere,
never sent), has a CSR for it signed by `<pki_mount>/sign/<role>`, trusts the
PKI's CA chain from the signing response, and renews at `renew_fraction` of
the certificate's lifetime in a daemon thread. When Vault cannot be reached it
keeps the current certificate and retries with exponential backoff and jitter.
Errors are the translated ones of core.vault (PermissionDenied when the policy
does not allow the name, Unavailable when Vault is down).
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import random
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from core.clock import SYSTEM, Clock
from core.config import Table
from core.errors import ClawbackError, ConfigError, PermissionDenied, Unavailable, UsageError
from core.tls import ROLES, TlsFiles, identity_from_pem

if TYPE_CHECKING:  # hvac is imported only by processes that use Vault
    from core.vault import VaultClient, VaultSettings

# cryptography is imported inside the functions that parse or make certificates: the
# `clawback` CLI imports this module on every run but, with certificate files, never
# parses one, and cryptography.x509 costs it ~35 ms of start-up.

log = logging.getLogger("clawback.certs")

SOURCES = ("files", "vault")
_DURATION = re.compile(r"^(\d+)([smhd]?)$")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_CN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

Material = tuple[bytes, bytes, bytes]  # (ca_pem, cert_pem, key_pem)


def duration_seconds(value: str) -> int:
    """ "24h" -> 86400 ("90m", "30s", "1d", "3600"); ValueError with the reason."""
    m = _DURATION.match(value.strip())
    if not m or int(m.group(1)) == 0:
        raise ValueError(f"must be a duration like 24h, 90m or 30s, not {value!r}")
    return int(m.group(1)) * _UNIT[m.group(2)]


class CertSource(Protocol):
    """The current TLS material of this process.

    `current()` never blocks on the network; it raises Unavailable only if no
    certificate was ever obtained. `generation` increases whenever `current()`
    would return different material.
    """

    @property
    def generation(self) -> int: ...

    def current(self) -> Material: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class CertSettings:
    """The `[tls]` table: where certificates come from.

    source = "files": `files` (ca, cert, key) as before.
    source = "vault": a certificate for `name` from Vault PKI, `ttl` long, for
    `hosts` (DNS names/IPs, the coordinator only); `extra_ca` (the `ca` key,
    optional) is trusted too, e.g. while some peers still use file certificates.
    """

    source: str = "files"
    files: TlsFiles | None = None
    ttl: str = "24h"
    name: str = ""
    hosts: tuple[str, ...] = ()
    extra_ca: Path | None = None


def load_cert_settings(
    table: Table,
    *,
    default_ttl: str = "24h",
    default_name: str | None = None,
    default_hosts: Sequence[str] | None = None,
) -> CertSettings:
    """Read `[tls]` (calls `table.done()`); ConfigError names file, key and reason.

    `default_name` None: no `name` key (the agent's name comes from `[agent] name`);
    `default_hosts` None: no `hosts` key (only a server has host names).
    """
    source = table.str("source", "files", choices=SOURCES)
    if source == "files":
        files = TlsFiles(table.path("ca"), table.path("cert"), table.path("key"))
        table.done()
        return CertSettings(source="files", files=files)
    for key in ("cert", "key"):
        if table.has(key):
            raise table.error(
                key, 'has no use with source = "vault": the key and certificate live in memory'
            )
    ttl = table.str("ttl", default_ttl)
    try:
        if duration_seconds(ttl) < 2:
            raise ValueError(f"must be at least 2s, not {ttl!r}")
    except ValueError as exc:
        raise table.error("ttl", str(exc)) from None
    name = ""
    if default_name is not None:
        name = table.str("name", default_name)
        if not _CN.match(name):
            raise table.error("name", f"letters, digits, '.', '_' and '-' only, not {name!r}")
    hosts: tuple[str, ...] = ()
    if default_hosts is not None:
        hosts = tuple(table.str_list("hosts", list(default_hosts)))
    extra_ca = table.path("ca", None)
    table.done()
    return CertSettings(source="vault", ttl=ttl, name=name, hosts=hosts, extra_ca=extra_ca)


def read_extra_ca(path: Path | None, what: str = "tls.ca") -> bytes:
    if path is None:
        return b""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(str(path), what, f"cannot read: {exc.strerror}") from None


class FileCertSource:
    """Certificates from files (a development PKI, or one's own renewed by other tooling).

    Read at start (ConfigError if unreadable) and again when a file changes: a new,
    consistent set (the key matches the certificate) becomes the next generation;
    a half-written or unreadable one is ignored until it is complete.
    """

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._lock = threading.Lock()
        self._sig = self._signature()
        self._material = files.read()
        self._generation = 0

    def _signature(self) -> tuple[tuple[int, int, int], ...]:
        out = []
        for p in (self.files.ca, self.files.cert, self.files.key):
            try:
                st = p.stat()
                out.append((st.st_ino, st.st_mtime_ns, st.st_size))
            except OSError:
                out.append((0, 0, 0))
        return tuple(out)

    def _reload(self) -> None:
        sig = self._signature()
        if sig == self._sig:
            return
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        try:
            material = self.files.read()
            cert = x509.load_pem_x509_certificate(material[1])
            key = serialization.load_pem_private_key(material[2], password=None)
            if cert.public_key() != key.public_key():
                return  # cert and key from different renewals: wait for the other file
        except (ClawbackError, ValueError, TypeError):
            return
        self._sig, self._material = sig, material
        self._generation += 1
        log.info(
            "certificate files %s changed: reloaded (valid until %s)",
            self.files.cert,
            cert.not_valid_after_utc.isoformat(timespec="seconds"),
        )

    @property
    def generation(self) -> int:
        with self._lock:
            self._reload()
            return self._generation

    def current(self) -> Material:
        with self._lock:
            self._reload()
            return self._material

    def close(self) -> None:
        pass


def _san_list(hosts: Sequence[str]) -> tuple[list[str], list[str]]:
    dns, ips = [], []
    for h in hosts:
        try:
            ips.append(str(ipaddress.ip_address(h)))
        except ValueError:
            dns.append(h)
    return dns, ips


def _make_csr(common_name: str, hosts: Sequence[str]) -> tuple[bytes, str]:
    """A fresh P-256 key (PEM, memory only) and a CSR for it with CN = `common_name`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    )
    dns, ips = _san_list(hosts)
    if dns or ips:
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    csr = builder.sign(key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


class VaultCertSource:
    """Short-lived certificates from Vault PKI for `common_name` in `role`, renewed before expiry.

    Call `start()` (blocking: the first certificate, then the renewal thread) and
    `close()` to stop renewing. Thread-safe.
    """

    def __init__(
        self,
        client: VaultClient,
        settings: VaultSettings,
        role: str,
        common_name: str,
        ttl: str = "24h",
        clock: Clock = SYSTEM,
        *,
        hosts: Sequence[str] = (),
        extra_ca: bytes = b"",
    ) -> None:
        if role not in ROLES:
            raise UsageError(f"unknown certificate role {role!r} (one of {', '.join(ROLES)})")
        try:
            duration_seconds(ttl)
        except ValueError as exc:
            raise UsageError(f"certificate ttl {exc}") from None
        self.client = client
        self.settings = settings
        self.role = role
        self.common_name = common_name
        self.ttl = ttl
        self.clock = clock
        self.hosts = tuple(hosts)
        self.extra_ca = extra_ca
        self._cond = threading.Condition()
        self._material: Material | None = None
        self._generation = 0
        self._not_after: datetime.datetime | None = None
        self._renew_at = 0.0  # monotonic
        self._expires_at = 0.0  # monotonic
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"VaultCertSource({self.role}/{self.common_name}, gen {self._generation})"

    # ---- CertSource ----------------------------------------------------------
    @property
    def generation(self) -> int:
        with self._cond:
            return self._generation

    def current(self) -> Material:
        with self._cond:
            if self._material is None:
                raise Unavailable(
                    f"no certificate for {self.common_name} yet: Vault PKI has not issued one "
                    f"({self.settings.address})"
                )
            return self._material

    @property
    def not_after(self) -> datetime.datetime | None:
        with self._cond:
            return self._not_after

    # ---- issuing -------------------------------------------------------------
    def issue(self) -> None:
        """Get a new certificate now (blocking) and make it current; raises translated errors."""
        from cryptography import x509

        key_pem, csr_pem = _make_csr(self.common_name, self.hosts)
        dns, ips = _san_list(self.hosts)
        try:
            cert_pem, chain_pem = self.client.sign_csr(
                self.settings.pki_mount,
                self.role,
                csr_pem,
                self.common_name,
                self.ttl,
                alt_names=dns,
                ip_sans=ips,
            )
        except PermissionDenied as exc:
            raise PermissionDenied(
                f"Vault refused a {self.role} certificate for {self.common_name!r}: {exc}"
            ) from exc
        except (KeyError, TypeError) as exc:
            raise ClawbackError(
                f"Vault PKI returned no certificate from {self.settings.pki_mount}/sign/{self.role}"
            ) from exc
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
        ident = identity_from_pem(cert_pem.encode())
        if (ident.name, ident.role) != (self.common_name, self.role):
            raise PermissionDenied(
                f"Vault PKI issued a certificate for {ident.name}/{ident.role}, not "
                f"{self.common_name}/{self.role}: check the PKI role (ou, use_csr_common_name)"
            )
        now_mono = self.clock.monotonic()
        now = datetime.datetime.fromtimestamp(self.clock.now_ns() / 1e9, datetime.UTC)
        not_after = cert.not_valid_after_utc
        lifetime = max(0.0, (not_after - now).total_seconds())
        ca = chain_pem.encode()
        if self.extra_ca:
            ca = ca.rstrip(b"\n") + b"\n" + self.extra_ca
        with self._cond:
            self._material = (ca, cert_pem.encode(), key_pem)
            self._generation += 1
            self._not_after = not_after
            self._expires_at = now_mono + lifetime
            self._renew_at = now_mono + lifetime * self.settings.renew_fraction
            self._cond.notify_all()
        log.info(
            "certificate for %s %s, valid until %s",
            self.common_name,
            "issued" if self._generation == 1 else "renewed",
            not_after.isoformat(timespec="seconds"),
        )

    def start(self) -> VaultCertSource:
        """The first certificate (unless Vault is unreachable: then the thread keeps trying), then renewal."""
        if self._material is None:
            try:
                self.issue()
            except Unavailable as exc:
                log.warning("%s; will retry until Vault PKI answers", exc)
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(
                    target=self._renew_loop, name=f"cert-renewal-{self.common_name}", daemon=True
                )
                self._thread.start()
        return self

    def wait_generation(self, generation: int, timeout: float) -> bool:
        """Wait until `generation` is reached (tests, start-up); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._generation >= generation, timeout)

    def _renew_loop(self) -> None:
        backoff = self.settings.backoff_initial
        while not self._stop.is_set():
            with self._cond:
                due = self._renew_at if self._material is not None else 0.0
            if self._stop.wait(max(0.0, due - self.clock.monotonic())):
                return
            try:
                self.issue()
                backoff = self.settings.backoff_initial
            except ClawbackError as exc:
                with self._cond:
                    left = self._expires_at - self.clock.monotonic()
                    have = self._material is not None
                # Retry sooner as expiry nears, so a short outage costs no connections.
                wait = min(self.settings.backoff_max, backoff) * random.uniform(0.5, 1.0)
                if have and left > 0:
                    wait = min(wait, max(0.2, left / 4))
                backoff = min(self.settings.backoff_max, backoff * 2)
                if not have:
                    state = "no certificate yet"
                elif left > 0:
                    state = f"keeping the current one (expires in {left:.0f}s)"
                else:
                    state = "the current one has EXPIRED: new connections will fail"
                log.warning(
                    "certificate renewal for %s failed: %s; %s; retrying in %.1fs",
                    self.common_name,
                    exc,
                    state,
                    wait,
                )
                if self._stop.wait(wait):
                    return
            except Exception:  # never let the thread die silently
                log.exception("unexpected error renewing the certificate for %s", self.common_name)
                if self._stop.wait(self.settings.backoff_max):
                    return

    def close(self) -> None:
        """Stop renewing (the current certificate stays usable until it expires)."""
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=5)
        self._thread = None


def source_from_settings(
    certs: CertSettings,
    role: str,
    name: str,
    client: VaultClient | None,
    vault: VaultSettings | None,
    clock: Clock = SYSTEM,
) -> CertSource:
    """The CertSource a `[tls]` table describes; with Vault, started (first certificate issued)."""
    if certs.source == "files":
        if certs.files is None:
            raise UsageError('[tls] source = "files" needs ca, cert and key')
        return FileCertSource(certs.files)
    if client is None or vault is None:
        raise UsageError('[tls] source = "vault" needs a [vault] table')
    return VaultCertSource(
        client,
        vault,
        role,
        name,
        certs.ttl,
        clock,
        hosts=certs.hosts,
        extra_ca=read_extra_ca(certs.extra_ca),
    ).start()
