"""The `clawback` CLI against a real coordinator: exit codes and messages on the paths operators hit."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from core.keys import create_key_file
from deploy.sample import make_tricky_tree

pytestmark = pytest.mark.integration


def test_repo_init_refuses_twice_and_never_touches_an_existing_key_file(
    cluster_factory, tmp_path: Path
) -> None:
    c = cluster_factory({"node1": {}}, start=False)
    c.write_configs()
    c.start_coordinator()
    c.key_file.parent.mkdir(parents=True)
    c.key_file.write_text("precious")
    r = c.cli("repo", "init", "--key-file", str(c.key_file), check=False)
    assert r.returncode == 9 and "already exists" in r.stderr
    assert c.key_file.read_text() == "precious"

    stray = tmp_path / "stray.key"
    r = c.cli(
        "repo", "init", "--key-file", str(stray), "--paged-chunker", "none", "--paged-files",
        "*.x", check=False,
    )  # fmt: skip
    assert r.returncode == 2 and "it is none" in r.stderr and not stray.exists()
    r = c.cli(
        "repo", "init", "--key-file", str(stray), "--paged-formats", "none", "--paged-formats",
        "bbolt", check=False,
    )  # fmt: skip
    assert r.returncode == 2 and "none stands alone" in r.stderr and not stray.exists()

    c.key_file.unlink()
    c.init_repository()
    info = c.cli_json("repo", "info")
    assert len(info["repo_id"]) == 32 and info["chunker"] == "fastcdc-256k"
    assert info["paged_chunker"] == "fixed-64k" and "*.db" in info["paged_files"]
    assert info["paged_formats"] == ["sqlite3", "bbolt"]
    assert "paged files:      fixed-64k for *.db, *.sqlite," in c.cli("repo", "info").stdout
    other = tmp_path / "other.key"
    r = c.cli("repo", "init", "--key-file", str(other), check=False)
    assert r.returncode == 6 and "already" in r.stderr
    assert not other.exists()  # the refused init leaves no stray key material


def test_ls_refuses_a_tampered_tree_and_a_wrong_key(cluster_factory, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tricky_tree(src)
    c = cluster_factory({"node1": {"data": src}})
    c.cli("backup", "--agent", "node1", "--wait")
    snap = c.cli_json("snapshots")[-1]
    assert "docs" in c.cli("ls", snap["id"][:8]).stdout

    wrong = tmp_path / "wrong.key"
    create_key_file(wrong)
    r = c.cli("ls", snap["id"][:8], "--key-file", str(wrong), check=False)
    assert r.returncode == 9 and "wrong.key" in r.stderr

    assert c.cli("ls", "ffffffff", check=False).returncode == 5

    with sqlite3.connect(f"file:{c.coord_dir / 'catalog.db'}?mode=ro", uri=True) as db:
        pack, offset, length = db.execute(
            'SELECT pack, "offset", length FROM blobs WHERE id = ?', (bytes.fromhex(snap["root"]),)
        ).fetchone()
    path = c.repo_dir / "data" / bytes(pack).hex()[:2] / bytes(pack).hex()
    data = bytearray(path.read_bytes())
    data[offset + length - 1] ^= 0x80
    path.write_bytes(bytes(data))
    r = c.cli("ls", snap["id"][:8], check=False)
    assert r.returncode == 11, r.stdout + r.stderr
    assert "checksum" in r.stderr or "authentication" in r.stderr


def test_operator_mistakes_get_clear_errors(cluster_factory, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    c = cluster_factory({"node1": {"data": src}, "node2": {}})
    c.cli("backup", "--agent", "node1", "--wait")
    snap = c.cli_json("snapshots")[-1]["id"]

    r = c.cli("restore", snap, "--agent", "node2", "--target", "relative/dir", check=False)
    assert r.returncode == 2 and "absolute" in r.stderr

    r = c.cli("backup", "--agent", "node1", "--source", "nosuch", check=False)
    assert r.returncode == 5 and "nosuch" in r.stderr

    c.stop_process("agent-node2")
    r = c.cli("restore", snap, "--agent", "node2", "--target", str(tmp_path / "t"), check=False)
    assert r.returncode == 4 and "node2" in r.stderr and "not connected" in r.stderr


def test_a_running_backup_is_cancelled_and_leaves_nothing_behind(
    cluster_factory, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "small").write_text("x")
    with open(src / "holes", "wb") as f:
        f.truncate(64 * 2**30)  # 64 GiB of zeros to read: the backup runs long enough
    c = cluster_factory({"node1": {"data": src}})
    [job] = c.cli_json("backup", "--agent", "node1")
    for _ in range(300):  # until it is reading
        info = c.cli_json("job", job["id"])
        if info["state"] == "running" and info["progress"]["bytes_done"] > 0:
            break
        time.sleep(0.1)
    assert info["state"] == "running", info

    r = c.cli("job", job["id"][:8], "--cancel", "--watch", check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "cancelling job" in r.stderr
    info = c.cli_json("job", job["id"])
    assert (info["state"], info["error"]) == ("cancelled", "cancelled")
    # The agent stops reading too: it lets go of the 64 GiB file instead of reading it out.
    fds = Path(f"/proc/{c.agent_pids['node1']}/fd")
    for _ in range(100):
        held = [fd for fd in fds.iterdir() if _target(fd) == str(src / "holes")]
        if not held:
            break
        time.sleep(0.05)
    assert not held
    assert c.cli_json("snapshots") == []  # no snapshot committed
    assert c.cli("check", check=False).returncode == 0  # nor anything half-written
    r = c.cli("job", job["id"], "--cancel")
    assert "had ended already: cancelled" in r.stdout
    assert c.cli("job", "ffffffff", "--cancel", check=False).returncode == 5

    # The agent goes on: the next backup of the same source (without the big file) commits.
    (src / "holes").unlink()
    c.cli("backup", "--agent", "node1", "--wait")
    [snap] = c.cli_json("snapshots")
    assert snap["stats"]["files"] == 1


def _target(fd: Path) -> str:
    try:
        return str(fd.readlink())
    except OSError:  # closed meanwhile
        return ""
