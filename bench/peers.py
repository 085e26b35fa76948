"""The peers clawback is measured against: restic (Debian's `restic`) and Borg (PyPI's `borgbackup`).

Both implement `bench.run.Tool`. Secrets never appear on a command line: each
repository gets a random passphrase in a 0600 file inside the tool's work
directory, handed over through the environment (`RESTIC_PASSWORD_FILE`,
`BORG_PASSCOMMAND=cat <file>`). Settings follow each tool's own best default
for this job: restic repository format 2 (`--compression auto`, zstd); Borg
`repokey-blake2` with `--compression zstd,3`.

`ensure_peers()` installs what is missing (restic via apt-get, borgbackup into
this virtualenv via pip after its build dependencies), when run as root; `make
bench-deps` calls it through `python -m bench.peers --install`.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.run import ToolError, disk_usage

#: Debian packages borgbackup needs to build from source.
BORG_BUILD_PACKAGES = (
    "pkg-config",
    "build-essential",
    "libssl-dev",
    "libacl1-dev",
    "liblz4-dev",
    "libzstd-dev",
    "libxxhash-dev",
    "libfuse3-dev",
    "python3-dev",
)
#: Borg 1.4 (stable); 2.0 is a different repository format and CLI.
BORG_REQUIREMENT = "borgbackup>=1.4,<1.5"
RESTIC_PACKAGE = "restic"

#: Environment variables that could point a peer at another repository or secret: never inherited.
_SCRUBBED = (
    "RESTIC_REPOSITORY",
    "RESTIC_REPOSITORY_FILE",
    "RESTIC_PASSWORD",
    "RESTIC_PASSWORD_COMMAND",
    "RESTIC_PASSWORD_FILE",
    "RESTIC_CACHE_DIR",
    "BORG_REPO",
    "BORG_PASSPHRASE",
    "BORG_PASSCOMMAND",
    "BORG_PASSPHRASE_FD",
    "BORG_BASE_DIR",
    "BORG_KEYS_DIR",
    "BORG_CACHE_DIR",
    "BORG_CONFIG_DIR",
    "BORG_SECURITY_DIR",
    "BORG_RSH",
)


def restic_binary() -> str | None:
    return shutil.which("restic")


def borg_binary() -> str | None:
    """Borg in this virtualenv (where `make bench-deps` installs it), else on PATH."""
    own = Path(sys.executable).parent / "borg"
    if own.exists():
        return str(own)
    return shutil.which("borg")


def _version(argv: Sequence[str]) -> str | None:
    try:
        out = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else ""


def peer_versions() -> dict[str, str | None]:
    """name -> the version line of each installed peer, None when missing or broken."""
    restic, borg = restic_binary(), borg_binary()
    return {
        "restic": _version([restic, "version"]) if restic else None,
        "borg": _version([borg, "--version"]) if borg else None,
    }


def _run_install(argv: list[str], log: Callable[[str], None]) -> None:
    log("+ " + " ".join(argv))
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    done = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip()[-1500:]
        raise RuntimeError(f"`{' '.join(argv)}` exited {done.returncode}: {tail}")


def ensure_peers(
    tools: Sequence[str] = ("restic", "borg"),
    install: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, str]:
    """Make the peers in `tools` available; return name -> why it is not (empty when all are).

    Installs only what is missing, and only as root: restic with `apt-get update`
    then `apt-get install restic`; Borg with apt-get for its build dependencies
    then `pip install borgbackup` into this interpreter's environment.
    """
    wanted = [t for t in tools if t in ("restic", "borg")]
    versions = peer_versions()
    missing = [t for t in wanted if not versions[t]]
    problems: dict[str, str] = {}
    if not missing:
        return problems
    if not install:
        return {t: f"{t} is not installed: run `make bench-deps`" for t in missing}
    if os.geteuid() != 0:
        return {
            t: f"{t} is not installed and installing it needs root: run `make bench-deps` as root"
            for t in missing
        }
    apt = ["apt-get", "install", "-y", "--no-install-recommends"]
    try:
        _run_install(["apt-get", "update", "-q"], log)
    except RuntimeError as exc:
        return {t: f"{t}: cannot install: {exc}" for t in missing}
    if "restic" in missing:
        try:
            _run_install([*apt, RESTIC_PACKAGE], log)
        except RuntimeError as exc:
            problems["restic"] = f"restic: cannot install: {exc}"
    if "borg" in missing:
        try:
            _run_install([*apt, *BORG_BUILD_PACKAGES], log)
            _run_install([sys.executable, "-m", "pip", "install", "-q", BORG_REQUIREMENT], log)
        except RuntimeError as exc:
            problems["borg"] = f"borg: cannot install: {exc}"
    versions = peer_versions()
    for t in missing:
        if t not in problems and not versions[t]:
            problems[t] = f"{t}: installed but `{t} --version` does not run"
    return problems


# --------------------------------------------------------------------------- helpers


def _write_secret(path: Path) -> None:
    """A fresh random passphrase in a new file, 0600 from its creation."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32) + "\n")


def _clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
    env.update(extra)
    return env


def _check(done: subprocess.CompletedProcess[str], argv: Sequence[str]) -> str:
    if done.returncode != 0:
        detail = (done.stderr or done.stdout or "").strip()
        raise ToolError(f"{' '.join(argv)} exited {done.returncode}: {detail[-2000:]}")
    return done.stdout


