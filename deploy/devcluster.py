"""A real coordinator and agents as local processes over loopback mTLS: for the demo, the benchmarks and the tests.

Everything lives under one work directory: a development PKI, the key file,
configs, the repository, catalog, agent state and logs. Processes are
stopped by PID; nothing outside the work directory is touched.
"""

from __future__ import annotations

import json as jsonlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from coordinator.cli.certs import create_dev_pki

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml_str(value: str | Path) -> str:
    return jsonlib.dumps(str(value))  # a JSON string literal is a valid TOML basic string


def _command(script: str, module: str) -> list[str]:
    exe = BIN / script
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main())"]


class ClusterError(RuntimeError):
    pass


class DevCluster:
    """A coordinator plus named agents, each agent with named directory sources."""

    def __init__(
        self,
        workdir: Path,
        agents: dict[str, dict[str, Path]],
        *,
        admin: str = "ops",
        log_level: str = "info",
        pack_size_mib: int = 32,
        repo_dir: Path | None = None,
        workers: int = 2,
        vault: bool = False,
        vault_persistent: bool = False,
        vault_certs: bool = False,
        cert_ttl: str = "24h",
        cli_cert_ttl: str = "1h",
    ) -> None:
        self.workdir = Path(workdir)
        self.agents = agents
        self.admin = admin
        self.log_level = log_level
        self.pack_size_mib = pack_size_mib
        self.workers = workers
        self.pki = self.workdir / "pki"
        self.key_file = self.workdir / "keys" / "repo.key"
        self.coord_dir = self.workdir / "coordinator"
        self.repo_dir = repo_dir or self.coord_dir / "repo"
        self.logs = self.workdir / "logs"
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        # With vault=True: an OpenBao dev server set up by `clawback vault setup`; agents log in
        # with AppRole, the CLI with an operator-policy token (in its environment, never argv).
        self.use_vault = vault or vault_certs
        # With vault_certs=True the coordinator, the agents and the CLI take short-lived
        # certificates from Vault PKI (`[tls] source = "vault"`) instead of the file PKI.
        self.vault_certs = vault_certs
        self.cert_ttl = cert_ttl
        self.cli_cert_ttl = cli_cert_ttl
        self.vault_persistent = vault_persistent  # raft storage: survives a restart (outage tests)
        self.vault: Any = None
        self.operator_token = ""

    def _start_vault(self) -> None:
        from coordinator.cli.vaultsetup import policy_name
        from deploy.vaultdev import DevVault

        self.vault = DevVault(
            self.workdir / "vault", tuple(self.agents), persistent=self.vault_persistent
        )
        resp = self.vault.operator_client.request(
            "POST", "auth/token/create", {"policies": [policy_name("operator")], "ttl": "4h"}
        )
        self.operator_token = str(resp["auth"]["client_token"])

    def vault_secret_id(self, name: str) -> Path:
        """Where agent `name` reads its (response-wrapped, single-use) AppRole secret_id."""
        return self.workdir / "vault-secrets" / f"agent-{name}.secret_id"

    def _refresh_secret_id(self, name: str, role: str | None = None) -> None:
        """A fresh wrapped secret_id before each start: a wrapped one logs in once."""
        from coordinator.cli.vaultsetup import approle_name, issue_secret_id

        role = role or f"agent-{name}"
        if self.vault is None or role not in self.vault.setup.files:
            return
        issue_secret_id(
            self.vault.operator_client,
            self.vault.settings,
            approle_name(role),
            self.workdir / "vault-secrets" / f"{role}.secret_id",
            wrap_ttl="10m",
        )

    # ---- configuration -------------------------------------------------
    @property
    def coordinator_config(self) -> Path:
        return self.workdir / "coordinator.toml"

    @property
    def cli_config(self) -> Path:
        return self.workdir / "cli.toml"

    def agent_config(self, name: str) -> Path:
        return self.workdir / f"agent-{name}.toml"

    def write_configs(self) -> None:
        for d in (self.workdir, self.coord_dir, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        if self.use_vault and self.vault is None:
            self._start_vault()
        if not (self.pki / "ca.pem").exists():
            create_dev_pki(
                self.pki, agents=list(self.agents), admins=[self.admin], hosts=[], days=30
            )
        self.coordinator_config.write_text(
            f"""# written by deploy/devcluster.py
[coordinator]
listen = {_toml_str(self.address)}
data_dir = {_toml_str(self.coord_dir)}
heartbeat_interval_s = 2
log_level = {_toml_str(self.log_level)}

[repository]
backend = "local"
path = {_toml_str(self.repo_dir)}
pack_size_mib = {self.pack_size_mib}

[catalog]
kind = "sqlite"
path = {_toml_str(self.coord_dir / "catalog.db")}

{self._coordinator_tls()}
"""
        )
        self.cli_config.write_text(
            f"""[coordinator]
address = {_toml_str(self.address)}

{self._cli_tls()}

{self._cli_keys()}
"""
        )
        for name, sources in self.agents.items():
            self.write_agent_config(name, sources)

    def _vault_table(self, role: str) -> list[str]:
        assert self.vault is not None
        files = self.vault.setup.files.get(role)
        return [
            "[vault]",
            f"address = {_toml_str(self.vault.settings.address)}",
            'auth = "approle"',
            f"role_id_file = {_toml_str(files.role_id_file if files else '/nonexistent')}",
            f"secret_id_file = {_toml_str(self.workdir / 'vault-secrets' / f'{role}.secret_id')}",
            "secret_id_wrapped = true",
        ]

    def _coordinator_tls(self) -> str:
        if not self.vault_certs:
            return "\n".join(
                [
                    "[tls]",
                    f"ca = {_toml_str(self.pki / 'ca.pem')}",
                    f"cert = {_toml_str(self.pki / 'coordinator.pem')}",
                    f"key = {_toml_str(self.pki / 'coordinator.key')}",
                ]
            )
        lines = [
            "[tls]",
            'source = "vault"',
            f"ttl = {_toml_str(self.cert_ttl)}",
            'hosts = ["localhost", "127.0.0.1"]',
            "",
            *self._vault_table("coordinator"),
        ]
        return "\n".join(lines)

    def _cli_tls(self) -> str:
        if not self.vault_certs:
            return "\n".join(
                [
                    "[tls]",
                    f"ca = {_toml_str(self.pki / 'ca.pem')}",
                    f"cert = {_toml_str(self.pki / f'admin-{self.admin}.pem')}",
                    f"key = {_toml_str(self.pki / f'admin-{self.admin}.key')}",
                ]
            )
        return "\n".join(
            [
                "[tls]",
                'source = "vault"',
                f"name = {_toml_str(self.admin)}",
                f"ttl = {_toml_str(self.cli_cert_ttl)}",
            ]
        )

    def _cli_keys(self) -> str:
        if self.use_vault:
            return '[keys]\nprovider = "vault"'
        return f'[keys]\nprovider = "file"\nfile = {_toml_str(self.key_file)}'

    def _agent_keys(self, name: str, key_file: Path | None) -> list[str]:
        vault = [] if self.vault is None else ["", *self._vault_table(f"agent-{name}")]
        if not self.use_vault or key_file is not None or self.vault is None:
            keys = ["[keys]", 'provider = "file"', f"file = {_toml_str(key_file or self.key_file)}"]
            return keys + (vault if self.vault_certs else [])
        return ["[keys]", 'provider = "vault"', *vault]

    def _agent_tls(self, cert: str) -> list[str]:
        if self.vault_certs:
            return ["[tls]", 'source = "vault"', f"ttl = {_toml_str(self.cert_ttl)}"]
        return [
            "[tls]",
            f"ca = {_toml_str(self.pki / 'ca.pem')}",
            f"cert = {_toml_str(self.pki / f'agent-{cert}.pem')}",
            f"key = {_toml_str(self.pki / f'agent-{cert}.key')}",
        ]

    def write_agent_config(
        self,
        name: str,
        sources: dict[str, Path],
        key_file: Path | None = None,
        cert_name: str | None = None,
    ) -> Path:
        cert = cert_name or name
        lines = [
            "[agent]",
            *([f"name = {_toml_str(cert)}"] if self.vault_certs else []),
            f"state_dir = {_toml_str(self.workdir / 'agents' / name)}",
            f"log_level = {_toml_str(self.log_level)}",
            "",
            "[coordinator]",
            f"address = {_toml_str(self.address)}",
            "",
            *self._agent_tls(cert),
            "",
            *self._agent_keys(name, key_file),
            "",
            "[performance]",
            f"workers = {self.workers}",
        ]
        for src, path in sources.items():
            lines += [
                "",
                "[[source]]",
                f"name = {_toml_str(src)}",
                'kind = "volume"',
                f"path = {_toml_str(path)}",
            ]
        p = self.agent_config(name)
        p.write_text("\n".join(lines) + "\n")
        return p

    # ---- processes -----------------------------------------------------
    def _spawn(self, key: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{key}.log", "ab")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        self.procs[key] = proc
        return proc

    def log_tail(self, key: str, lines: int = 30) -> str:
        try:
            return "\n".join(
                (self.logs / f"{key}.log").read_text(errors="replace").splitlines()[-lines:]
            )
        except FileNotFoundError:
            return "(no log)"

    def start_coordinator(self, timeout: float = 30.0) -> None:
        if self.vault_certs:
            self._refresh_secret_id("coordinator", "coordinator")
        log_path = self.logs / "coordinator.log"
        start_size = log_path.stat().st_size if log_path.exists() else 0
        proc = self._spawn(
            "coordinator",
            [
                *_command("clawback-coordinator", "coordinator.main"),
                "--config",
                str(self.coordinator_config),
            ],
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ClusterError(
                    f"coordinator exited with {proc.returncode}:\n{self.log_tail('coordinator')}"
                )
            with open(log_path, "rb") as f:
                f.seek(start_size)
                if b"coordinator listening on" in f.read():
                    return
            time.sleep(0.05)
        raise ClusterError(
            f"coordinator did not start within {timeout}s:\n{self.log_tail('coordinator')}"
        )

    def start_agent(self, name: str, config: Path | None = None) -> subprocess.Popen[bytes]:
        self._refresh_secret_id(name)
        return self._spawn(
            f"agent-{name}",
            [
                *_command("clawback-agent", "agent.main"),
                "--config",
                str(config or self.agent_config(name)),
            ],
        )

    def init_repository(self) -> None:
        self.cli("repo", "init", "--key-file", str(self.key_file))

    def start(self) -> DevCluster:
        self.write_configs()
        self.start_coordinator()
        if not (self.repo_dir / "config").exists():
            self.init_repository()
        for name in self.agents:
            self.start_agent(name)
        self.wait_agents(list(self.agents))
        return self

    def wait_agents(self, names: list[str], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        connected: set[str] = set()
        while time.monotonic() < deadline:
            out = self.cli("agents", json=True, check=False)
            if out.returncode == 0:
                connected = {a["name"] for a in jsonlib.loads(out.stdout) if a.get("connected")}
                if set(names) <= connected:
                    return
            time.sleep(0.2)
        tails = "\n".join(
            f"--- agent-{n}\n{self.log_tail(f'agent-{n}')}" for n in names if n not in connected
        )
        raise ClusterError(
            f"agents {sorted(set(names) - connected)} did not connect within {timeout}s\n{tails}"
        )

    def signal(self, key: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.get(key)
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, sig)

    def stop_process(self, key: str, timeout: float = 15.0) -> int | None:
        proc = self.procs.get(key)
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def kill_coordinator(self) -> None:
        proc = self.procs.get("coordinator")
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def stop(self) -> None:
        for key in [k for k in self.procs if k != "coordinator"]:
            self.stop_process(key)
        self.stop_process("coordinator")
        if self.vault is not None:
            self.vault.close()
            self.vault = None

    @property
    def coordinator_pid(self) -> int:
        return self.procs["coordinator"].pid

    @property
    def agent_pids(self) -> dict[str, int]:
        return {
            k.removeprefix("agent-"): p.pid for k, p in self.procs.items() if k.startswith("agent-")
        }

    # ---- the CLI -------------------------------------------------------
    def cli(
        self,
        *args: str,
        json: bool = False,
        check: bool = True,
        timeout: float = 900.0,
        config: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        argv = [
            *_command("clawback", "coordinator.cli.main"),
            "--config",
            str(config or self.cli_config),
        ]
        if json:
            argv.append("--json")
        argv += list(args)
        env = None
        if self.vault is not None:
            env = {
                **os.environ,
                "VAULT_ADDR": self.vault.settings.address,
                "VAULT_TOKEN": self.operator_token,
            }
        out = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, env=env
        )
        if check and out.returncode != 0:
            raise ClusterError(
                f"`clawback {' '.join(args)}` exited {out.returncode}\nstdout:\n{out.stdout}\nstderr:\n{out.stderr}"
            )
        return out

    def cli_json(self, *args: str) -> Any:
        return jsonlib.loads(self.cli(*args, json=True).stdout)

    def __enter__(self) -> DevCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
