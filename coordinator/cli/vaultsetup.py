"""Vault set up as code for clawback, and key rotation: the library behind `clawback vault setup` and `clawback keys rotate`.

`setup_vault` is idempotent: it enables transit, KV v2, PKI and AppRole,
creates the transit key, writes the chunk-id key only if it is absent (never
overwritten, never rotated), creates a PKI root CA if there is none plus the
agent/coordinator/admin roles, writes the policies of deploy/vault/policies
(+ one generated PKI policy per agent), the restore-grant token role and the
AppRoles, and reports each item as created, updated or present. With an
output directory it writes each role's role_id and a response-wrapped
secret_id (0600) to `<out>/<role>/`.

`rewrap_all` re-encrypts stored wrapped keys under the transit key's latest
version (the plaintext never leaves Vault), after which min_decryption_version
can be raised.
"""

from __future__ import annotations

import base64
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import KeyMaterialError, NotFound, UsageError
from core.vault import VaultClient, VaultSettings
from protos.clawback.v1 import common_pb2

POLICY_DIR = Path(__file__).resolve().parents[2] / "deploy" / "vault" / "policies"
POLICIES = ("agent", "coordinator", "restore", "operator", "restore-grant")
PKI_ROLES = ("agent", "coordinator", "admin")
PROVIDER = "vault-transit"
CA_TTL = "87600h"
_AGENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_DURATION = re.compile(r"^(\d+)([smhd]?)$")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class SetupItem:
    kind: str  # mount, auth, transit-key, kv-secret, pki-ca, pki-role, policy, token-role, approle, file
    name: str
    status: str  # created | updated | present | issued


@dataclass(frozen=True)
class RoleFiles:
    role: str  # "agent-node1", "coordinator", "restore"
    approle: str  # "clawback-agent-node1"
    role_id_file: Path
    secret_id_file: Path


@dataclass
class SetupResult:
    items: list[SetupItem] = field(default_factory=list)
    files: dict[str, RoleFiles] = field(default_factory=dict)
    ca_pem: str = ""
    ca_file: Path | None = None

    def add(self, kind: str, name: str, status: str) -> None:
        self.items.append(SetupItem(kind, name, status))

    def status(self, kind: str, name: str) -> str:
        for item in self.items:
            if item.kind == kind and item.name == name:
                return item.status
        raise KeyError((kind, name))

    def to_json(self) -> dict[str, Any]:
        return {
            "items": [{"kind": i.kind, "name": i.name, "status": i.status} for i in self.items],
            "roles": {
                r: {
                    "approle": f.approle,
                    "role_id_file": str(f.role_id_file),
                    "secret_id_file": str(f.secret_id_file),
                }
                for r, f in self.files.items()
            },
            "ca_file": None if self.ca_file is None else str(self.ca_file),
        }


def approle_name(role: str) -> str:
    """ "agent-node1" -> "clawback-agent-node1"."""
    return f"clawback-{role}"


def policy_name(policy: str) -> str:
    return f"clawback-{policy}"


def agent_pki_policy_name(agent: str) -> str:
    return f"clawback-agent-pki-{agent}"


def render_policy(text: str, s: VaultSettings) -> str:
    """A policy file written for the default names, with the configured mount/key names put in."""
    subs = {
        "clawback-transit": s.transit_mount,
        "clawback-kv": s.kv_mount,
        "clawback-pki": s.pki_mount,
        "clawback-data": s.transit_key,
        "id-key": s.id_key_path,
        "clawback-restore-grant": s.grant_role,
    }

    def path_line(m: re.Match[str]) -> str:
        p = m.group(1)
        for default, name in subs.items():
            p = re.sub(rf"(?<![\w-]){re.escape(default)}(?![\w-])", name, p)
        p = re.sub(r"^(auth|sys/auth)/approle(?=/|$)", rf"\1/{s.approle_mount}", p)
        return f'path "{p}"'

    return re.sub(r'path "([^"]+)"', path_line, text)


