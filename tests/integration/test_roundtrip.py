"""Back up one agent, restore onto another, through real coordinator and agent processes over mTLS."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.verify import compare_trees
from deploy.sample import make_tricky_tree

pytestmark = pytest.mark.integration


def test_round_trip_preserves_content_and_metadata_across_agents(
    cluster_factory, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    assert make_tricky_tree(src, big_sparse_gib=3) == []
    c = cluster_factory({"node1": {"data": src}, "node2": {}})

    c.cli("backup", "--agent", "node1", "--source", "data", "--wait")
    snap = c.cli_json("snapshots")[-1]
    assert snap["agent"] == "node1" and snap["source"] == "data"

    target = tmp_path / "restored"
    c.cli("restore", snap["id"][:10], "--agent", "node2", "--target", str(target), "--wait")

    assert compare_trees(src, target) == []
    # The 3 GiB sparse file comes back sparse, not as 3 GiB of written zeros.
    st = os.stat(target / "big-sparse.img")
    assert st.st_size == 3 * 1024**3
    assert st.st_blocks * 512 < 64 * 1024 * 1024
    # Special files are listed too.
    listing = c.cli("ls", snap["id"][:10]).stdout
    assert "special.sock" in listing and "special-fifo" in listing


def test_restore_of_selected_paths(cluster_factory, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tricky_tree(src)
    c = cluster_factory({"node1": {"data": src}})
    c.cli("backup", "--agent", "node1", "--wait")
    snap = c.cli_json("snapshots")[-1]["id"]
    target = tmp_path / "part"
    c.cli("restore", snap, "docs", "links", "--agent", "node1", "--target", str(target), "--wait")
    assert sorted(os.listdir(target)) == ["docs", "links"]
    assert compare_trees(src / "docs", target / "docs") == []
    assert compare_trees(src / "links", target / "links") == []
