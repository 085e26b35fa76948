"""Deduplication across agents and unchanged re-backups that read and upload (almost) nothing."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from agent.backup import RACY_WINDOW_NS
from bench.generate import generate
from bench.verify import compare_trees

pytestmark = pytest.mark.integration


def _repo_bytes(repo: Path) -> int:
    return sum(p.stat().st_size for p in (repo / "data").rglob("*") if p.is_file())


def test_same_data_from_two_agents_is_stored_once(cluster_factory, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    generate(a, "40M", seed=7)
    shutil.copytree(a, b, symlinks=True)
    c = cluster_factory({"node1": {"data": a}, "node2": {"data": b}})

    c.cli("backup", "--agent", "node1", "--wait")
    after_first = _repo_bytes(c.repo_dir)
    c.cli("backup", "--agent", "node2", "--wait")
    after_second = _repo_bytes(c.repo_dir)

    snaps = {s["agent"]: s for s in c.cli_json("snapshots")}
    assert snaps["node1"]["stats"]["bytes"] == snaps["node2"]["stats"]["bytes"] > 30_000_000
    # node2's data blobs all dedup against node1's: only its trees could be new.
    assert after_second - after_first < 0.02 * after_first
    assert snaps["node2"]["stats"]["bytes_new"] < 0.02 * snaps["node1"]["stats"]["bytes_new"]


def test_unchanged_rebackup_reads_and_uploads_nothing(cluster_factory, tmp_path: Path) -> None:
    src = tmp_path / "src"
    generate(src, "40M", seed=3)
    written = time.monotonic()
    c = cluster_factory({"node1": {"data": src}})
    # Files changed within the files cache's racy window of the first backup are read again
    # by the second (agent/backup.py RACY_WINDOW_NS): let the generated ones age past it.
    time.sleep(max(0.0, RACY_WINDOW_NS / 1e9 + 0.1 - (time.monotonic() - written)))
    c.cli("backup", "--agent", "node1", "--wait")
    before = _repo_bytes(c.repo_dir)
    c.cli("backup", "--agent", "node1", "--wait")
    first, second = c.cli_json("snapshots")[-2:]

    assert second["parent"] == first["id"]
    stats = second["stats"]
    assert stats["files"] == first["stats"]["files"] > 100
    assert (
        stats["files_unchanged"] == stats["files"]
    )  # every file came from the files cache, unread
    assert stats["bytes_new"] < 64 * 1024  # at most a changed tree
    assert _repo_bytes(c.repo_dir) - before < 64 * 1024


def test_repo_set_applies_to_the_next_backup(cluster_factory, tmp_path: Path) -> None:
    """`clawback repo set`: a compression change keeps every agent's files cache valid; a change
    of the paged-file policy makes the next backup read every file again, re-cuts the database
    by content, and what it stores restores identically."""
    src = tmp_path / "src"
    generate(src, "40M", seed=5)
    written = time.monotonic()
    c = cluster_factory({"node1": {"data": src}})
    time.sleep(max(0.0, RACY_WINDOW_NS / 1e9 + 0.1 - (time.monotonic() - written)))
    c.cli("backup", "--agent", "node1", "--wait")

    r = c.cli("repo", "set", check=False)
    assert r.returncode == 2 and "nothing to change" in r.stderr
    r = c.cli("repo", "set", "--compression", "zstd-3")
    assert "compression: zstd-3 (was zstd-1)" in r.stdout and "all its files" not in r.stderr
    assert c.cli_json("repo", "info")["compression"] == "zstd-3"
    c.cli("backup", "--agent", "node1", "--wait")
    stats = c.cli_json("snapshots")[-1]["stats"]
    assert stats["files_unchanged"] == stats["files"] > 100

    r = c.cli("repo", "set", "--paged-chunker", "none")
    assert "paged files: none (every file content-defined) (was fixed-64k for *.db," in r.stdout
    assert "reads all its files again" in r.stderr
    info = c.cli_json("repo", "set", "--paged-chunker", "none")  # again: no change, no error
    assert (info["paged_chunker"], info["paged_files"], info["paged_formats"]) == ("", [], [])
    c.cli("backup", "--agent", "node1", "--wait")
    stats = c.cli_json("snapshots")[-1]["stats"]
    assert stats["files_unchanged"] == 0  # the files cache's scope named the old policy
    # The database's content-defined chunks are new; every other file's chunks dedup.
    db = (src / "var/lib/appdb/main.db").stat().st_size
    assert 0 < stats["bytes_new"] <= db

    r = c.cli("repo", "set", "--paged-files", "*.x", check=False)
    assert r.returncode == 2 and "cuts no files on a grid" in r.stderr
    snap = c.cli_json("snapshots")[-1]["id"]
    target = tmp_path / "restored"
    c.cli("restore", snap, "--agent", "node1", "--target", str(target), "--wait")
    assert compare_trees(src, target) == []
