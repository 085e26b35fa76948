"""The systemd units verify (or at least parse with the key settings) and the example configs load."""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
UNITS = {
    "clawback-agent.service": "/usr/bin/clawback-agent --config /etc/clawback/agent.toml",
    "clawback-coordinator.service": "/usr/bin/clawback-coordinator --config /etc/clawback/coordinator.toml",
}


def _unit(name: str) -> dict[str, dict[str, list[str]]]:
    """A unit file as section -> key -> values (an INI dialect with repeated keys, so not configparser)."""
    sections: dict[str, dict[str, list[str]]] = {}
    section = None
    for raw in (DEPLOY / "systemd" / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), "no continuation lines, please"
        if line.startswith("["):
            section = line.strip("[]")
            sections.setdefault(section, {})
            continue
        assert section is not None and "=" in line, line
        key, _, value = line.partition("=")
        sections[section].setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.mark.parametrize("name", UNITS)
def test_unit_key_settings(name: str) -> None:
    unit = _unit(name)
    assert set(unit) == {"Unit", "Service", "Install"}
    svc = unit["Service"]
    one = {k: v[-1] for k, v in svc.items()}
    assert one["Type"] == "notify"
    assert one["ExecStart"] == UNITS[name]
    assert one["Restart"] == "on-failure"
    assert one["NoNewPrivileges"] == "yes"
    assert (
        one["ProtectKernelTunables"]
        == one["ProtectKernelModules"]
        == one["ProtectControlGroups"]
        == "yes"
    )
    assert one["RestrictAddressFamilies"] == "AF_INET AF_INET6 AF_UNIX"
    assert one["LockPersonality"] == "yes"
    assert one["SystemCallFilter"] == "@system-service"
    assert "MemoryDenyWriteExecute" not in svc  # unsafe with ctypes/cffi closures
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    if name == "clawback-coordinator.service":
        assert one["User"] == "clawback"
        assert one["StateDirectory"] == "clawback"
        assert one["ProtectSystem"] == "strict"
        assert one["ProtectHome"] == "yes" and one["PrivateTmp"] == "yes"
        assert one["CapabilityBoundingSet"] == ""
    else:
        assert one.get("User", "root") == "root"
        assert one["StateDirectory"] == "clawback-agent"
        assert one["ProtectSystem"] == "full"
        assert set(one["CapabilityBoundingSet"].split()) == {
            "CAP_DAC_READ_SEARCH",
            "CAP_DAC_OVERRIDE",
            "CAP_CHOWN",
            "CAP_FOWNER",
            "CAP_FSETID",
            "CAP_MKNOD",
            "CAP_SYS_ADMIN",
        }
        assert "RestrictSUIDSGID" not in svc  # restores must recreate setuid/setgid files


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify insists that ExecStart= exists: point it at a stand-in executable.
    exe = tmp_path / "stand-in"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    paths = []
    for name, exec_start in UNITS.items():
        binary = exec_start.split()[0]
        text = (DEPLOY / "systemd" / name).read_text().replace(binary, str(exe))
        (tmp_path / name).write_text(text)
        paths.append(str(tmp_path / name))
    out = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *paths],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # Warnings (unknown keys, bad values) do not change the exit code: refuse any output.
    assert out.returncode == 0 and not out.stderr.strip() and not out.stdout.strip(), (
        out.stderr + out.stdout
    )


def test_example_configs_parse() -> None:
    agent = tomllib.loads((DEPLOY / "examples" / "agent.toml").read_text())
    assert set(agent) == {"agent", "coordinator", "tls", "keys", "source", "performance"}
    assert agent["keys"]["provider"] == "file" and agent["keys"]["file"]
    assert set(agent["tls"]) == {"ca", "cert", "key"}
    assert agent["performance"]["workers"] == 2
    for src in agent["source"]:
        assert src["kind"] == "volume" and src["driver"] == "none" and src["path"].startswith("/")

    coord = tomllib.loads((DEPLOY / "examples" / "coordinator.toml").read_text())
    assert set(coord) == {"coordinator", "repository", "catalog", "tls"}
    assert set(coord["coordinator"]) == {"listen", "data_dir", "heartbeat_interval_s", "log_level"}
    assert coord["repository"]["backend"] == "local" and coord["catalog"]["kind"] == "sqlite"
    assert isinstance(coord["repository"]["pack_size_mib"], int)


def test_example_configs_load_with_the_real_loaders() -> None:
    # The loaders refuse unknown keys: the examples must not drift from the code.
    agent_config = pytest.importorskip("agent.config")
    coordinator_config = pytest.importorskip("coordinator.config")
    a = agent_config.load_config(DEPLOY / "examples" / "agent.toml")
    assert [s.name for s in a.sources] == ["data", "etc"]
    c = coordinator_config.load_config(DEPLOY / "examples" / "coordinator.toml")
    assert c.repository.pack_size_mib == 32