class _CliTool:
    """A peer driven through its command line: no daemons, so every process is a 'cli' process."""

    name = "peer"
    timeout = 6 * 3600.0

    def __init__(self) -> None:
        self.workdir: Path | None = None
        self.source: Path | None = None
        self.env: dict[str, str] = {}
        self.snapshots: list[str] = []

    def _run(self, argv: list[str], cwd: Path | None = None) -> str:
        done = subprocess.run(
            argv,
            env=self.env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=self.timeout,
            stdin=subprocess.DEVNULL,
        )
        return _check(done, argv)

    def processes(self) -> dict[str, int]:
        return {}

    def stop(self) -> None:  # nothing runs between commands
        return None

    def restored_path(self, target: Path) -> Path:
        """Where in `target` the source tree appears after `restore` (both peers keep the absolute path)."""
        assert self.source is not None
        return target / self.source.resolve().relative_to("/")


class ResticTool(_CliTool):
    """restic on a local repository, format 2 (zstd, `--compression auto`)."""

    name = "restic"

    def __init__(self) -> None:
        super().__init__()
        self.binary = restic_binary() or "restic"

    def start(self, workdir: Path, source: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir, self.source = workdir, source.resolve()
        password = workdir / "password"
        _write_secret(password)
        self.env = _clean_env(
            {
                "RESTIC_REPOSITORY": str(workdir / "repo"),
                "RESTIC_PASSWORD_FILE": str(password),
                "RESTIC_CACHE_DIR": str(workdir / "cache"),
            }
        )
        self._run(self.init_argv())

    def init_argv(self) -> list[str]:
        return [self.binary, "init", "--repository-version", "2"]

    def backup_argv(self) -> list[str]:
        assert self.source is not None
        # The same absolute path every time: restic finds the parent snapshot by host + paths.
        return [self.binary, "backup", "--json", "--compression", "auto", str(self.source)]

    def restore_argv(self, snapshot: str, target: Path) -> list[str]:
        return [self.binary, "restore", snapshot, "--target", str(target)]

    def backup(self) -> str:
        out = self._run(self.backup_argv())
        sid = None
        for line in out.splitlines():
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(msg, dict) and msg.get("message_type") == "summary":
                sid = msg.get("snapshot_id")
        if not sid:
            raise ToolError(f"restic backup printed no summary: {out.strip()[-500:]}")
        self.snapshots.append(str(sid))
        return str(sid)

    def restore(self, snapshot: str, target: Path) -> None:
        self._run(self.restore_argv(snapshot, target))

    def size(self) -> int:
        return disk_usage(self.repository())

    def repository(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "repo"


class BorgTool(_CliTool):
    """Borg 1.4 on a local repository: `repokey-blake2`, `--compression zstd,3`."""

    name = "borg"

    def __init__(self) -> None:
        super().__init__()
        self.binary = borg_binary() or "borg"
        self.count = 0

    @property
    def repo(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "repo"

    def start(self, workdir: Path, source: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir, self.source = workdir, source.resolve()
        password = workdir / "password"
        _write_secret(password)
        self.env = _clean_env(
            {
                # The command is run by borg itself; the passphrase never leaves the file and its pipe.
                "BORG_PASSCOMMAND": f"cat {password}",
                # Keys, cache and security state inside the work dir: a fresh repository, a cold
                # chunk cache, nothing shared with the host's ~/.config/borg or other runs.
                "BORG_BASE_DIR": str(workdir / "base"),
                "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "no",
                "BORG_RELOCATED_REPO_ACCESS_IS_OK": "no",
            }
        )
        self._run(self.init_argv())

    def init_argv(self) -> list[str]:
        return [self.binary, "init", "--encryption", "repokey-blake2", str(self.repo)]

    def backup_argv(self, name: str) -> list[str]:
        assert self.source is not None
        return [
            self.binary,
            "create",
            "--compression",
            "zstd,3",
            f"{self.repo}::{name}",
            str(self.source),
        ]

    def restore_argv(self, snapshot: str) -> list[str]:
        return [self.binary, "extract", f"{self.repo}::{snapshot}"]

    def backup(self) -> str:
        self.count += 1
        name = f"bench-{self.count}"
        self._run(self.backup_argv(name))
        self.snapshots.append(name)
        return name

    def restore(self, snapshot: str, target: Path) -> None:
        target.mkdir()
        # extract writes into the current directory, paths relative (no leading slash).
        self._run(self.restore_argv(snapshot), cwd=target)

    def size(self) -> int:
        return disk_usage(self.repo)

    def repository(self) -> Path:
        return self.repo


PEERS: dict[str, type[_CliTool]] = {"restic": ResticTool, "borg": BorgTool}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.peers", description="Check (and install) the benchmark's peers."
    )
    parser.add_argument(
        "--install", action="store_true", help="install missing peers (root: apt-get, pip)"
    )
    parser.add_argument("tools", nargs="*", metavar="TOOL", help="restic, borg (default: both)")
    args = parser.parse_args(argv)
    args.tools = args.tools or list(PEERS)
    unknown = sorted(set(args.tools) - set(PEERS))
    if unknown:
        parser.error(f"unknown peer(s) {', '.join(unknown)}: choose from {', '.join(PEERS)}")
    problems = ensure_peers(args.tools, install=args.install)
    for name, version in peer_versions().items():
        if name in args.tools:
            print(f"{name}: {version or 'MISSING'}")
    for why in problems.values():
        print(f"error: {why}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
