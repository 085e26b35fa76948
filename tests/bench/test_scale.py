"""bench.scale at a tiny size: a real coordinator on a 20k-entry index, three agents uploading; the harness's answers are checked, never its speed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bench import scale
from bench.scale import BATCH, SyntheticIndex, build_index, make_queries, parse_count
from coordinator.catalog import SqliteCatalog
from core.wire import read_bitmap

ENTRIES = 20_000


def test_parse_count() -> None:
    assert parse_count("20k") == 20_000
    assert parse_count("10M") == 10_000_000
    assert parse_count("1.5k") == 1_500
    with pytest.raises(ValueError):
        parse_count("ten")


def test_synthetic_index_and_queries_agree_with_the_catalog(tmp_path: Path) -> None:
    """The truth the benchmark checks answers against is what the built catalog holds."""
    db, meta = build_index(tmp_path / "cache", ENTRIES, seed=3, log=lambda _: None)
    assert meta["entries"] == ENTRIES and not meta["cached"]
    assert meta["packs"] == -(-ENTRIES // scale.BLOBS_PER_PACK)
    assert build_index(tmp_path / "cache", ENTRIES, seed=3, log=lambda _: None)[1]["cached"]

    index = SyntheticIndex(ENTRIES, seed=3)
    catalog = SqliteCatalog(db)
    try:
        assert catalog.count_blobs() == ENTRIES
        assert len(catalog.list_pack_ids()) == meta["packs"]
        edges = [0, 1, ENTRIES // 2, ENTRIES - 1]
        assert catalog.missing(index.ids_at(edges)) == [False] * len(edges)
        assert catalog.missing([os.urandom(32) for _ in range(50)]) == [True] * 50
        # Each entry sits in its pack at its recorded offset, with its recorded key.
        first = catalog.blob_locations(index.ids_at([0]))[index.ids_at([0])[0]]
        assert first.pack == index.pack_id(0) and first.offset == 0
        assert catalog.blob_key_ids(index.ids_at(edges)) <= set(index.key_ids)

        queries = make_queries(index, count=3, present=0.25, seed=3)
        for q in queries:
            ids = [q.ids[i : i + 32] for i in range(0, len(q.ids), 32)]
            assert len(ids) == BATCH
            expected = read_bitmap(q.expected, BATCH)
            assert sum(expected) == BATCH - BATCH // 4
            assert catalog.missing(ids) == expected
    finally:
        catalog.close()


@pytest.mark.integration
def test_scale_run_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    rc = scale.main(
        [
            "--entries",
            "20k",
            "--agents",
            "3",
            "--agent-mib",
            "2",
            "--callers",
            "1,2",
            "--duration",
            "0.3",
            "--pool",
            "4",
            "--workdir",
            str(tmp_path / "work"),
            "--json",
            str(out),
        ]
    )
    report = json.loads(out.read_text())
    assert rc == 0, report["problems"]
    assert report["verified"] and report["problems"] == []

    assert report["index"]["entries"] == ENTRIES
    assert [m["callers"] for m in report["missing"]] == [1, 2]
    for m in report["missing"]:
        assert m["requests"] > 0 and m["ids"] == m["requests"] * BATCH
        assert m["wrong_answers"] == 0
        assert m["meter"]["coord_peak_rss_bytes"] > 0

    up = report["upload"]
    assert up["agents"] == 3 and len(up["per_agent"]) == 3
    assert len({a["name"] for a in up["per_agent"]}) == 3
    for a in up["per_agent"]:
        assert a["error"] == ""
        assert a["blobs"] > 0 and a["stored"] == a["blobs"] and a["bytes_stored"] == a["bytes"]
        assert a["missing_before"] == a["blobs"] and a["missing_after"] == 0
    assert up["bytes"] == sum(a["bytes"] for a in up["per_agent"])
    pa = up["per_agent_mb_per_s"]
    assert 0 < pa["min"] <= pa["median"] <= pa["max"]
    assert report["coordinator"]["rss_after_start_bytes"] > 0
    assert "Coordinator scale" in scale.format_report(report)
    assert not (tmp_path / "work" / "run").exists()  # removed without --keep


def test_verification_catches_an_incomplete_upload(tmp_path: Path) -> None:
    """verify_catalog reports blobs an agent believes uploaded but the index lacks."""
    db, _ = build_index(tmp_path / "cache", 1000, seed=1, log=lambda _: None)
    key_file = tmp_path / "key"
    from core.keys import FileKeyProvider, create_key_file

    create_key_file(key_file)
    data = {"a": scale.seal_agent_data("a", key_file, 1.0, seed=1)}
    problems = scale.verify_catalog(
        db, tmp_path, 1000, data, FileKeyProvider(key_file).new_data_key().key_id
    )
    assert any("not indexed" in p for p in problems)
    assert any("expected 1,000 +" in p for p in problems)
