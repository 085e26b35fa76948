"""Vault keys end to end: real OpenBao, coordinator and agents. Write-only agents, grants, a blind coordinator."""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path

import pytest

from bench.verify import compare_trees
from coordinator.cli.client import AdminClient
from core import errors
from core.chunkid import key_check
from core.tls import TlsFiles
from deploy.sample import make_tricky_tree

pytestmark = pytest.mark.integration


def _admin(c) -> AdminClient:  # type: ignore[no-untyped-def]
    pki = c.pki
    return AdminClient(
        c.address,
        TlsFiles(pki / "ca.pem", pki / f"admin-{c.admin}.pem", pki / f"admin-{c.admin}.key"),
    )


def _watch(c, job_id: str) -> dict:  # type: ignore[no-untyped-def]
    """The job's final state (the CLI exits non-zero for a failed job: that is expected here)."""
    out = json.loads(c.cli("job", job_id, "--watch", json=True, check=False).stdout)
    return out[-1] if isinstance(out, list) else out


def test_round_trip_dedup_and_grants_with_vault_keys(cluster_factory, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    make_tricky_tree(a)
    make_tricky_tree(b)
    shutil.copyfile(a / "random.bin", b / "random.bin")  # the same 3 MiB on both nodes
    c = cluster_factory({"node1": {"data": a}, "node2": {"data": b}}, vault=True)
    # repo init bound the repository to Vault's id key (the operator never reads the key itself).
    id_key = base64.b64decode(c.vault.client_for("restore").read_kv("clawback-kv", "id-key")["key"])
    assert c.cli_json("repo", "info")["key_check"] == key_check(id_key).hex()

    c.cli("backup", "--agent", "node1", "--wait")
    c.cli("backup", "--agent", "node2", "--wait")
    snaps = {s["agent"]: s for s in c.cli_json("snapshots")}
    one, two = snaps["node1"], snaps["node2"]
    # Each snapshot sealed its new blobs with its own data key; node2's deduplicated
    # blobs keep node1's key, so node2's snapshot needs both.
    assert len(one["key_ids"]) == 1 and set(one["key_ids"]) < set(two["key_ids"])
    assert two["stats"]["bytes_new"] < 0.05 * one["stats"]["bytes_new"]

    # The operator's CLI mints a single-use grant for this restore; node2 unwraps it.
    target = tmp_path / "restored"
    c.cli("restore", one["id"], "--agent", "node2", "--target", str(target), "--wait")
    assert compare_trees(a, target) == []
    assert "docs" in c.cli("ls", one["id"][:8]).stdout  # ls goes through a grant too

    # Without a grant a write-only agent cannot unwrap any data key.
    r = c.cli(
        "restore",
        one["id"],
        "--agent",
        "node1",
        "--target",
        str(tmp_path / "t2"),
        "--no-grant",
        "--wait",
        check=False,
    )
    assert r.returncode == 1, r.stdout + r.stderr
    assert "cannot unwrap data keys" in r.stdout + r.stderr


def test_a_grant_someone_else_unwrapped_is_refused(cluster_factory, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tricky_tree(src)
    c = cluster_factory({"node1": {"data": src}}, vault=True)
    c.cli("backup", "--agent", "node1", "--wait")
    snap = c.cli_json("snapshots")[-1]["id"]
    operator = c.vault.operator_client.with_token(c.operator_token)

    stolen = operator.mint_restore_grant(uses=8)
    operator.unwrap_grant(stolen)  # an interceptor got there first
    with _admin(c) as admin:
        job = admin.start_restore(snap, "node1", str(tmp_path / "t"), grant=stolen.encode())
    state = _watch(c, job.id)
    assert state["state"] == "failed"
    assert "already used or has expired" in state["error"]

    # A fresh grant restores exactly once: replaying the same grant on a second job fails.
    grant = operator.mint_restore_grant(uses=8).encode()
    with _admin(c) as admin:
        first = admin.start_restore(snap, "node1", str(tmp_path / "t3"), grant=grant)
        assert _watch(c, first.id)["state"] == "succeeded"
        replay = admin.start_restore(snap, "node1", str(tmp_path / "t4"), grant=grant)
    assert _watch(c, replay.id)["state"] == "failed"
    assert compare_trees(src, tmp_path / "t3") == []


def test_coordinator_holds_no_plaintext_and_no_key_material(
    cluster_factory, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    canary = b"clawback-canary-" + base64.b16encode(b"\x5a" * 24)
    (src / "canary.txt").write_bytes(canary * 3000)  # compressible: zstd alone would hide nothing
    c = cluster_factory({"node1": {"data": src}}, vault=True)
    c.cli("backup", "--agent", "node1", "--wait")

    restore = c.vault.client_for("restore")
    id_key = base64.b64decode(restore.read_kv("clawback-kv", "id-key")["key"])
    with _admin(c) as admin:
        wrapped = admin.list_keys()
    assert wrapped and all(k.provider == "vault-transit" for k in wrapped)
    data_keys = [
        restore.decrypt_datakey("clawback-transit", "clawback-data", k.wrapped.decode())
        for k in wrapped
    ]

    needles = [canary]
    for secret in [id_key, *data_keys]:
        needles += [secret, secret.hex().encode(), base64.b64encode(secret)]
    c.stop_process("coordinator")  # flush the logs and the catalog's WAL
    haystack = [p for p in c.coord_dir.rglob("*") if p.is_file()] + [c.logs / "coordinator.log"]
    for path in haystack:
        data = path.read_bytes()
        for n in needles:
            assert n not in data, f"{path} holds secret or plaintext material"

    coordinator_role = c.vault.client_for("coordinator")
    with pytest.raises(errors.PermissionDenied):
        coordinator_role.decrypt_datakey(
            "clawback-transit", "clawback-data", wrapped[0].wrapped.decode()
        )
    with pytest.raises(errors.PermissionDenied):
        coordinator_role.read_kv("clawback-kv", "id-key")


def test_key_rotation_keeps_old_snapshots_restorable(cluster_factory, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tricky_tree(src)
    c = cluster_factory({"node1": {"data": src}}, vault=True)
    c.cli("backup", "--agent", "node1", "--wait")
    old = c.cli_json("snapshots")[-1]
    with _admin(c) as admin:
        before = {k.key_id: k.wrapped for k in admin.list_keys()}
    assert all(w.startswith(b"vault:v1:") for w in before.values())

    c.cli("keys", "rotate", "--raise-min-version")  # rotate, rewrap every stored key, retire v1
    with _admin(c) as admin:
        after = {k.key_id: k.wrapped for k in admin.list_keys()}
    assert after.keys() == before.keys()
    assert all(w.startswith(b"vault:v2:") for w in after.values())

    (src / "after-rotation.txt").write_text("new data sealed with a v2-wrapped key\n")
    c.cli("backup", "--agent", "node1", "--wait")
    for snap, tree in ((old["id"], None), (c.cli_json("snapshots")[-1]["id"], src)):
        target = tmp_path / f"restore-{snap[:8]}"
        c.cli("restore", snap, "--agent", "node1", "--target", str(target), "--wait")
        if tree is not None:
            assert compare_trees(tree, target) == []
    assert not (tmp_path / f"restore-{old['id'][:8]}" / "after-rotation.txt").exists()
    assert (tmp_path / f"restore-{old['id'][:8]}" / "docs" / "readme.txt").exists()


def test_vault_outage_and_token_revocation(cluster_factory, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tricky_tree(src)
    c = cluster_factory({"node1": {"data": src}}, vault=True, vault_persistent=True)
    c.cli("backup", "--agent", "node1", "--wait")

    # Every token AppRole handed out is revoked: the agent logs in again and carries on.
    c.vault.operator_client.request("PUT", "sys/leases/revoke-prefix/auth/approle/login")
    c.cli("backup", "--agent", "node1", "--wait")
    assert "logging in again" in c.log_tail("agent-node1", 200)

    # A backup that already holds its data key finishes while Vault is down ...
    with open(src / "bulk.bin", "wb") as f:  # new data: long enough to still run when Vault stops
        for _ in range(128):
            f.write(os.urandom(4 * 1024 * 1024))
    job_id = json.loads(c.cli("backup", "--agent", "node1", json=True).stdout)[0]["id"]
    for _ in range(300):  # the data key is fetched before any file is read
        state = json.loads(c.cli("job", job_id, json=True).stdout)
        if state["progress"]["bytes_done"] or state["state"] != "running":
            break
    c.vault.server.stop()
    assert state["state"] == "running", "the backup ended before Vault stopped: make it longer"
    assert _watch(c, job_id)["state"] == "succeeded"
    # ... the next one fails fast, naming Vault ...
    r = c.cli("backup", "--agent", "node1", "--wait", check=False)
    assert r.returncode == 1 and "Vault" in r.stdout + r.stderr
    # ... and service resumes by itself once Vault is back.
    c.vault.server.start()
    c.cli("backup", "--agent", "node1", "--wait")
