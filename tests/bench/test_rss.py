"""bench.rss at a tiny size: a fresh and a 3x-filled repository, real coordinators and agents; the harness's numbers are checked for sanity, never for speed or size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import rss


@pytest.mark.integration
def test_rss_run_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "work"
    out = tmp_path / "rss.json"
    rc = rss.main(["--quick", "--factor", "3", "--workdir", str(work), "--json", str(out)])
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert rc == 0, (report.get("problems"), printed[-3000:])
    assert report["verified"] is True and report["problems"] == []
    assert report["steps"] == ["backup-full", "backup-changed"]
    volume = report["volume"]
    assert volume["files"] > 100 and volume["total_bytes"] > 1 << 20

    fresh, big = report["repositories"]["fresh"], report["repositories"]["big"]
    # The big repository really holds 3 volumes of other data; the fresh one nothing.
    assert big["fill_snapshots"] == 3 and big["fill_bytes"] > 2.5 * volume["total_bytes"]
    assert big["bytes_before"] > 2 * max(fresh["bytes_before"], 1 << 20)
    assert fresh["fill_snapshots"] == 0
    for repo in (fresh, big):
        assert repo["check_ok"] is True, repo["check_summary"]
        assert repo["idle_rss_bytes"] > 1 << 20
        assert [s["step"] for s in repo["steps"]] == report["steps"]
        for step, snap in zip(repo["steps"], repo["snapshots"], strict=True):
            assert step["error"] is None
            assert step["snapshot"] and snap["id"].startswith(step["snapshot"])
            assert snap["stats"]["files"] > 100 and snap["stats"]["errors"] == 0
            peak = step["peak_rss_bytes"][rss.AGENT_ROLE]
            assert isinstance(peak, int) and peak > 1 << 20
            assert step["peak_rss_since_start"] is False  # VmHWM was reset for the step
            assert step["repo_bytes"] > 0
    # The same volume went into both: the snapshots agree.
    assert [s["stats"]["files"] for s in fresh["snapshots"]] == [
        s["stats"]["files"] for s in big["snapshots"]
    ]
    assert set(report["ratios"]) == set(report["steps"])
    assert all(isinstance(r, float) and r > 0 for r in report["ratios"].values())

    assert "| backup-full | fresh |" in printed and "| backup-full | big |" in printed
    assert "big / fresh" in printed
    # Nothing left behind but the JSON: volume, fill and both repositories are removed.
    assert sorted(p.name for p in work.iterdir()) == []
