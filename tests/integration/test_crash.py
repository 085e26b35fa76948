"""SIGKILL the coordinator at random points during uploads: the repository stays valid and a retry re-sends nothing stored."""

from __future__ import annotations

import random
import sqlite3
import time
from pathlib import Path

import pytest

from bench.generate import generate
from bench.verify import compare_trees

pytestmark = pytest.mark.integration


def _indexed_blobs(catalog: Path) -> int:
    with sqlite3.connect(f"file:{catalog}?mode=ro", uri=True) as db:
        return int(db.execute("SELECT count(*) FROM blobs").fetchone()[0])


def test_coordinator_killed_during_uploads(cluster_factory, tmp_path: Path) -> None:
    src = tmp_path / "src"
    generate(src, "160M", seed=11)
    c = cluster_factory({"node1": {"data": src}}, pack_size_mib=2)
    rng = random.Random(20261121)

    for _ in range(3):
        c.cli("backup", "--agent", "node1")  # start, do not wait
        time.sleep(rng.uniform(0.2, 1.5))
        c.kill_coordinator()
        c.start_coordinator()
        c.wait_agents(["node1"])
        # Whatever was cut, the repository is consistent and every visible snapshot is whole.
        check = c.cli("check", "--read-data", check=False)
        assert check.returncode == 0, check.stdout + check.stderr

    before = _indexed_blobs(c.coord_dir / "catalog.db")
    c.cli("backup", "--agent", "node1", "--wait")
    after = _indexed_blobs(c.coord_dir / "catalog.db")
    snap = c.cli_json("snapshots")[-1]
    # The retry uploaded exactly the blobs that were not yet stored: every blob it sent was new to the index.
    assert snap["stats"]["blobs_new"] == after - before
    assert c.cli("check", "--read-data", check=False).returncode == 0

    target = tmp_path / "restored"
    c.cli("restore", snap["id"], "--agent", "node1", "--target", str(target), "--wait")
    assert compare_trees(src, target) == []
