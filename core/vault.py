"""Vault (OpenBao) access: settings, AppRole or token-file login, background token renewal, audited calls.

Every credential comes from Vault. `VaultClient` logs in with AppRole (a
role_id file plus a secret_id file, optionally response-wrapped: unwrapped
once, the secret_id then kept in memory only) or with a token file kept fresh
by Vault Agent (re-read when it changes). A daemon thread renews the token at
`renew_fraction` of its TTL and logs in again when renewal fails or the token
was revoked, with exponential backoff and jitter.

Errors are translated at this boundary (design.md §Keys, conventions §Errors):

    hvac Forbidden / Unauthorized          -> PermissionDenied("Vault refused <path>: ...")
    a failed login                         -> VaultAuthError (a PermissionDenied)
    hvac InvalidPath                       -> NotFound("Vault has nothing at <path>")
    hvac InvalidRequest                    -> UsageError / KeyMaterialError (per call)
    VaultDown, 5xx, 429, connection errors -> Unavailable("Vault at <address> is unreachable: ...")

Every call is logged on `clawback.vault.audit` as
`vault <METHOD> <path> -> ok|denied|error (<ms> ms)`: paths and outcomes only,
never a token, secret_id, key or plaintext (paths carry none by construction).
hvac is synchronous: async callers run these methods in a thread.
"""

from __future__ import annotations

import base64
import logging
import os
import random
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hvac.adapters import RawAdapter

from core.clock import SYSTEM, Clock
from core.config import Table
from core.errors import (
    ClawbackError,
    KeyMaterialError,
    NotFound,
    PermissionDenied,
    Unavailable,
    UsageError,
)

AUDIT = logging.getLogger("clawback.vault.audit")
log = logging.getLogger("clawback.vault")

AUTH_KINDS = ("approle", "token_file")


class VaultAuthError(PermissionDenied):
    """This process could not log in to Vault (bad or used-up credentials), as opposed to a policy denial."""


GRANT_REFUSED = "restore grant was already used or has expired: refusing (possible interception)"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9_.-]+)*$")
_SECRET_KEYS = ("token", "secret_id", "role_id", "wrapping_token", "root_token")


@dataclass(frozen=True)
class VaultSettings:
    """Where Vault is, how to log in, and the names clawback uses there (all configurable)."""

    address: str = "http://127.0.0.1:8200"
    ca_file: Path | None = None
    auth: str = "approle"  # "approle" | "token_file"
    role_id_file: Path | None = None
    secret_id_file: Path | None = None
    secret_id_wrapped: bool = True  # the file holds a wrapping token, unwrapped once
    token_file: Path | None = None  # written and kept fresh by Vault Agent
    approle_mount: str = "approle"
    transit_mount: str = "clawback-transit"
    transit_key: str = "clawback-data"
    kv_mount: str = "clawback-kv"
    id_key_path: str = "id-key"
    id_key_field: str = "key"
    pki_mount: str = "clawback-pki"
    grant_role: str = "clawback-restore-grant"
    timeout: float = 10.0  # seconds per HTTP request
    renew_fraction: float = 2 / 3  # renew when this fraction of the TTL has passed
    backoff_initial: float = 0.5  # seconds; doubled per failure, with jitter
    backoff_max: float = 30.0


