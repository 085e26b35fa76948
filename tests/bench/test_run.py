"""bench.run: the step loop, metering and reporting, driven with a stand-in tool (cp -a and a sleeping "daemon")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import run
from bench.run import (
    Meter,
    StepResult,
    ToolError,
    ToolResult,
    disk_usage,
    format_table,
    latest_snapshot,
)


class CopyTool:
    """Backs up with `cp -a` into numbered snapshot dirs; a sleeping child stands in for a daemon."""

    name = "copy"

    def __init__(self, fail_restore: bool = False) -> None:
        self.fail_restore = fail_restore
        self.daemon: subprocess.Popen[bytes] | None = None

    def start(self, workdir: Path, source: Path) -> None:
        self.repo = workdir / "repo"
        self.repo.mkdir(parents=True)
        self.source = source
        self.daemon = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])

    def backup(self) -> str:
        sid = f"snap{len(list(self.repo.iterdir()))}"
        subprocess.run(["cp", "-a", str(self.source), str(self.repo / sid)], check=True)
        return sid

    def restore(self, snapshot: str, target: Path) -> None:
        if self.fail_restore:
            raise ToolError("restore refused")
        subprocess.run(["cp", "-a", str(self.repo / snapshot), str(target)], check=True)

    def size(self) -> int:
        return disk_usage(self.repo)

    def repository(self) -> Path:
        return self.repo

    def processes(self) -> dict[str, int]:
        assert self.daemon is not None
        return {"daemon": self.daemon.pid}

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.kill()
            self.daemon.wait()
            self.daemon = None


def test_run_tool_end_to_end(tmp_path: Path) -> None:
    tool = CopyTool()
    res, manifest = run.run_tool(tool, tmp_path, "3M", seed=1, log=lambda _: None)
    assert res.error is None, res.error
    assert [s.step for s in res.steps] == list(run.STEPS)
    assert res.verified is True and res.differences == []
    assert res.mutation and res.mutation["rewritten_files"] > 0
    full, unchanged, mutated, restore = res.steps
    assert full.source_bytes == manifest.total_bytes
    assert 0 < full.repo_bytes < unchanged.repo_bytes < mutated.repo_bytes  # type: ignore[operator]
    assert restore.repo_bytes is None and restore.snapshot == mutated.snapshot == "snap2"
    for s in res.steps:
        assert s.wall_s > 0 and s.mb_per_s > 0
        assert set(s.cpu_s) == {"daemon", "cli"}
        assert s.peak_rss_bytes["daemon"] > 1 << 20
    assert tool.daemon is None  # stopped
    table = format_table(res)
    assert "backup-mutated" in table and "restore verified: identical" in table


def test_a_failing_step_stops_the_tool_and_is_reported(tmp_path: Path) -> None:
    res, _ = run.run_tool(CopyTool(fail_restore=True), tmp_path, "2M", seed=1, log=lambda _: None)
    assert res.error == "restore: restore refused"
    assert res.verified is None
    assert "(failed)" in format_table(res)


def test_meter_counts_cpu_and_peak_rss_of_a_daemon_and_its_children() -> None:
    busy = (
        "import subprocess, sys, time\n"
        "sys.stdin.readline()\n"
        "x = bytearray(64 << 20)\n"  # 64 MiB touched: RSS rises
        "subprocess.run([sys.executable, '-c', 'import time\\nt = time.process_time()\\n"
        "while time.process_time() - t < 0.3: pass'])\n"
        "t = time.process_time()\n"
        "while time.process_time() - t < 0.3: pass\n"
        "print('done', flush=True)\n"
        "time.sleep(60)\n"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", busy], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        time.sleep(0.3)
        with Meter({"d": p.pid}, interval=0.05) as m:
            assert p.stdin and p.stdout
            p.stdin.write("go\n")
            p.stdin.flush()
            assert p.stdout.readline() == "done\n"
            subprocess.run([sys.executable, "-c", "pass"], check=True)
        # 0.3 s own + 0.3 s in a child that exited (counted through cutime)
        assert m.cpu["d"] >= 0.5, m.cpu
        assert m.cpu["cli"] > 0
        assert m.peaks["d"] >= 64 << 20
        assert m.hwm_reset
    finally:
        p.kill()
        p.wait()


def test_latest_snapshot_parsing() -> None:
    listing = [
        {"id": "a1", "agent": "node1", "source": "data", "finished_ns": 5},
        {"id": "b2", "agent": "node1", "source": "data", "finished_ns": 9},
        {"id": "c3", "agent": "node2", "source": "data", "finished_ns": 99},
    ]
    assert latest_snapshot(listing, "node1", "data") == "b2"
    assert latest_snapshot({"snapshots": listing}, "node2", "data") == "c3"
    assert latest_snapshot([], "node1", "data") is None
    assert run._find_key({"job": {"state": "DONE", "snapshot_id": "x9"}}, ("snapshot_id",)) == "x9"


def test_main_writes_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(run.TOOLS, "copy", CopyTool)
    out = tmp_path / "r.json"
    rc = run.main(
        ["--size", "2M", "--workdir", str(tmp_path / "w"), "--json", str(out), "--tools", "copy"]
    )
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["results"][0]["tool"] == "copy" and report["results"][0]["verified"] is True
    assert report["volume"]["files"] > 0 and report["host"]["cpus"] == os.cpu_count()
    assert not (tmp_path / "w").exists()  # cleaned up without --keep


def test_format_table_handles_missing_values() -> None:
    res = ToolResult(
        tool="t", steps=[StepResult(step="backup-full", wall_s=1.0, cpu_s={"cli": 0.1})]
    )
    assert "backup-full" in format_table(res)


def test_the_kernel_copy_takes_part_in_the_restore_alone(tmp_path: Path) -> None:
    results, _ = run.run_round(
        [CopyTool(), run.KernelCopy()], tmp_path / "w", "2M", seed=3, log=lambda _: None
    )
    copy, bound = results
    assert [s.step for s in copy.steps] == list(run.STEPS)
    assert [s.step for s in bound.steps] == ["restore"]
    assert bound.error is None and bound.verified is True, bound.differences
    assert bound.steps[0].wall_s > 0 and "cli" in bound.steps[0].cpu_s


def test_restore_is_compared_with_the_kernel_copy() -> None:
    def result(tool: str, wall: float, cpu: float) -> ToolResult:
        step = StepResult(step="restore", wall_s=wall, cpu_s={"cli": cpu}, source_bytes=10**9)
        step.peak_rss_bytes = {"cli": 1 << 20}
        return ToolResult(tool=tool, steps=[step])

    summary = run.summarize_results(
        [result("clawback", 6.0, 9.0), result("restic", 5.0, 8.0), result("cp", 3.0, 3.0)]
    )
    ratios = run.compare(summary)
    assert ratios["restore"]["vs_bound"] == {"wall": 2.0, "cpu": 3.0}
    assert ratios["restore"]["faster_peer"] == "restic"  # the bound is not a peer
    text = run.format_summary(summary, ratios)
    assert "cp -a onto a fresh file system (the kernel's bound): wall 2.00x, cpu 3.00x" in text


def test_the_volume_is_warmed_before_each_backup_and_the_repository_before_each_restore(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []
    real = run.warm

    def counting(path: Path) -> int:
        calls.append(path)
        return real(path)

    monkeypatch.setattr(run, "warm", counting)
    run.run_round([CopyTool(), run.KernelCopy()], tmp_path / "w", "1M", seed=4, log=lambda _: None)
    # The volume before each of the tool's three backups, then the tool's repository before
    # its restore, and the volume again before the copy's (it copies from the volume).
    data, repo = tmp_path / "w" / "data", tmp_path / "w" / "copy" / "work" / "repo"
    assert calls == [data, data, data, repo, data]


def test_each_restore_is_verified_and_removed_before_the_next_tool_restores(
    tmp_path: Path,
) -> None:
    seen: list[bool] = []

    class WatchingCopy(run.KernelCopy):
        def restore(self, snapshot: str, target: Path) -> None:
            # The first tool's restore is gone (and its memory with it) when this one starts.
            seen.append((tmp_path / "w" / "copy" / "restore").exists())
            super().restore(snapshot, target)

    results, _ = run.run_round(
        [CopyTool(), WatchingCopy()], tmp_path / "w", "1M", seed=5, log=lambda _: None
    )
    assert seen == [False]
    assert all(r.verified is True for r in results), [r.differences for r in results]
    assert not (tmp_path / "w" / "cp" / "restore").exists()


def test_a_restore_left_mounted_by_keep_is_unmounted_by_the_next_run(tmp_path: Path) -> None:
    # A kept restore stays mounted (--keep); the next round must start anyway. A space in
    # the path: /proc/self/mounts writes it as \040.
    work = tmp_path / "w x"
    assert run.fresh_fs_possible(), "needs root, mkfs.ext4 and loop devices (as make bench)"
    (work / "copy").mkdir(parents=True)
    said: list[str] = []
    fs = run.RestoreFs(work / "copy" / "restore-fs", 64 << 20, True, said.append)
    assert fs.mounted, said
    fs.target.mkdir()
    try:
        results, _ = run.run_round([CopyTool()], work, "1M", seed=6, log=lambda _: None)
    finally:
        left = run.unmount_below(tmp_path)  # whatever happened, nothing stays mounted
    assert left == []  # the round unmounted the kept restore itself
    assert results[0].error is None and results[0].verified is True
