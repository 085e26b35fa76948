"""Shared fixtures: real processes, real mounts, real faults. A fixture that cannot start what it needs fails, never skips."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from deploy.devcluster import DevCluster


def _require_root(what: str) -> None:
    if os.geteuid() != 0:
        pytest.fail(
            f"{what} needs root (mounts, chown); run the suite as root as CI does", pytrace=False
        )


@pytest.fixture
def cluster_factory(tmp_path: Path) -> Iterator[Callable[..., DevCluster]]:
    """Start real coordinator + agent processes over loopback mTLS; all are stopped after the test."""
    made: list[DevCluster] = []

    def make(agents: dict[str, dict[str, Path]], start: bool = True, **kw: object) -> DevCluster:
        c = DevCluster(tmp_path / f"cluster{len(made)}", agents, **kw)  # type: ignore[arg-type]
        made.append(c)
        if start:
            c.start()
        return c

    yield make
    for c in made:
        c.stop()


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """Mount a size-limited tmpfs (a disk that fills up) and unmount it afterwards."""
    mounts: list[Path] = []

    def mount(size_mib: int) -> Path:
        _require_root("a size-limited filesystem")
        d = tmp_path / f"smallfs{len(mounts)}"
        d.mkdir()
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(d)],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            pytest.fail(f"cannot mount a tmpfs at {d}: {r.stderr.strip()}", pytrace=False)
        mounts.append(d)
        return d

    yield mount
    for d in mounts:
        subprocess.run(["umount", "-l", str(d)], check=False)


@pytest.fixture
def ext4_fs(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """Mount a loop-mounted ext4 of `size_mib` (a disk that fills up, with ext4's own
    behaviour: delayed allocation, reserved blocks) and unmount it afterwards."""
    mounts: list[Path] = []

    def mount(size_mib: int) -> Path:
        _require_root("an ext4 image")
        if shutil.which("mkfs.ext4") is None:
            pytest.fail("mkfs.ext4 is missing (Debian package e2fsprogs)", pytrace=False)
        d = tmp_path / f"ext4-{len(mounts)}"
        d.mkdir()
        img = d.with_suffix(".img")
        with open(img, "wb") as f:
            f.truncate(size_mib << 20)
        for argv in (["mkfs.ext4", "-q", str(img)], ["mount", "-o", "loop", str(img), str(d)]):
            r = subprocess.run(argv, capture_output=True, text=True)
            if r.returncode != 0:
                pytest.fail(f"cannot {argv[0]} {img}: {r.stderr.strip()}", pytrace=False)
        mounts.append(d)
        return d

    yield mount
    for d in reversed(mounts):
        subprocess.run(["umount", "-l", str(d)], check=False)


from deploy.vaultdev import DevVault  # noqa: E402 - the Vault fixture's helper (no hvac import)


@pytest.fixture
def vault(tmp_path: Path) -> Iterator[DevVault]:
    """A real OpenBao dev server, already set up by `clawback vault setup` for agents node1 and node2.

    Yields a DevVault: `.server` (address, root_token, stop/start), `.setup` (the
    SetupResult: `.files["agent-node1" | "coordinator" | "restore"]` hold the
    role_id/secret_id files), `.operator` (an hvac client with the root token),
    `.operator_client` (a core.vault.VaultClient with it), `.settings`, and
    `.client_for(role)` / `.settings_for(role)` to log in as a role with a fresh
    response-wrapped secret_id. Starting and setting up takes well under a second.
    """
    dv = DevVault(tmp_path / "vault", ("node1", "node2"))
    try:
        yield dv
    finally:
        dv.close()