def load_vault_settings(table: Table) -> VaultSettings:
    """Read a `[vault]` table (pass `root.table("vault")`); ConfigError names file, key, reason."""
    for key in _SECRET_KEYS:
        if table.has(key):
            raise table.error(
                key,
                "secrets do not belong in config files: keep it in a file only this user can "
                "read and name that file (role_id_file, secret_id_file or token_file)",
            )
    d = VaultSettings()
    address = table.str("address")
    if not address.startswith(("http://", "https://")):
        raise table.error(
            "address", f"must start with https:// (or http:// on loopback), not {address!r}"
        )
    auth = table.str("auth", d.auth, choices=AUTH_KINDS)
    role_id_file = table.path("role_id_file", None)
    secret_id_file = table.path("secret_id_file", None)
    token_file = table.path("token_file", None)
    if auth == "approle":
        for key, value in (("role_id_file", role_id_file), ("secret_id_file", secret_id_file)):
            if value is None:
                raise table.error(key, 'is required when auth = "approle"')
    elif token_file is None:
        raise table.error("token_file", 'is required when auth = "token_file"')

    def name(key: str, default: str) -> str:
        value: str = table.str(key, default)
        if not _NAME.match(value):
            raise table.error(key, f"must be a Vault path name like {default!r}, not {value!r}")
        return value

    settings = VaultSettings(
        address=address.rstrip("/"),
        ca_file=table.path("ca_file", None),
        auth=auth,
        role_id_file=role_id_file,
        secret_id_file=secret_id_file,
        secret_id_wrapped=table.bool("secret_id_wrapped", d.secret_id_wrapped),
        token_file=token_file,
        approle_mount=name("approle_mount", d.approle_mount),
        transit_mount=name("transit_mount", d.transit_mount),
        transit_key=name("transit_key", d.transit_key),
        kv_mount=name("kv_mount", d.kv_mount),
        id_key_path=name("id_key_path", d.id_key_path),
        id_key_field=name("id_key_field", d.id_key_field),
        pki_mount=name("pki_mount", d.pki_mount),
        grant_role=name("grant_role", d.grant_role),
        timeout=table.float("timeout", d.timeout, min=0.1),
        renew_fraction=table.float("renew_fraction", d.renew_fraction, min=0.1),
        backoff_initial=table.float("backoff_initial", d.backoff_initial, min=0.01),
        backoff_max=table.float("backoff_max", d.backoff_max, min=0.01),
    )
    if settings.renew_fraction > 0.95:
        raise table.error("renew_fraction", f"must be at most 0.95, not {settings.renew_fraction}")
    table.done()
    return settings


def read_secret_file(path: Path | None, what: str) -> str:
    """The stripped contents of a credential file; UsageError naming the file if unusable."""
    if path is None:
        raise UsageError(f"Vault login needs {what}, and none is configured")
    try:
        value = Path(path).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise UsageError(f"Vault {what} {path} does not exist") from None
    except PermissionError:
        raise UsageError(f"Vault {what} {path} is not readable by this user") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"Vault {what} {path} cannot be read: {exc}") from None
    if not value:
        raise UsageError(f"Vault {what} {path} is empty")
    return value


def _json(resp: Any) -> dict[str, Any]:
    import requests

    if isinstance(resp, requests.Response):
        if resp.status_code == 204 or not resp.content:
            return {}
        try:
            body = resp.json()
        except ValueError:
            return {}
        return body if isinstance(body, dict) else {}
    return resp if isinstance(resp, dict) else {}