def agent_pki_policy(agent: str, s: VaultSettings) -> str:
    """The per-agent policy: PKI signing with the agent role for CN = its own name only."""
    return (
        f"# {agent_pki_policy_name(agent)}: agent {agent} may get certificates for its own name only.\n"
        f'path "{s.pki_mount}/sign/agent" {{\n'
        '  capabilities = ["update"]\n'
        f'  allowed_parameters = {{\n    "common_name" = ["{agent}"]\n'
        '    "csr" = []\n    "ttl" = []\n  }\n}\n'
    )


def seconds(value: Any) -> Any:
    """Normalise a Vault duration ("24h", "90m", 3600) to seconds for comparisons."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return int(m.group(1)) * _UNIT[m.group(2)]
    return value


def _same(current: Any, desired: Any) -> bool:
    if isinstance(desired, (list, tuple)):
        cur = current if isinstance(current, list) else ([] if current in (None, "") else [current])
        return sorted(map(str, cur)) == sorted(map(str, desired))
    if isinstance(current, list) and not isinstance(desired, list):
        return [str(c) for c in current] == [str(desired)]
    return bool(seconds(current) == seconds(desired))


def _read(client: VaultClient, path: str) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = client.request("GET", path).get("data") or {}
        return data
    except NotFound:
        return None


def _ensure(
    client: VaultClient,
    result: SetupResult,
    kind: str,
    name: str,
    path: str,
    desired: dict[str, Any],
) -> None:
    """Write `desired` at `path` unless what is there already matches it."""
    current = _read(client, path)
    if current is None:
        client.request("POST", path, desired)
        result.add(kind, name, "created")
    elif all(_same(current.get(k), v) for k, v in desired.items()):
        result.add(kind, name, "present")
    else:
        client.request("POST", path, desired)
        result.add(kind, name, "updated")


def _write_private(path: Path, text: str) -> None:
    """Atomically write a 0600 file."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def issue_secret_id(
    client: VaultClient, s: VaultSettings, approle: str, path: Path, wrap_ttl: str | None = "24h"
) -> None:
    """A new secret_id for `approle`, response-wrapped (unless wrap_ttl is None), written to `path` (0600)."""
    resp = client.request(
        "POST", f"auth/{s.approle_mount}/role/{approle}/secret-id", {}, wrap_ttl=wrap_ttl
    )
    if wrap_ttl:
        value = (resp.get("wrap_info") or {}).get("token")
    else:
        value = (resp.get("data") or {}).get("secret_id")
    if not value:
        raise UsageError(f"Vault issued no secret_id for {approle}")
    _write_private(path, str(value))


def _mounts(client: VaultClient, result: SetupResult, s: VaultSettings) -> None:
    resp = client.request("GET", "sys/mounts")
    mounts = resp.get("data") or resp
    wanted: list[tuple[str, dict[str, Any]]] = [
        (s.transit_mount, {"type": "transit", "description": "clawback data keys"}),
        (
            s.kv_mount,
            {"type": "kv", "options": {"version": "2"}, "description": "clawback chunk-id key"},
        ),
        (
            s.pki_mount,
            {
                "type": "pki",
                "description": "clawback certificates",
                "config": {"max_lease_ttl": CA_TTL},
            },
        ),
    ]
    for path, body in wanted:
        cur = mounts.get(f"{path}/")
        if cur is None:
            client.request("POST", f"sys/mounts/{path}", body)
            result.add("mount", path, "created")
            continue
        if cur.get("type") != body["type"]:
            raise UsageError(
                f"Vault already has a {cur.get('type')} mount at {path}/, not {body['type']}: "
                "choose another mount name in [vault]"
            )
        if body["type"] == "kv" and str((cur.get("options") or {}).get("version")) != "2":
            raise UsageError(f"Vault's KV mount at {path}/ is version 1; clawback needs KV v2")
        result.add("mount", path, "present")
    auths = client.request("GET", "sys/auth")
    auths = auths.get("data") or auths
    cur = auths.get(f"{s.approle_mount}/")
    if cur is None:
        client.request("POST", f"sys/auth/{s.approle_mount}", {"type": "approle"})
        result.add("auth", s.approle_mount, "created")
    elif cur.get("type") != "approle":
        raise UsageError(f"Vault's auth mount {s.approle_mount}/ is {cur.get('type')}, not approle")
    else:
        result.add("auth", s.approle_mount, "present")


