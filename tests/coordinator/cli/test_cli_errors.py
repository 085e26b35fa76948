"""The CLI without a coordinator to talk to: usage errors, an unreachable address, unreadable TLS files.

The CLI against a real coordinator is tested in tests/integration/test_cli.py."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from coordinator.cli.certs import create_dev_pki
from coordinator.cli.main import main
from protos.clawback.v1 import common_pb2

TREE = common_pb2.BLOB_TYPE_TREE


@pytest.fixture(autouse=True)
def _no_user_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CLAWBACK_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return create_dev_pki(tmp_path_factory.mktemp("pki"), agents=["node1"], admins=["admin"])


def _tls_flags(pki: dict) -> list[str]:
    a = pki["admins"]["admin"]
    return ["--ca", str(a.ca), "--cert", str(a.cert), "--key", str(a.key)]


def test_unknown_subcommand_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["frobnicate"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert main([]) == 2


def test_unreachable_coordinator_exits_4_naming_it(
    pki: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    address = f"127.0.0.1:{_free_port()}"
    start = time.monotonic()
    assert main(["--coordinator", address, *_tls_flags(pki), "snapshots"]) == 4
    assert time.monotonic() - start < 5
    err = capsys.readouterr().err
    assert err.startswith(f"clawback: coordinator at {address} is unreachable")


def test_unreadable_tls_file_exits_2(
    pki: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = _tls_flags(pki)
    flags[1] = str(tmp_path / "missing-ca.pem")
    assert main(["--coordinator", "127.0.0.1:1", *flags, "agents"]) == 2
    assert "missing-ca.pem" in capsys.readouterr().err