class VaultClient:
    """A Vault session: login, renewal, and the calls clawback makes, each audited and translated.

    Thread-safe: each thread gets its own HTTP session; the token is shared.
    """

    def __init__(
        self,
        settings: VaultSettings,
        clock: Clock = SYSTEM,
        *,
        renew: bool = True,
        _static_token: str | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self._renew = renew and _static_token is None
        self._static = _static_token is not None
        self._lock = threading.RLock()
        self._token = _static_token or ""
        self._ttl = 0.0  # seconds granted at the last login/renewal
        self._login_ttl = 0.0
        self._renewable = False
        self._issued_at = 0.0  # monotonic
        self._secret_id: str | None = None  # unwrapped once, memory only
        self._token_sig: tuple[int, int, int] | None = None
        self._secrets: set[str] = {_static_token} if _static_token else set()
        self._local = threading.local()
        self._adapters: list[RawAdapter] = []
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def for_token(cls, settings: VaultSettings, token: str, clock: Clock = SYSTEM) -> VaultClient:
        """A client acting with a given token (an operator's, a restore grant's): no login, no renewal."""
        if not token:
            raise UsageError("no Vault token given")
        return cls(settings, clock, renew=False, _static_token=token)

    def with_token(self, token: str) -> VaultClient:
        """A client with the same settings acting with `token` (e.g. a restore grant), no renewal."""
        return VaultClient.for_token(self.settings, token, self.clock)

    def __repr__(self) -> str:  # never show the token
        return f"VaultClient({self.settings.address!r}, auth={'token' if self._static else self.settings.auth!r})"

    # ---- transport ---------------------------------------------------------
    def _adapter(self) -> RawAdapter:
        # hvac (and requests) load on first use: the CLI imports this module for its
        # settings, and most commands never talk to Vault (a tenth of their start-up).
        from hvac.adapters import RawAdapter

        adapter: RawAdapter | None = getattr(self._local, "adapter", None)
        if adapter is None:
            verify: bool | str = str(self.settings.ca_file) if self.settings.ca_file else True
            adapter = RawAdapter(
                base_uri=self.settings.address, verify=verify, timeout=self.settings.timeout
            )
            self._local.adapter = adapter
            with self._lock:
                self._adapters.append(adapter)
        return adapter

    def _redact(self, text: str) -> str:
        for s in list(self._secrets):
            if s:
                text = text.replace(s, "<redacted>")
        return text

    def _raw(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        token: str | None,
        wrap_ttl: str | None = None,
        invalid: type[ClawbackError] = UsageError,
    ) -> dict[str, Any]:
        """One HTTP call to Vault, audited, with hvac/requests errors translated."""
        import hvac.exceptions
        import requests

        method = method.upper()
        adapter = self._adapter()
        adapter.token = token or None
        start = self.clock.monotonic()
        outcome = "error"
        try:
            kwargs: dict[str, Any] = {}
            if body is not None:
                kwargs["json"] = body
            if wrap_ttl:
                kwargs["wrap_ttl"] = wrap_ttl
            resp = adapter.request(method.lower(), f"/v1/{path}", **kwargs)
            outcome = "ok"
            return _json(resp)
        except (hvac.exceptions.Forbidden, hvac.exceptions.Unauthorized) as exc:
            outcome = "denied"
            raise PermissionDenied(f"Vault refused {path}: permission denied") from exc
        except hvac.exceptions.InvalidPath as exc:
            raise NotFound(f"Vault has nothing at {path}") from exc
        except hvac.exceptions.InvalidRequest as exc:
            detail = self._redact(", ".join(exc.errors or []) or "invalid request")
            raise invalid(f"Vault rejected {path}: {detail}") from exc
        except hvac.exceptions.VaultDown as exc:
            raise Unavailable(
                f"Vault at {self.settings.address} is unreachable: it is sealed or in standby"
            ) from exc
        except (
            hvac.exceptions.InternalServerError,
            hvac.exceptions.BadGateway,
            hvac.exceptions.RateLimitExceeded,
            hvac.exceptions.VaultNotInitialized,
        ) as exc:
            detail = self._redact(", ".join(exc.errors or []) or type(exc).__name__)
            raise Unavailable(f"Vault at {self.settings.address} is unreachable: {detail}") from exc
        except hvac.exceptions.VaultError as exc:
            detail = self._redact(", ".join(exc.errors or []) or type(exc).__name__)
            raise ClawbackError(f"Vault failed on {path}: {detail}") from exc
        except requests.exceptions.SSLError as exc:
            raise Unavailable(
                f"Vault at {self.settings.address} is unreachable: TLS failed "
                f"(is ca_file right?): {type(exc).__name__}"
            ) from exc
        except requests.exceptions.Timeout as exc:
            raise Unavailable(
                f"Vault at {self.settings.address} is unreachable: no answer in {self.settings.timeout:g}s"
            ) from exc
        except requests.exceptions.RequestException as exc:
            raise Unavailable(
                f"Vault at {self.settings.address} is unreachable: {_reason(exc)}"
            ) from exc
        finally:
            ms = (self.clock.monotonic() - start) * 1000
            AUDIT.info("vault %s %s -> %s (%.0f ms)", method, path, outcome, ms)

    def request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        wrap_ttl: str | None = None,
        invalid: type[ClawbackError] = UsageError,
    ) -> dict[str, Any]:
        """An authenticated call; logs in first if needed, and once more if the token was revoked."""
        token = self._current_token()
        try:
            return self._raw(method, path, body, token=token, wrap_ttl=wrap_ttl, invalid=invalid)
        except PermissionDenied:
            if self._static or not self._token_invalid(token):
                raise
            log.warning("Vault token was revoked or has expired; logging in again")
            token = self._relogin(stale=token)
            return self._raw(method, path, body, token=token, wrap_ttl=wrap_ttl, invalid=invalid)

    # ---- login -------------------------------------------------------------
    def login(self) -> None:
        """Log in now (AppRole or token file) and start the renewal thread; idempotent per token."""
        if self._static:
            return
        with self._lock:
            self._login_locked()
        if self._renew:
            self._start_renewal()

    def _login_locked(self) -> None:
        s = self.settings
        if s.auth == "token_file":
            self._load_token_file(force=True)
            return
        role_id = read_secret_file(s.role_id_file, "role_id_file")
        secret_id = self._get_secret_id()
        self._secrets.update((role_id, secret_id))
        try:
            resp = self._raw(
                "POST",
                f"auth/{s.approle_mount}/login",
                {"role_id": role_id, "secret_id": secret_id},
                token=None,
                invalid=PermissionDenied,
            )
        except PermissionDenied as exc:
            raise VaultAuthError(
                f"Vault refused the AppRole login with {s.role_id_file}: invalid role_id or "
                "secret_id (revoked, expired or for another role)"
            ) from exc
        auth = resp.get("auth") or {}
        self._set_token(
            str(auth["client_token"]),
            float(auth.get("lease_duration") or 0),
            bool(auth.get("renewable")),
        )
        self._login_ttl = self._ttl
        log.info("logged in to Vault at %s with AppRole (token TTL %.0fs)", s.address, self._ttl)

    def _get_secret_id(self) -> str:
        s = self.settings
        if not s.secret_id_wrapped:
            return read_secret_file(s.secret_id_file, "secret_id_file")
        if self._secret_id is None:
            wrapping = read_secret_file(s.secret_id_file, "secret_id_file")
            self._secrets.add(wrapping)
            try:
                resp = self._raw(
                    "POST", "sys/wrapping/unwrap", None, token=wrapping, invalid=PermissionDenied
                )
            except (PermissionDenied, NotFound) as exc:
                raise VaultAuthError(
                    f"the response-wrapped secret_id in {s.secret_id_file} was already unwrapped "
                    "or has expired: refusing it (possible interception); issue a new one with "
                    "`clawback vault setup`"
                ) from exc
            secret_id = (resp.get("data") or {}).get("secret_id")
            if not secret_id:
                raise VaultAuthError(
                    f"{s.secret_id_file} does not wrap an AppRole secret_id: refusing it"
                )
            self._secret_id = str(secret_id)
            self._secrets.add(self._secret_id)
        return self._secret_id

    def _load_token_file(self, force: bool = False) -> None:
        path = self.settings.token_file
        if path is None:
            raise UsageError('auth = "token_file" needs token_file')
        try:
            st = os.stat(path)
        except OSError as exc:
            raise UsageError(f"Vault token_file {path} cannot be read: {exc.strerror}") from None
        sig = (st.st_ino, st.st_mtime_ns, st.st_size)
        if not force and sig == self._token_sig and self._token:
            return
        token = read_secret_file(path, "token_file")
        self._secrets.add(token)
        try:
            resp = self._raw("GET", "auth/token/lookup-self", token=token)
        except PermissionDenied as exc:
            raise VaultAuthError(
                f"the Vault token in {path} is not valid (revoked or expired): is Vault Agent running?"
            ) from exc
        data = resp.get("data") or {}
        self._token_sig = sig
        self._set_token(token, float(data.get("ttl") or 0), bool(data.get("renewable")))
        self._login_ttl = self._ttl
        log.info("using the Vault token from %s (TTL %.0fs)", path, self._ttl)

    def _set_token(self, token: str, ttl: float, renewable: bool) -> None:
        with self._lock:
            self._token = token
            self._ttl = ttl
            self._renewable = renewable
            self._issued_at = self.clock.monotonic()
            self._secrets.add(token)
        self._wake.set()

    def _expired(self) -> bool:
        return self._ttl > 0 and self.clock.monotonic() >= self._issued_at + self._ttl - 1.0

    def _current_token(self) -> str:
        with self._lock:
            if self._static:
                return self._token
            if self.settings.auth == "token_file":
                self._load_token_file()
            if not self._token or self._expired():
                self._login_locked()
            return self._token

    def _token_invalid(self, token: str) -> bool:
        """Whether `token` itself is dead (lookup-self refused), as opposed to a policy denial."""
        try:
            self._raw("GET", "auth/token/lookup-self", token=token)
        except PermissionDenied:
            return True
        except ClawbackError:
            return False
        return False

    def _relogin(self, stale: str) -> str:
        with self._lock:
            if self._token == stale:  # nobody logged in meanwhile
                self._token = ""
                self._login_locked()
            return self._token

    # ---- renewal -----------------------------------------------------------
    def _start_renewal(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._renew_loop, name="vault-renewal", daemon=True
            )
            self._thread.start()

    def _next_renewal(self) -> float:
        with self._lock:
            if not self._token:
                return self.clock.monotonic()
            if self._ttl <= 0:  # a token that never expires: just look at it now and then
                return self.clock.monotonic() + 300.0
            return self._issued_at + self._ttl * self.settings.renew_fraction

    def _renew_loop(self) -> None:
        backoff = self.settings.backoff_initial
        while not self._stop.is_set():
            delay = max(0.0, self._next_renewal() - self.clock.monotonic())
            self._wake.clear()
            self._wake.wait(delay)  # a new token (login elsewhere) or close() recomputes the delay
            if self._stop.is_set():
                return
            if self._next_renewal() > self.clock.monotonic():
                continue
            try:
                self._renew_once()
                backoff = self.settings.backoff_initial
            except ClawbackError as exc:
                wait = min(self.settings.backoff_max, backoff) * random.uniform(0.5, 1.0)
                log.warning("Vault token renewal failed: %s; retrying in %.1fs", exc, wait)
                backoff = min(self.settings.backoff_max, backoff * 2)
                if self._stop.wait(wait):
                    return
            except Exception:  # never let the thread die silently
                log.exception("unexpected error in Vault token renewal")
                if self._stop.wait(self.settings.backoff_max):
                    return

    def _renew_once(self) -> None:
        with self._lock:
            token, renewable = self._token, self._renewable
        if not token:
            self._relogin(stale="")
            return
        if self.settings.auth == "token_file":
            with self._lock:
                self._load_token_file()
                if self._token != token:
                    return  # Vault Agent wrote a fresh one
        if renewable:
            try:
                resp = self._raw("POST", "auth/token/renew-self", {}, token=token)
            except PermissionDenied:
                log.warning("Vault token was revoked; logging in again")
                self._relogin(stale=token)
                return
            auth = resp.get("auth") or {}
            ttl = float(auth.get("lease_duration") or 0)
            with self._lock:
                if self._token == token:
                    self._set_token(token, ttl, bool(auth.get("renewable")))
            # Near the token's max TTL renewal grants less and less: log in again instead.
            if self.settings.auth == "approle" and ttl < self._login_ttl * (
                1 - self.settings.renew_fraction
            ):
                self._relogin(stale=token)
            return
        if self.settings.auth == "approle":
            self._relogin(stale=token)
        else:
            with self._lock:
                self._load_token_file(force=True)

    def token_ttl(self) -> float:
        """Seconds left on the current token (0 if none or non-expiring), by the injected clock."""
        with self._lock:
            if not self._token or self._ttl <= 0:
                return 0.0
            return max(0.0, self._issued_at + self._ttl - self.clock.monotonic())

    def lookup_self(self) -> dict[str, Any]:
        """The current token's metadata (policies, ttl, ...): `auth/token/lookup-self`."""
        data: dict[str, Any] = self.request("GET", "auth/token/lookup-self").get("data") or {}
        return data

    # ---- transit -----------------------------------------------------------
    def datakey(self, mount: str, key: str) -> tuple[bytes, str]:
        """A fresh 32-byte data key and its transit-wrapped form (`vault:vN:...`)."""
        resp = self.request("POST", f"{mount}/datakey/plaintext/{key}", {"bits": 256})
        data = resp.get("data") or {}
        try:
            plaintext = base64.b64decode(data["plaintext"], validate=True)
            ciphertext = str(data["ciphertext"])
        except (KeyError, ValueError, TypeError) as exc:
            raise KeyMaterialError(
                f"Vault returned a malformed data key from {mount}/datakey"
            ) from exc
        if len(plaintext) != 32:
            raise KeyMaterialError(f"Vault returned a {len(plaintext)}-byte data key, not 32")
        return plaintext, ciphertext

    def decrypt_datakey(self, mount: str, key: str, ciphertext: str) -> bytes:
        """The plaintext of a wrapped data key; KeyMaterialError if Vault cannot decrypt it."""
        resp = self.request(
            "POST", f"{mount}/decrypt/{key}", {"ciphertext": ciphertext}, invalid=KeyMaterialError
        )
        try:
            return base64.b64decode((resp.get("data") or {})["plaintext"], validate=True)
        except (KeyError, ValueError, TypeError) as exc:
            raise KeyMaterialError(
                f"Vault returned a malformed plaintext from {mount}/decrypt"
            ) from exc

    def rewrap(self, mount: str, key: str, ciphertext: str) -> str:
        """`ciphertext` re-encrypted under the key's latest version (the plaintext never leaves Vault)."""
        resp = self.request(
            "POST", f"{mount}/rewrap/{key}", {"ciphertext": ciphertext}, invalid=KeyMaterialError
        )
        return str((resp.get("data") or {})["ciphertext"])

    def rotate(self, mount: str, key: str) -> None:
        self.request("POST", f"{mount}/keys/{key}/rotate", {})

    def set_min_decryption_version(self, mount: str, key: str, version: int) -> None:
        self.request("POST", f"{mount}/keys/{key}/config", {"min_decryption_version": int(version)})

    def key_info(self, mount: str, key: str) -> dict[str, Any]:
        """The transit key's metadata: type, latest_version, min_decryption_version, keys (no material)."""
        data: dict[str, Any] = self.request("GET", f"{mount}/keys/{key}").get("data") or {}
        return data

    # ---- KV v2 -------------------------------------------------------------
    def read_kv(self, mount: str, path: str) -> dict[str, Any]:
        """The current version of a KV v2 secret; NotFound if absent or deleted."""
        resp = self.request("GET", f"{mount}/data/{path}")
        data = (resp.get("data") or {}).get("data")
        if not isinstance(data, dict):
            raise NotFound(f"Vault has nothing at {mount}/data/{path} (deleted)")
        return data

    # ---- PKI ---------------------------------------------------------------
    def sign_csr(
        self,
        mount: str,
        role: str,
        csr_pem: str,
        common_name: str,
        ttl: str = "24h",
        *,
        alt_names: Sequence[str] = (),
        ip_sans: Sequence[str] = (),
    ) -> tuple[str, str]:
        """Vault PKI signs a CSR (the private key never leaves the node): (cert_pem, ca_chain_pem).

        SANs are sent only when given: an agent's policy allows common_name, csr and ttl only.
        """
        body: dict[str, Any] = {"csr": csr_pem, "common_name": common_name, "ttl": ttl}
        if alt_names:
            body["alt_names"] = ",".join(alt_names)
        if ip_sans:
            body["ip_sans"] = ",".join(ip_sans)
        resp = self.request("POST", f"{mount}/sign/{role}", body)
        data = resp.get("data") or {}
        chain = data.get("ca_chain") or [data.get("issuing_ca", "")]
        return str(data["certificate"]), "\n".join(c.strip() for c in chain if c) + "\n"

    # ---- restore grants ----------------------------------------------------
    def mint_restore_grant(self, ttl: str = "15m", uses: int = 16, wrap_ttl: str = "5m") -> str:
        """A single-use wrapping token around a short-lived token of the restore-grant role."""
        if uses < 1:
            raise UsageError("a restore grant needs at least one use")
        resp = self.request(
            "POST",
            f"auth/token/create/{self.settings.grant_role}",
            {"ttl": ttl, "num_uses": uses, "renewable": False},
            wrap_ttl=wrap_ttl,
        )
        token = (resp.get("wrap_info") or {}).get("token")
        if not token:
            raise ClawbackError("Vault did not wrap the restore grant (is wrapping allowed?)")
        return str(token)

    def unwrap_grant(self, wrapping_token: str) -> str:
        """The grant token inside `wrapping_token`; PermissionDenied if someone unwrapped it first."""
        self._secrets.add(wrapping_token)
        try:
            info = self._raw(
                "POST",
                "sys/wrapping/lookup",
                {"token": wrapping_token},
                token=None,
                invalid=PermissionDenied,
            )
            creation_path = str((info.get("data") or {}).get("creation_path", ""))
            expected = f"auth/token/create/{self.settings.grant_role}"
            if creation_path != expected:
                raise PermissionDenied(
                    f"the token given as a restore grant was not made by {expected}: refusing it"
                )
            resp = self._raw(
                "POST", "sys/wrapping/unwrap", None, token=wrapping_token, invalid=PermissionDenied
            )
        except (PermissionDenied, NotFound) as exc:
            if "was not made by" in str(exc):
                raise
            raise PermissionDenied(GRANT_REFUSED) from exc
        token = (resp.get("auth") or {}).get("client_token")
        if not token:
            raise PermissionDenied(GRANT_REFUSED)
        self._secrets.add(str(token))
        return str(token)

    # ---- lifecycle ---------------------------------------------------------
    def revoke_self(self) -> None:
        """Revoke the current token (on shutdown); a later call logs in again."""
        with self._lock:
            token = self._token
        if not token:
            return
        try:
            self._raw("POST", "auth/token/revoke-self", {}, token=token)
        finally:
            with self._lock:
                if self._token == token and not self._static:
                    self._token = ""

    def close(self) -> None:
        """Stop the renewal thread and close the HTTP sessions (the token is left to expire)."""
        self._stop.set()
        self._wake.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=5)
        self._thread = None
        with self._lock:
            adapters, self._adapters = self._adapters, []
        for a in adapters:
            a.close()
        self._local = threading.local()

    def __enter__(self) -> VaultClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _reason(exc: BaseException) -> str:
    """A short reason for a connection error, without URLs full of detail."""
    text = str(exc)
    for marker in ("Connection refused", "Name or service not known", "timed out", "reset by peer"):
        if marker in text:
            return marker.lower()
    return type(exc).__name__