def _keys(client: VaultClient, result: SetupResult, s: VaultSettings) -> None:
    key = _read(client, f"{s.transit_mount}/keys/{s.transit_key}")
    if key is None:
        client.request("POST", f"{s.transit_mount}/keys/{s.transit_key}", {"type": "aes256-gcm96"})
        result.add("transit-key", s.transit_key, "created")
    elif key.get("type") != "aes256-gcm96":
        raise UsageError(
            f"transit key {s.transit_mount}/{s.transit_key} is {key.get('type')}, not aes256-gcm96"
        )
    else:
        result.add("transit-key", s.transit_key, "present")
    # The chunk-id key is written once and never rotated (design.md §Keys): ids
    # depend on it, so a new one would stop deduplication against every stored blob.
    name = f"{s.kv_mount}/{s.id_key_path}"
    if _read(client, f"{s.kv_mount}/metadata/{s.id_key_path}") is not None:
        result.add("kv-secret", name, "present")
        return
    try:
        client.request(
            "POST",
            f"{s.kv_mount}/data/{s.id_key_path}",
            {
                "options": {"cas": 0},
                "data": {s.id_key_field: base64.b64encode(os.urandom(32)).decode()},
            },
        )
    except UsageError as exc:  # check-and-set lost a race: someone else wrote it first
        if "check-and-set" not in str(exc):
            raise
        result.add("kv-secret", name, "present")
        return
    result.add("kv-secret", name, "created")


def _pki(client: VaultClient, result: SetupResult, s: VaultSettings, cert_ttl: str) -> None:
    try:
        issuers = (client.request("LIST", f"{s.pki_mount}/issuers").get("data") or {}).get("keys")
    except NotFound:
        issuers = None
    ca = _read(client, f"{s.pki_mount}/cert/ca") if issuers else None
    if ca and ca.get("certificate"):
        result.ca_pem = str(ca["certificate"])
        result.add("pki-ca", s.pki_mount, "present")
    else:
        resp = client.request(
            "POST",
            f"{s.pki_mount}/root/generate/internal",
            {
                "common_name": "clawback Vault CA",
                "organization": "clawback",
                "ttl": CA_TTL,
                "key_type": "ec",
                "key_bits": 256,
            },
        )
        result.ca_pem = str((resp.get("data") or {})["certificate"])
        result.add("pki-ca", s.pki_mount, "created")
    for role in PKI_ROLES:
        _ensure(
            client,
            result,
            "pki-role",
            role,
            f"{s.pki_mount}/roles/{role}",
            {
                "allow_any_name": True,
                "enforce_hostnames": False,
                "allow_ip_sans": role == "coordinator",
                "use_csr_common_name": False,
                "use_csr_sans": role == "coordinator",  # its host names and IPs
                "server_flag": role == "coordinator",
                "client_flag": True,
                "ou": [role],
                "organization": ["clawback"],
                "key_type": "any",
                "ttl": cert_ttl,
                "max_ttl": cert_ttl,
                "no_store": True,  # short-lived certificates: expiry, not a CRL
            },
        )


def _policies(
    client: VaultClient,
    result: SetupResult,
    s: VaultSettings,
    agents: Sequence[str],
    policy_dir: Path,
) -> None:
    texts: dict[str, str] = {}
    for p in POLICIES:
        f = policy_dir / f"{p}.hcl"
        try:
            texts[policy_name(p)] = render_policy(f.read_text(encoding="utf-8"), s)
        except OSError as exc:
            raise UsageError(f"cannot read the Vault policy {f}: {exc.strerror}") from None
    for agent in agents:
        texts[agent_pki_policy_name(agent)] = agent_pki_policy(agent, s)
    for name, text in texts.items():
        cur = _read(client, f"sys/policies/acl/{name}")
        if cur is None:
            status = "created"
        elif str(cur.get("policy", "")).strip() == text.strip():
            result.add("policy", name, "present")
            continue
        else:
            status = "updated"
        client.request("POST", f"sys/policies/acl/{name}", {"policy": text})
        result.add("policy", name, status)


