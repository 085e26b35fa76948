"""Short-lived certificates from Vault PKI end to end: they rotate during a long backup without breaking it."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from bench.verify import compare_trees

pytestmark = pytest.mark.integration

CERT_TTL_S = 3  # renewals every ~2 s (2/3 of the lifetime)
BIG_FILES, BIG_FILE_MIB = 24, 64  # sized so the first backup outlasts two renewals
RENEWED = re.compile(r"certificate for node1 renewed, valid until (\S+)")
NEW_CONNECTIONS = r"new connections to \S+ use certificate generation (\d+)"
SERVING = r"serving certificate generation (\d+)"


def _generations(pattern: str, log: str) -> list[int]:
    """Every certificate generation `pattern` (with one `(\\d+)` group) names in `log`."""
    return [int(g) for g in re.findall(pattern, log)]


def _renewals(c) -> int:  # type: ignore[no-untyped-def]
    return len(RENEWED.findall(c.log_tail("agent-node1", 100_000)))


def test_certificates_rotate_during_a_long_backup(cluster_factory, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "small.txt").write_text("hello\n")
    for i in range(BIG_FILES):
        with open(src / f"big{i}.bin", "wb") as f:
            for _ in range(BIG_FILE_MIB // 16):
                f.write(os.urandom(16 * 1024 * 1024))
    c = cluster_factory(
        {"node1": {"data": src}},
        vault=True,
        vault_certs=True,
        cert_ttl=f"{CERT_TTL_S}s",
        workers=1,
    )
    # Every process's certificate comes from Vault PKI (no files configured).
    assert 'source = "vault"' in c.agent_config("node1").read_text()
    assert 'source = "vault"' in c.coordinator_config.read_text()
    assert 'source = "vault"' in c.cli_config.read_text()
    [agent] = c.cli_json("agents")
    assert agent["connected"]
    control_address = agent["address"]

    job_id = c.cli_json("backup", "--agent", "node1")[0]["id"]
    started, renewals_before = time.monotonic(), _renewals(c)
    state: dict = {}
    while time.monotonic() - started < 120:
        state = json.loads(c.cli("job", job_id, json=True).stdout)
        # The control stream stays up throughout: same connection, still connected.
        [agent] = c.cli_json("agents")
        assert agent["connected"] and agent["address"] == control_address
        if state["state"] != "running":
            break
        time.sleep(0.5)
    took = time.monotonic() - started
    assert state["state"] == "succeeded", json.dumps(state)
    renewed_during = _renewals(c) - renewals_before
    print(f"first backup: {took:.1f}s, {renewed_during} renewals of a {CERT_TTL_S}s certificate")
    assert took > CERT_TTL_S and renewed_during >= 2, (
        f"the backup took {took:.1f}s with {renewed_during} renewals: make it longer"
    )
    coordinator_log = c.log_tail("coordinator", 100_000)
    assert "certificate for coordinator renewed" in coordinator_log
    # Hot reload: the server moved on from its first certificate (any generation after 1,
    # however many renewals a slow machine fits into the backup).
    assert max(_generations(SERVING, coordinator_log), default=0) >= 2

    # The certificate the agent connected with has long expired: the next job dials a
    # new connection with the current certificate, and the control stream carries on.
    (src / "after.txt").write_text("written after the first certificate expired\n")
    before = c.log_tail("agent-node1", 100_000)
    c.cli("backup", "--agent", "node1", "--wait")
    log = c.log_tail("agent-node1", 100_000)
    dialled = _generations(NEW_CONNECTIONS, log[len(before) :])
    assert dialled and dialled[-1] > max(_generations(NEW_CONNECTIONS, before), default=1), (
        f"the second job dialled with generations {dialled}"
    )
    assert log.count("registered as node1") == 1, "the control stream was re-established"
    assert "coordinator session ended" not in log

    snap = c.cli_json("snapshots")[-1]["id"]
    target = tmp_path / "restored"
    c.cli("restore", snap, "--agent", "node1", "--target", str(target), "--wait")
    assert compare_trees(src, target) == []
    [agent] = c.cli_json("agents")
    assert agent["connected"] and agent["address"] == control_address
