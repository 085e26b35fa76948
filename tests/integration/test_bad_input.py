"""Bad input gets a clear error and loses nothing: damaged packs, wrong keys, strange certificates, escapes, full disks, bad configs."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

import pytest

from bench.verify import compare_trees
from coordinator.cli.certs import create_dev_pki
from core.chunkid import IdHasher
from core.keys import FileKeyProvider, create_key_file
from deploy.sample import make_tricky_tree

pytestmark = pytest.mark.integration


def _blob_location(catalog: Path, blob_id: bytes) -> tuple[str, int, int]:
    with sqlite3.connect(f"file:{catalog}?mode=ro", uri=True) as db:
        row = db.execute(
            'SELECT pack, "offset", length FROM blobs WHERE id = ?', (blob_id,)
        ).fetchone()
    assert row is not None, "blob not indexed"
    return bytes(row[0]).hex(), int(row[1]), int(row[2])


def test_flipped_byte_in_a_pack_is_named_and_only_its_file_fails(
    cluster_factory, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    # Under every chunker's minimum chunk (64 KiB for the default fastcdc-256k): one chunk each.
    (src / "victim.bin").write_bytes(os.urandom(60_000))
    (src / "survivor.bin").write_bytes(os.urandom(60_000))
    (src / "notes.txt").write_text("fine\n" * 1000)
    c = cluster_factory({"node1": {"data": src}, "node2": {}})
    c.cli("backup", "--agent", "node1", "--wait")
    snap = c.cli_json("snapshots")[-1]["id"]

    # Find the victim's (single) chunk with the key the test holds, and damage it in its pack.
    hasher = IdHasher(FileKeyProvider(c.key_file).id_key())
    blob_id = hasher.blob_id((src / "victim.bin").read_bytes())
    pack, offset, length = _blob_location(c.coord_dir / "catalog.db", blob_id)
    pack_path = c.repo_dir / "data" / pack[:2] / pack
    with open(pack_path, "r+b") as f:
        f.seek(offset + length // 2)
        b = f.read(1)
        f.seek(offset + length // 2)
        f.write(bytes([b[0] ^ 0x01]))

    check = c.cli("check", "--read-data", check=False)
    assert check.returncode == 11, check.stdout + check.stderr
    assert pack[:16] in check.stdout + check.stderr
    assert blob_id.hex()[:16] in check.stdout + check.stderr

    target = tmp_path / "restored"
    r = c.cli("restore", snap, "--agent", "node2", "--target", str(target), "--wait", check=False)
    assert r.returncode == 3, r.stdout + r.stderr  # partial
    assert "victim.bin" in r.stdout + r.stderr
    # The coordinator streams envelopes unchecked; the agent's AEAD refuses the damaged one.
    assert f"blob {blob_id.hex()[:16]}: authentication failed" in r.stdout + r.stderr
    assert not (target / "victim.bin").exists()
    assert (target / "survivor.bin").read_bytes() == (src / "survivor.bin").read_bytes()
    assert (target / "notes.txt").read_bytes() == (src / "notes.txt").read_bytes()


def test_agent_with_wrong_key_is_refused(cluster_factory, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    c = cluster_factory({"node1": {"data": src}})
    wrong = tmp_path / "wrong.key"
    create_key_file(wrong)
    cfg = c.write_agent_config("node1", {"data": src}, key_file=wrong)
    c.stop_process("agent-node1")
    proc = c.start_agent("node1", cfg)
    assert proc.wait(30) == 9
    log = c.log_tail("agent-node1")
    assert "key" in log and "does not belong" in log
    agents = {a["name"]: a for a in c.cli_json("agents")}
    assert not agents["node1"]["connected"]


def test_agent_with_untrusted_certificate_is_refused(cluster_factory, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    c = cluster_factory({"node1": {"data": src}})
    rogue = tmp_path / "rogue-pki"
    create_dev_pki(rogue, agents=["intruder"], admins=[], hosts=[], days=1)
    cfg = c.write_agent_config("intruder", {"data": src})
    text = cfg.read_text().replace(str(c.pki / "agent-intruder"), str(rogue / "agent-intruder"))
    cfg.write_text(text)
    c.start_agent("intruder", cfg)
    deadline = time.monotonic() + 20
    while (
        "TLS handshake was refused" not in c.log_tail("agent-intruder")
        and time.monotonic() < deadline
    ):
        time.sleep(0.2)
    assert "TLS handshake was refused" in c.log_tail("agent-intruder")  # the agent says why
    assert "CERTIFICATE_VERIFY_FAILED" in c.log_tail(
        "coordinator", 200
    )  # the coordinator refused it
    assert "intruder" not in {a["name"] for a in c.cli_json("agents")}
    assert (
        c.procs["agent-intruder"].poll() is None
    )  # it keeps retrying: the operator can fix the certificate


def test_restore_refuses_escapes(cluster_factory, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tricky_tree(src)
    c = cluster_factory({"node1": {"data": src}})
    c.cli("backup", "--agent", "node1", "--wait")
    snap = c.cli_json("snapshots")[-1]["id"]

    r = c.cli(
        "restore",
        snap,
        "../../etc",
        "--agent",
        "node1",
        "--target",
        str(tmp_path / "t1"),
        "--wait",
        check=False,
    )
    assert r.returncode != 0 and ".." in r.stdout + r.stderr

    # A symlink planted in the target must not redirect the restore outside it.
    target, outside = tmp_path / "t2", tmp_path / "outside"
    target.mkdir()
    outside.mkdir()
    os.symlink(outside, target / "docs")
    r = c.cli(
        "restore",
        snap,
        "--agent",
        "node1",
        "--target",
        str(target),
        "--overwrite",
        "--wait",
        check=False,
    )
    assert os.listdir(outside) == []
    assert r.returncode in (0, 3), r.stdout + r.stderr


def test_full_disk_on_coordinator_fails_cleanly_and_loses_nothing(
    cluster_factory, small_fs, tmp_path: Path
) -> None:
    small, big = tmp_path / "small", tmp_path / "big"
    small.mkdir()
    big.mkdir()
    (small / "a.txt").write_text("keep me\n" * 1000)
    (big / "huge.bin").write_bytes(os.urandom(48 * 1024 * 1024))
    repo = small_fs(24)
    c = cluster_factory(
        {"node1": {"small": small, "big": big}}, repo_dir=repo / "repo", pack_size_mib=4
    )
    c.cli("backup", "--agent", "node1", "--source", "small", "--wait")

    r = c.cli("backup", "--agent", "node1", "--source", "big", "--wait", check=False)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "disk full" in (r.stdout + r.stderr).lower()
    assert not any((repo / "repo" / "tmp").iterdir()) if (repo / "repo" / "tmp").exists() else True

    # What was stored before is intact and restorable.
    assert c.cli("check", "--read-data", check=False).returncode == 0
    snaps = c.cli_json("snapshots")
    assert [s["source"] for s in snaps] == ["small"]
    target = tmp_path / "restored"
    c.cli("restore", snaps[0]["id"], "--agent", "node1", "--target", str(target), "--wait")
    assert compare_trees(small, target) == []


def test_malformed_agent_config_names_file_key_and_reason(cluster_factory, tmp_path: Path) -> None:
    c = cluster_factory({"node1": {}}, start=False)
    c.write_configs()
    bad = tmp_path / "bad-agent.toml"
    bad.write_text(
        c.agent_config("node1").read_text() + '\n[[source]]\nname = "x"\npath = "relative/dir"\n'
    )
    proc = c.start_agent("bad", bad)
    assert proc.wait(30) == 2
    log = c.log_tail("agent-bad")
    assert str(bad) in log and "source[0].path" in log and "absolute" in log

    bad.write_text("[coordinator\naddress = 1\n")
    proc = c.start_agent("bad2", bad)
    assert proc.wait(30) == 2
    assert "not valid TOML" in c.log_tail("agent-bad2")


def test_backup_of_unknown_agent_is_a_clear_error(cluster_factory, tmp_path: Path) -> None:
    c = cluster_factory({"node1": {}})
    r = c.cli("backup", "--agent", "nosuch", "--wait", check=False)
    assert r.returncode in (4, 5), r.stderr
    assert "nosuch" in r.stderr
    out = c.cli("agents", json=True)
    assert [a["name"] for a in json.loads(out.stdout)] == ["node1"]