def setup_vault(
    client: VaultClient,
    settings: VaultSettings,
    agents: Sequence[str],
    out_dir: str | os.PathLike[str] | None = None,
    *,
    cert_ttl: str = "24h",
    token_ttl: str = "1h",
    token_max_ttl: str = "24h",
    grant_max_ttl: str = "1h",
    secret_id_wrap_ttl: str = "24h",
    policy_dir: Path = POLICY_DIR,
) -> SetupResult:
    """Idempotently set up Vault for clawback with an operator (or root) token; see the module docstring."""
    s = settings
    for a in agents:
        if not _AGENT_NAME.match(a):
            raise UsageError(f"agent name {a!r}: letters, digits, '.', '_' and '-' only (max 63)")
    result = SetupResult()
    _mounts(client, result, s)
    _keys(client, result, s)
    _pki(client, result, s, cert_ttl)
    _policies(client, result, s, agents, policy_dir)
    _ensure(
        client,
        result,
        "token-role",
        s.grant_role,
        f"auth/token/roles/{s.grant_role}",
        {
            "allowed_policies": [policy_name("restore-grant")],
            "orphan": True,
            "renewable": False,
            "token_explicit_max_ttl": grant_max_ttl,
            "token_no_default_policy": True,
            "token_type": "service",
        },
    )
    roles: dict[str, list[str]] = {
        f"agent-{a}": [policy_name("agent"), agent_pki_policy_name(a)] for a in agents
    }
    roles["coordinator"] = [policy_name("coordinator")]
    roles["restore"] = [policy_name("restore")]
    for role, policies in roles.items():
        _ensure(
            client,
            result,
            "approle",
            approle_name(role),
            f"auth/{s.approle_mount}/role/{approle_name(role)}",
            {
                "token_policies": policies,
                "token_ttl": token_ttl,
                "token_max_ttl": token_max_ttl,
                "token_type": "service",
                "bind_secret_id": True,
                # A secret_id serves re-logins for the life of the process that unwrapped it.
                "secret_id_num_uses": 0,
            },
        )
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True, mode=0o700)
        result.ca_file = out / "vault-ca.pem"
        if (
            not result.ca_file.exists()
            or result.ca_file.read_text().strip() != result.ca_pem.strip()
        ):
            result.ca_file.write_text(result.ca_pem.strip() + "\n")
            result.add("file", str(result.ca_file), "created")
        else:
            result.add("file", str(result.ca_file), "present")
        for role in roles:
            approle = approle_name(role)
            role_id = str(
                (
                    client.request("GET", f"auth/{s.approle_mount}/role/{approle}/role-id").get(
                        "data"
                    )
                    or {}
                )["role_id"]
            )
            rid, sid = out / role / "role_id", out / role / "secret_id"
            if rid.exists() and rid.read_text().strip() == role_id:
                result.add("file", str(rid), "present")
            else:
                _write_private(rid, role_id)
                result.add("file", str(rid), "created")
            issue_secret_id(client, s, approle, sid, wrap_ttl=secret_id_wrap_ttl)
            result.add("file", str(sid), "issued")
            result.files[role] = RoleFiles(role, approle, rid, sid)
    return result


# ---- rotation -----------------------------------------------------------------


def wrapped_version(wrapped: bytes) -> int:
    """The transit key version a wrapped key was made with ("vault:v3:..." -> 3)."""
    m = re.match(rb"^vault:v(\d+):", wrapped)
    if not m:
        raise KeyMaterialError("not a Vault transit wrapped key (expected vault:vN:...)")
    return int(m.group(1))


