"""bench.report: the Markdown of docs/performance.md from a `bench.run --json` report."""

from __future__ import annotations

from typing import Any

from bench.report import markdown


def _entry(walls: list[float]) -> dict[str, Any]:
    return {
        "wall_s": sorted(walls)[len(walls) // 2],
        "wall_s_samples": walls,
        "cpu_s": 1.0,
        "mb_per_s": 100.0,
        "peak_rss_bytes_by_process": {"cli": 50 << 20},
        "repo_bytes": 0,
    }


def _report() -> dict[str, Any]:
    summary = {
        "clawback": {
            "backup-full": _entry([10.0, 12.0, 9.0]),
            "restore": _entry([8.0, 9.0]),  # a repetition failed: nothing to pair
        },
        "restic": {
            "backup-full": _entry([20.0, 12.0, 10.0]),
            "restore": _entry([10.0, 10.0, 10.0]),
        },
    }
    q = {"wall": 0.5, "cpu": 0.5, "peak_rss": 1.0, "repo": 1.0}
    ratios = {
        step: {
            "restic": q,
            "vs_faster": q,
            "faster_peer": "restic",
            "meets_wall": True,
        }
        for step in ("backup-full", "restore")
    }
    return {
        "started": "2026-12-07T00:00:00+0000",
        "size": "2G",
        "seed": 1,
        "repeat": 3,
        "host": {"cpus": 2, "memory_bytes": 1 << 34, "kernel": "6", "python": "3.11"},
        "versions": {"restic": "restic 0.14.0"},
        "volume": {"files": 10, "total_bytes": 10**9},
        "summary": summary,
        "ratios": ratios,
    }


def test_ratios_are_also_paired_per_repetition() -> None:
    text = markdown(_report())
    assert "| backup-full | clawback | 10.00 (10.0/12.0/9.0) |" in text
    # 10/20, 12/12, 9/10: drift between repetitions cancels within each pair.
    assert "backup-full 0.50 / 1.00 / 0.90 (median 0.90x)" in text
    assert "restore 0." not in text  # samples of unequal counts are not paired