def rewrap_all(
    client: VaultClient, settings: VaultSettings, wrapped_keys: Iterable[common_pb2.WrappedKey]
) -> list[common_pb2.WrappedKey]:
    """Every vault-transit wrapped key re-encrypted under the latest key version (others skipped)."""
    out = []
    for wk in wrapped_keys:
        if wk.provider != PROVIDER:
            continue
        try:
            ciphertext = bytes(wk.wrapped).decode("ascii")
        except UnicodeDecodeError:
            raise KeyMaterialError(
                f"wrapped key {bytes(wk.key_id).hex()} is not a transit ciphertext"
            ) from None
        new = client.rewrap(settings.transit_mount, settings.transit_key, ciphertext)
        out.append(
            common_pb2.WrappedKey(key_id=wk.key_id, wrapped=new.encode("ascii"), provider=PROVIDER)
        )
    return out


@dataclass(frozen=True)
class RotateReport:
    old_version: int
    new_version: int
    rewrapped: int
    min_decryption_version: int


def rotate_and_rewrap(
    client: VaultClient,
    settings: VaultSettings,
    list_keys: Callable[[], Iterable[common_pb2.WrappedKey]],
    put_keys: Callable[[list[common_pb2.WrappedKey]], object],
    *,
    rotate: bool = True,
    raise_min: bool = False,
) -> RotateReport:
    """Rotate the transit key, rewrap every stored wrapped key, store them, optionally raise min_decryption_version.

    Safe to re-run after a failure: rewrapping is idempotent, and the minimum is
    raised only once every stored key is at the latest version.
    """
    m, k = settings.transit_mount, settings.transit_key
    old = int(client.key_info(m, k).get("latest_version", 0))
    if rotate:
        client.rotate(m, k)
    info = client.key_info(m, k)
    latest = int(info.get("latest_version", 0))
    rewrapped = rewrap_all(client, settings, list_keys())
    if rewrapped:
        put_keys(rewrapped)
    min_version = int(info.get("min_decryption_version", 1))
    if raise_min:
        stored = [wk for wk in list_keys() if wk.provider == PROVIDER]
        lowest = min((wrapped_version(bytes(wk.wrapped)) for wk in stored), default=latest)
        if lowest < latest:
            raise KeyMaterialError(
                f"a stored key is still wrapped with version {lowest}: not raising "
                "min_decryption_version (were the rewrapped keys stored?)"
            )
        client.set_min_decryption_version(m, k, latest)
        min_version = latest
    return RotateReport(old, latest, len(rewrapped), min_version)


# ---- the operator's own Vault session ----------------------------------------


def operator_token(env: dict[str, str] | None = None, home: Path | None = None) -> str:
    """The operator's Vault token: $VAULT_TOKEN (or $BAO_TOKEN), else ~/.vault-token; never argv."""
    environ = os.environ if env is None else env
    for var in ("VAULT_TOKEN", "BAO_TOKEN"):
        if environ.get(var, "").strip():
            return environ[var].strip()
    path = (home or Path.home()) / ".vault-token"
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError:
        token = ""
    if not token:
        raise UsageError(
            f"no Vault token: set VAULT_TOKEN or log in with `bao login` (which writes {path})"
        )
    return token


def operator_settings(
    address: str | None = None,
    ca_file: str | os.PathLike[str] | None = None,
    env: dict[str, str] | None = None,
) -> VaultSettings:
    """Settings for the operator's CLI: --vault-addr, else $VAULT_ADDR/$BAO_ADDR, else the local default."""
    environ = os.environ if env is None else env
    addr = address or environ.get("VAULT_ADDR") or environ.get("BAO_ADDR") or VaultSettings.address
    ca = ca_file or environ.get("VAULT_CACERT") or environ.get("BAO_CACERT") or None
    if not addr.startswith(("http://", "https://")):
        raise UsageError(f"Vault address must start with https:// or http://, not {addr!r}")
    return VaultSettings(
        address=addr.rstrip("/"), ca_file=Path(ca) if ca else None, auth="token_file"
    )
