"""The benchmark runner: clawback, restic and Borg back up and restore the same generated node volume.

    python -m bench.run [--quick] [--size 2G] [--repeat 3] [--seed 1] [--json FILE] [--keep]
                        [--workdir /var/tmp/clawback-bench] [--tools clawback restic borg cp]
                        [--no-install] [--drop-caches]

Each repetition generates the volume afresh (`bench.generate`, same seed, so
every repetition and every tool sees identical bytes), gives every tool a
fresh repository, then runs four measured steps, interleaved: each step is
done by every tool in turn before the next step starts, and the tool order
rotates by one per repetition. Before each tool's backup the data is read
once, untimed, and before its restore its repository (warm page cache).

1. `backup-full`: the first backup;
2. `backup-unchanged`: the same data again (the files cache at work);
3. `backup-mutated`: after `bench.generate.mutate`, applied once for all tools
   (5 % of small files rewritten, 1 % of the database's pages, logs appended,
   files added and deleted);
4. `restore`: the last snapshot into an empty directory; right after each
   tool's restore (before the next tool restores) it is verified byte for byte
   and by metadata with `bench.verify.compare_trees` (not timed) and removed.
   `cp` (`KernelCopy`) takes part in this step alone: `cp -a` of the source onto
   the same kind of fresh file system, the kernel's bound for a restore,
   measured in the same run.

Per step: wall time, throughput (source bytes / wall), CPU seconds of each
long-lived process of the tool (utime+stime from /proc/<pid>/stat, its
children included) and of the CLI processes the runner starts
(RUSAGE_CHILDREN), peak RSS of each (VmHWM from /proc/<pid>/status, reset at
the start of the step through /proc/<pid>/clear_refs, sampled every 0.2 s),
and repository size (du) after the step. The report gives per tool and step
the medians over the repetitions, and clawback's ratios to each peer and to
the faster peer; `--json` adds every raw sample.

A tool is anything with the `Tool` protocol's methods: clawback here, restic
and Borg in `bench.peers`. Missing peers are installed as `make bench-deps`
does (as root), or the run stops with a non-zero exit status.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import stat
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from bench.generate import Manifest, MutationSummary, generate, mutate, parse_size
from bench.verify import compare_trees, summarize

DEFAULT_WORKDIR = Path("/var/tmp/clawback-bench")
QUICK_SIZE = "200M"
DEFAULT_SIZE = "2G"
DEFAULT_REPEAT = 3
STEPS = ("backup-full", "backup-unchanged", "backup-mutated", "restore")

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


class ToolError(Exception):
    """A tool's command failed; the message says which and carries its stderr."""


class Tool(Protocol):
    """One backup program under test. Methods raise `ToolError` on failure; none is retried."""

    name: str

    def start(self, workdir: Path, source: Path) -> None:
        """Create an empty repository under `workdir` for backing up `source`, and start any daemons."""

    def backup(self) -> str:
        """Back up the source completely (return when the snapshot is durable); return its id."""

    def restore(self, snapshot: str, target: Path) -> None:
        """Restore `snapshot` into `target` (absent; its parent exists) and return when done."""

    def size(self) -> int:
        """Bytes the repository occupies on disk now."""

    def repository(self) -> Path:
        """What a restore reads: the repository's directory (warmed before the restore)."""

    def processes(self) -> dict[str, int]:
        """Long-lived processes to measure, role -> pid (empty for tools without daemons)."""

    def stop(self) -> None:
        """Stop the daemons (idempotent; also called after a failure)."""

    # Optional: `restored_path(target) -> Path`, where the source tree lies inside `target`
    # after `restore` when it is not `target` itself (restic and Borg keep the absolute path).


# --------------------------------------------------------------------------- /proc


def read_stat(pid: int) -> tuple[int, int] | None:
    """(ppid, utime+stime+cutime+cstime in ticks) of a live process, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = data[data.rindex(b")") + 2 :].split()
    # fields[0] is field 3 (state): ppid is field 4, utime..cstime are fields 14..17.
    return int(fields[1]), int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])


def _hwm(pid: int) -> int | None:
    """Peak resident set size (VmHWM) in bytes, or None when the process is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _cmdline(pid: int) -> bytes | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return None


def reset_hwm(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False when not permitted."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _process_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, cumulative CPU ticks) of every process."""
    table: dict[int, tuple[int, int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = read_stat(int(name))
            if st is not None:
                table[int(name)] = st
    return table


def _descendants(root: int, table: dict[int, tuple[int, int]]) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], list(children.get(root, ()))
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def disk_usage(path: Path) -> int:
    """Bytes allocated on disk under `path` (like `du -s --bytes` of blocks), each inode once."""
    total = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, _, filenames in os.walk(path):
        for name in [".", *filenames]:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def tree_bytes(path: Path) -> int:
    """Bytes of regular-file content under `path`, each inode once (what a backup must read)."""
    total = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


# --------------------------------------------------------------------------- metering


@dataclass
class StepResult:
    """One measured step of one tool."""

    step: str
    wall_s: float = 0.0
    source_bytes: int = 0
    mb_per_s: float = 0.0
    cpu_s: dict[str, float] = field(default_factory=dict)
    peak_rss_bytes: dict[str, int] = field(default_factory=dict)
    peak_rss_since_start: bool = False  # True when VmHWM could not be reset: peaks are since start
    repo_bytes: int | None = None
    snapshot: str | None = None
    error: str | None = None


class Meter:
    """Measures CPU and peak RSS of a tool's daemons (with their children) and of our child processes.

    Daemon CPU: utime+stime+cutime+cstime of the daemon and of its live descendants,
    at the start and at the end (a child that exits is counted through its parent's
    cutime). CLI CPU: our RUSAGE_CHILDREN delta (daemons started by us are only
    reaped when stopped, so during a step this is the CLI processes alone). Peaks:
    VmHWM, reset at the start, read at the end and sampled every `interval`
    seconds, so a CLI process that lives shorter than that may be missed (the
    `clawback ... --wait` commands last the whole step).
    """

    def __init__(
        self, daemons: dict[str, int], interval: float = 0.2, exclude: Iterable[int] = ()
    ) -> None:
        self.daemons = dict(daemons)
        self.exclude = set(exclude)  # other tools' daemons: neither ours nor "cli"
        self.interval = interval
        self.peaks: dict[str, int] = {}
        self.cpu: dict[str, float] = {}
        self.hwm_reset = True
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cpu0: dict[str, int] = {}
        self._ru0: resource.struct_rusage | None = None
        self._my_cmdline = _cmdline(os.getpid())

    def _roles(self, table: dict[int, tuple[int, int]]) -> dict[str, list[int]]:
        """role -> pids: each daemon with its descendants; our other descendants are "cli"."""
        roles: dict[str, list[int]] = {}
        daemon_pids: set[int] = set()
        for role, pid in self.daemons.items():
            pids = [pid, *_descendants(pid, table)] if pid in table else []
            roles[role] = pids
            daemon_pids.update(pids)
        others: set[int] = set()
        for pid in self.exclude - set(self.daemons.values()):
            if pid in table:
                others.update([pid, *_descendants(pid, table)])
        me = os.getpid()
        roles["cli"] = [
            p for p in _descendants(me, table) if p not in daemon_pids and p not in others
        ]
        return roles

    def _cpu(self, table: dict[int, tuple[int, int]]) -> dict[str, int]:
        roles = self._roles(table)
        return {
            role: sum(table[p][1] for p in pids if p in table)
            for role, pids in roles.items()
            if role != "cli"
        }

    def _sample(self) -> None:
        table = _process_table()
        for role, pids in self._roles(table).items():
            for pid in pids:
                if role == "cli" and _cmdline(pid) == self._my_cmdline:
                    continue  # forked but not yet exec'd: its VmHWM is still ours
                hwm = _hwm(pid)
                if hwm is None:
                    continue
                key = role if pid in self.daemons.values() or role == "cli" else f"{role}/children"
                self.peaks[key] = max(self.peaks.get(key, 0), hwm)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> Meter:
        table = _process_table()
        for pids in self._roles(table).values():
            for pid in pids:
                self.hwm_reset = reset_hwm(pid) and self.hwm_reset
        self._cpu0 = self._cpu(table)
        self._ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        self._thread = threading.Thread(target=self._run, name="bench-meter", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        self.cpu = {
            role: round((ticks - self._cpu0.get(role, 0)) / _CLK_TCK, 2)
            for role, ticks in self._cpu(_process_table()).items()
        }
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        assert self._ru0 is not None
        cli = (ru1.ru_utime + ru1.ru_stime) - (self._ru0.ru_utime + self._ru0.ru_stime)
        self.cpu["cli"] = round(cli, 2)
        # Not ru_maxrss: a forked child's high-water mark starts at our own RSS.


# --------------------------------------------------------------------------- tools


def _find_key(obj: Any, keys: tuple[str, ...]) -> Any:
    """The first value under one of `keys` anywhere in a JSON document (depth first), or None."""
    if isinstance(obj, dict):
        for k in keys:
            if obj.get(k):
                return obj[k]
        for v in obj.values():
            found = _find_key(v, keys)
            if found:
                return found
    elif isinstance(obj, list):
        for v in obj:
            found = _find_key(v, keys)
            if found:
                return found
    return None


def latest_snapshot(listing: Any, agent: str, source: str) -> str | None:
    """The newest snapshot id of `agent`/`source` in a `clawback snapshots --json` document."""
    items = listing.get("snapshots", listing) if isinstance(listing, dict) else listing
    if not isinstance(items, list):
        return None
    mine = [
        s
        for s in items
        if isinstance(s, dict)
        and s.get("agent", agent) == agent
        and s.get("source", source) == source
    ]

    def when(s: dict[str, Any]) -> Any:
        for k in ("finished_ns", "started_ns", "time", "finished", "started"):
            if k in s:
                return s[k]
        return 0

    mine.sort(key=when)
    for s in reversed(mine):
        sid = s.get("id") or s.get("snapshot_id")
        if sid:
            return str(sid)
    return None


class ClawbackTool:
    """clawback: a coordinator and one agent on loopback (mTLS, encryption, zstd) via deploy.devcluster."""

    name = "clawback"
    agent = "node1"
    source = "data"

    def __init__(self) -> None:
        self.cluster: Any = None

    def start(self, workdir: Path, source: Path) -> None:
        from deploy.devcluster import (
            DevCluster,
        )  # written alongside; imported late so --help works without it

        self.cluster = DevCluster(workdir, {self.agent: {self.source: source}})
        self.cluster.start()

    def _cli(self, *args: str, as_json: bool = False) -> str:
        # check=False: a failed command becomes a ToolError carrying its stderr, whatever
        # DevCluster would raise. The timeout is generous: big volumes on small machines.
        done = self.cluster.cli(*args, json=as_json, check=False, timeout=6 * 3600.0)
        if done.returncode != 0:
            detail = (done.stderr or done.stdout or "").strip()
            raise ToolError(f"clawback {' '.join(args)} exited {done.returncode}: {detail[-2000:]}")
        return str(done.stdout)

    def backup(self) -> str:
        out = self._cli(
            "backup", "--agent", self.agent, "--source", self.source, "--wait", as_json=True
        )
        try:
            sid = _find_key(json.loads(out), ("snapshot_id", "snapshot"))
        except json.JSONDecodeError:
            sid = None
        if isinstance(sid, str) and sid:
            return sid
        listing = json.loads(self._cli("snapshots", as_json=True))
        sid = latest_snapshot(listing, self.agent, self.source)
        if not sid:
            raise ToolError(f"backup finished but no snapshot is listed: {out.strip()[-500:]}")
        return sid

    def restore(self, snapshot: str, target: Path) -> None:
        self._cli("restore", snapshot, "--agent", self.agent, "--target", str(target), "--wait")

    def size(self) -> int:
        return disk_usage(self.repository())

    def repository(self) -> Path:
        return Path(self.cluster.repo_dir)

    def processes(self) -> dict[str, int]:
        procs = {"coordinator": int(self.cluster.coordinator_pid)}
        procs.update({f"agent:{name}": int(pid) for name, pid in self.cluster.agent_pids.items()})
        return procs

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None


def _restic() -> Tool:
    from bench.peers import ResticTool  # bench.peers imports this module

    return ResticTool()


def _borg() -> Tool:
    from bench.peers import BorgTool

    return BorgTool()


class KernelCopy:
    """The restore's bound: `cp -a` of the source onto the same kind of fresh file system the
    tools restore onto, verified like their restores. It takes part in the restore step only
    (it has no repository): what the kernel needs to create and write the volume's files,
    plus reading them from the page cache (its "repository" is the volume, warmed before it)."""

    name = "cp"
    steps = ("restore",)

    def start(self, workdir: Path, source: Path) -> None:
        self.source = source

    def backup(self) -> str:
        raise ToolError("cp -a takes part in the restore step only")

    def restore(self, snapshot: str, target: Path) -> None:
        r = subprocess.run(
            ["cp", "-a", "--", f"{self.source}/.", str(target)],
            capture_output=True,
            text=True,
            timeout=3600,
        )
        if r.returncode:
            raise ToolError(f"cp -a exited {r.returncode}: {r.stderr.strip()[-500:]}")

    def size(self) -> int:
        return 0

    def repository(self) -> Path:
        return self.source  # what it copies from

    def processes(self) -> dict[str, int]:
        return {}  # cp is our child: its CPU and peak are the "cli" role's

    def stop(self) -> None:
        pass


#: name -> factory. clawback first: it is the subject, then its peers, then the bound.
TOOLS: dict[str, Callable[[], Tool]] = {
    "clawback": ClawbackTool,
    "restic": _restic,
    "borg": _borg,
    "cp": KernelCopy,
}
PEERS = ("restic", "borg")
SUBJECT = "clawback"
BOUND = "cp"

#: The issue's acceptance ratios (clawback / the faster peer, by median wall time), for the report.
TARGET_RATIOS = {"backup-full": 0.6, "backup-unchanged": 0.5, "backup-mutated": 0.6, "restore": 0.8}
TARGET_REPO_VS_RESTIC = 1.05
TARGET_AGENT_RSS = 200 << 20


# --------------------------------------------------------------------------- the run


@dataclass
class ToolResult:
    tool: str
    steps: list[StepResult] = field(default_factory=list)
    verified: bool | None = None
    differences: list[str] = field(default_factory=list)
    difference_count: int = 0
    mutation: dict[str, Any] | None = None
    error: str | None = None
    repetition: int = 0
    position: int = 0  # this tool's place in the repetition's order (0 = ran each step first)


def _drop_caches() -> None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as exc:
        print(f"  (cannot drop caches: {exc.strerror})", file=sys.stderr)


def warm(path: Path) -> int:
    """Read every regular file under `path` once (an untimed pass that puts the data in the page cache)."""
    total = 0
    buf = bytearray(1 << 20)
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            p = os.path.join(dirpath, name)
            with suppress(OSError):
                if not stat.S_ISREG(os.lstat(p).st_mode):
                    continue
                with open(p, "rb", buffering=0) as f:
                    while n := f.readinto(buf):
                        total += n
    return total


def measure(
    tool: Tool,
    step: str,
    action: Callable[[], str | None],
    source_bytes: int,
    drop_caches: bool = False,
    exclude: Iterable[int] = (),
) -> StepResult:
    """Run one step of `tool` under a `Meter`; failures are recorded in the result, not raised.

    `exclude`: pids of other tools' daemons, which are also our children but not this tool's.
    """
    os.sync()  # writeback of the previous step must not be billed to this one
    if drop_caches:
        _drop_caches()
    result = StepResult(step=step, source_bytes=source_bytes)
    meter = Meter(tool.processes(), exclude=exclude)
    t0 = time.perf_counter()
    with meter:
        try:
            result.snapshot = action()
        except ToolError as exc:
            result.error = str(exc)
        except Exception as exc:  # a timeout, a bad answer: recorded, and the tool's run ends
            result.error = f"{type(exc).__name__}: {exc}"
    result.wall_s = round(time.perf_counter() - t0, 3)
    result.cpu_s = meter.cpu
    result.peak_rss_bytes = meter.peaks
    result.peak_rss_since_start = not meter.hwm_reset
    if result.wall_s > 0:
        result.mb_per_s = round(source_bytes / result.wall_s / 1e6, 1)
    if step != "restore":
        os.sync()
        try:
            result.repo_bytes = tool.size()
        except (ToolError, OSError) as exc:
            result.error = result.error or f"size: {exc}"
    return result


class RestoreFs:
    """Where a tool restores: a fresh ext4 of its own (loop-mounted image, as root), or a
    directory of the work dir.

    A restore creates ~40k files. On a file system where many files were just deleted (the
    previous repetition's data, repositories and restores), creating them is slowed by the
    deletions (ext4 without a journal scans recently deleted inodes on every allocation: up
    to 3x here), so restore times depended on what ran before. A fresh file system per
    restore measures every tool alike; it is torn down after verification.
    """

    def __init__(self, base: Path, size: int, fresh: bool, log: Callable[[str], None]) -> None:
        self.base = base
        self.image = base.with_name(base.name + ".img")
        self.mounted = False
        if fresh:
            try:
                self.image.unlink(missing_ok=True)
                with open(self.image, "wb") as f:
                    f.truncate(size)
                subprocess.run(
                    ["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                     str(self.image)],
                    check=True, capture_output=True, timeout=600,
                )  # fmt: skip
                base.mkdir(parents=True, exist_ok=True)
                subprocess.run(
                    ["mount", "-o", "loop", str(self.image), str(base)],
                    check=True, capture_output=True, timeout=60,
                )  # fmt: skip
                self.mounted = True
            except (OSError, subprocess.SubprocessError) as exc:
                err = getattr(exc, "stderr", b"") or b""
                log(f"no fresh file system for the restore ({exc} {err.decode(errors='replace').strip()}): "
                    "restoring into the work dir")  # fmt: skip
                self.image.unlink(missing_ok=True)
        # On the fresh file system, or beside it in the work dir (<tool>/restore, as before).
        self.target = base / "restore" if self.mounted else base.with_name("restore")

    def discard(self) -> None:
        """Remove the restore with its file system, and write back what is left (a step's
        writeback is not billed to the next)."""
        if not self.mounted:
            shutil.rmtree(self.target, ignore_errors=True)
        self.close()
        os.sync()

    def close(self) -> None:
        if self.mounted:
            subprocess.run(
                ["umount", str(self.base)], check=False, capture_output=True, timeout=120
            )
            self.mounted = False
        self.image.unlink(missing_ok=True)


def unmount_below(path: Path) -> list[Path]:
    """Unmount every file system mounted at or below `path`, deepest first (what a run with
    --keep left mounted); returns them. One that will not unmount raises ToolError."""
    root = os.path.realpath(path)
    points: list[Path] = []
    with suppress(OSError), open("/proc/self/mounts") as mounts:
        for line in mounts:
            # Spaces and other specials in mount points are octal escapes (\040).
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), line.split()[1])
            if point == root or point.startswith(root + "/"):
                points.append(Path(point))
    for point in sorted(points, key=lambda p: len(p.parts), reverse=True):
        r = subprocess.run(["umount", str(point)], capture_output=True, text=True, timeout=120)
        if r.returncode:
            raise ToolError(f"cannot unmount {point} (left by an earlier run): {r.stderr.strip()}")
    return points


def fresh_fs_possible() -> bool:
    """A fresh file system per restore needs root, mkfs.ext4 and loop devices."""
    return (
        os.geteuid() == 0
        and shutil.which("mkfs.ext4") is not None
        and Path("/dev/loop-control").exists()
    )


def restored_root(tool: Tool, target: Path) -> Path:
    """Where the source tree is inside `target` after a restore (peers keep the absolute path)."""
    fn = getattr(tool, "restored_path", None)
    return Path(fn(target)) if fn is not None else target


def _verify(
    tool: Tool,
    data: Path,
    fs: RestoreFs,
    res: ToolResult,
    tag: str,
    log: Callable[[str], None],
    keep: bool,
) -> None:
    """Compare a tool's restore with the source (untimed) into `res`; unless `keep`, remove it."""
    log(f"[{tag}] [{tool.name}] verifying the restore against the source")
    try:
        try:
            diffs = compare_trees(data, restored_root(tool, fs.target))
        except OSError as exc:
            diffs = [f".: restored tree unreadable: {exc}"]
        res.verified = not diffs
        res.difference_count = len(diffs)
        res.differences = diffs[:100]
        log(f"[{tag}] [{tool.name}] restore: {summarize(diffs)}")
    finally:
        if not keep:
            fs.discard()


def run_round(
    tools: list[Tool],
    workdir: Path,
    size: str | int,
    seed: int,
    repetition: int = 0,
    drop_caches: bool = False,
    log: Callable[[str], None] = print,
    keep_restores: bool = False,
    fresh_restore_fs: bool = False,
) -> tuple[list[ToolResult], Manifest]:
    """One repetition: generate the volume, then every step with each tool in turn, each on a fresh repository.

    Steps are interleaved (all tools do the full backup, then all the unchanged
    one, ...), in the order of `tools`; the volume is mutated once, between the
    second and third backups, so every tool backs up identical bytes. A tool
    that fails a step sits out the rest of the round. Each restore is verified
    (untimed) and removed before the next tool restores (kept with `keep_restores`).
    """
    data = workdir / "data"
    if data.exists():
        shutil.rmtree(data)
    for tool in tools:
        if (workdir / tool.name).exists():
            unmount_below(workdir / tool.name)  # a restore kept mounted by an earlier --keep
            shutil.rmtree(workdir / tool.name)
        (workdir / tool.name).mkdir(parents=True)
    tag = f"rep {repetition + 1}"
    log(f"[{tag}] generating {size} (seed {seed}) in {data}")
    manifest = generate(data, size, seed)
    log(
        f"[{tag}] {manifest.files} files, {manifest.total_bytes / 1e6:.1f} MB in {manifest.seconds:.1f} s; "
        f"order: {', '.join(t.name for t in tools)}"
    )
    results = {
        t.name: ToolResult(tool=t.name, repetition=repetition, position=i)
        for i, t in enumerate(tools)
    }
    snapshots: dict[str, list[str]] = {t.name: [] for t in tools}
    restore_fs: dict[str, RestoreFs] = {}
    live: list[Tool] = []
    try:
        for tool in tools:
            try:
                log(f"[{tag}] [{tool.name}] starting")
                tool.start(workdir / tool.name / "work", data)
                live.append(tool)
            except Exception as exc:
                traceback.print_exc()
                results[tool.name].error = f"start: {type(exc).__name__}: {exc}"
        active = list(live)
        for step in STEPS:
            if step == "backup-mutated":
                summary: MutationSummary = mutate(data, seed + 1)
                for r in results.values():
                    r.mutation = summary.to_json()
                log(
                    f"[{tag}] mutated: {summary.rewritten_files} rewritten, {summary.added_files} added, "
                    f"{summary.deleted_files} deleted, {summary.db_pages_changed} db pages, "
                    f"{summary.logs_appended} logs appended"
                )
            source_bytes = tree_bytes(data)
            for tool in list(active):
                name = tool.name
                if step not in getattr(tool, "steps", STEPS):
                    continue

                def backup(tool: Tool = tool) -> str:
                    sid = tool.backup()
                    snapshots[tool.name].append(sid)
                    return sid

                if not drop_caches:
                    # Before each tool, not once per step: this machine's page cache does not
                    # keep the volume (or a repository) through another tool's step (the host
                    # reclaims cold pages), which made whichever tool went first the fastest.
                    # A backup reads the volume; a restore its repository (the copy: the
                    # volume), so each restore measures its work and its writes.
                    warm(tool.repository() if step == "restore" else data)
                if step == "restore":  # made before the clock starts
                    restore_fs[name] = RestoreFs(
                        workdir / tool.name / "restore-fs",
                        2 * source_bytes + (1 << 30),
                        fresh_restore_fs,
                        log,
                    )

                def restore(tool: Tool = tool) -> str:
                    sid = snapshots[tool.name][-1] if snapshots[tool.name] else ""
                    tool.restore(sid, restore_fs[tool.name].target)
                    return sid

                others = [pid for t in live if t is not tool for pid in t.processes().values()]
                result = measure(
                    tool,
                    step,
                    restore if step == "restore" else backup,
                    source_bytes,
                    drop_caches,
                    exclude=others,
                )
                results[name].steps.append(result)
                log(
                    f"[{tag}] [{name}] {step}: {result.wall_s:.2f} s"
                    + (f"  ERROR {result.error}" if result.error else "")
                )
                if result.error:
                    results[name].error = f"{step}: {result.error}"
                    active.remove(tool)
                elif step == "restore":
                    # Verified and torn down before the next tool restores, so that every
                    # restore starts with the same free memory: a restore left mounted keeps
                    # its ~2 GB in the page cache twice (the file system's and its image's),
                    # and the next one paid for reclaiming it (cp -a: 3.3 s with free memory,
                    # 9 s after three restores).
                    fs = restore_fs[name] if keep_restores else restore_fs.pop(name)
                    _verify(tool, data, fs, results[name], tag, log, keep=keep_restores)
    except Exception as exc:  # the report must still be written; the traceback goes to stderr
        traceback.print_exc()
        for r in results.values():
            r.error = r.error or f"{type(exc).__name__}: {exc}"
    finally:
        for tool in tools:
            with suppress(Exception):
                tool.stop()
        if not keep_restores:
            for fs in restore_fs.values():
                fs.close()
    return [results[t.name] for t in tools], manifest


def run_tool(
    tool: Tool,
    workdir: Path,
    size: str | int,
    seed: int,
    drop_caches: bool = False,
    log: Callable[[str], None] = print,
) -> tuple[ToolResult, Manifest]:
    """One tool alone: generate the volume, back it up three times, restore it and verify the restore."""
    results, manifest = run_round(
        [tool], workdir, size, seed, drop_caches=drop_caches, log=log, keep_restores=True
    )
    return results[0], manifest


# --------------------------------------------------------------------------- statistics


def median(values: list[float]) -> float:
    v = sorted(values)
    n = len(v)
    if not n:
        raise ValueError("median of nothing")
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def _main_rss_role(roles: Iterable[str]) -> str | None:
    """The process compared with a peer's: the agent (what runs on the node), else the CLI."""
    roles = list(roles)
    agents = [r for r in roles if r.startswith("agent:")]
    return agents[0] if agents else ("cli" if "cli" in roles else None)


def summarize_results(results: list[ToolResult]) -> dict[str, dict[str, dict[str, Any]]]:
    """tool -> step -> medians over the successful repetitions (and the sample count `n`)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    by_tool: dict[str, list[ToolResult]] = {}
    for r in results:
        by_tool.setdefault(r.tool, []).append(r)
    for tool, runs in by_tool.items():
        out[tool] = {}
        for step in STEPS:
            samples = [s for r in runs for s in r.steps if s.step == step and not s.error]
            if not samples:
                continue
            roles = sorted({k for s in samples for k in s.cpu_s})
            rss_roles = sorted({k for s in samples for k in s.peak_rss_bytes})
            main_role = _main_rss_role(rss_roles)
            entry: dict[str, Any] = {
                "n": len(samples),
                "wall_s": round(median([s.wall_s for s in samples]), 3),
                "wall_s_samples": [s.wall_s for s in samples],
                "cpu_s": round(median([sum(s.cpu_s.values()) for s in samples]), 2),
                "cpu_s_by_process": {
                    role: round(median([s.cpu_s.get(role, 0.0) for s in samples]), 2)
                    for role in roles
                },
                "peak_rss_bytes_by_process": {
                    role: int(median([s.peak_rss_bytes.get(role, 0) for s in samples]))
                    for role in rss_roles
                },
                "peak_rss_bytes": (
                    int(median([s.peak_rss_bytes.get(main_role, 0) for s in samples]))
                    if main_role
                    else None
                ),
                "peak_rss_process": main_role,
                "mb_per_s": round(median([s.mb_per_s for s in samples]), 1),
                "source_bytes": samples[0].source_bytes,
            }
            repo = [s.repo_bytes for s in samples if s.repo_bytes is not None]
            entry["repo_bytes"] = int(median([float(x) for x in repo])) if repo else None
            out[tool][step] = entry
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return round(a / b, 3)


def compare(summary: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """step -> clawback's ratios to each peer and to the faster peer (by median wall time),
    and to the kernel's copy (`vs_bound`) where it was measured."""
    out: dict[str, dict[str, Any]] = {}
    mine = summary.get(SUBJECT, {})
    for step in STEPS:
        me = mine.get(step)
        peers = {p: summary[p][step] for p in PEERS if step in summary.get(p, {})}
        if not me or not peers:
            continue
        entry: dict[str, Any] = {}
        for p, other in peers.items():
            entry[p] = {
                "wall": _ratio(me["wall_s"], other["wall_s"]),
                "cpu": _ratio(me["cpu_s"], other["cpu_s"]),
                "peak_rss": _ratio(me["peak_rss_bytes"], other["peak_rss_bytes"]),
                "repo": _ratio(me["repo_bytes"], other["repo_bytes"]),
            }
        fastest = min(peers, key=lambda p: peers[p]["wall_s"])
        entry["faster_peer"] = fastest
        entry["vs_faster"] = entry[fastest]
        target = TARGET_RATIOS.get(step)
        wall = entry[fastest]["wall"]
        entry["target_wall"] = target
        entry["meets_wall"] = None if target is None or wall is None else wall <= target
        bound = summary.get(BOUND, {}).get(step)
        if bound:
            entry["vs_bound"] = {
                "wall": _ratio(me["wall_s"], bound["wall_s"]),
                "cpu": _ratio(me["cpu_s"], bound["cpu_s"]),
            }
        out[step] = entry
    return out


# --------------------------------------------------------------------------- reporting


def _mib(n: int | float | None) -> str:
    return "-" if n is None else f"{n / (1 << 20):.1f}"


def _short(role: str) -> str:
    return (
        "agent " + role.split(":", 1)[1]
        if role.startswith("agent:")
        else ("coord" if role == "coordinator" else role)
    )


def _grid(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def format_table(res: ToolResult) -> str:
    """A fixed-width table of one tool's steps: wall, MB/s, CPU and peak RSS per process, repo size."""
    roles: list[str] = []
    for s in res.steps:
        for role in [*s.cpu_s, *s.peak_rss_bytes]:
            if role not in roles:
                roles.append(role)
    head = ["step", "wall s", "MB/s"]
    head += [f"cpu {_short(r)}" for r in roles if any(r in s.cpu_s for s in res.steps)]
    head += [f"rss {_short(r)} MiB" for r in roles if any(r in s.peak_rss_bytes for s in res.steps)]
    head += ["repo MiB"]
    rows = [head]
    for s in res.steps:
        row = [s.step + (" (failed)" if s.error else ""), f"{s.wall_s:.2f}", f"{s.mb_per_s:.1f}"]
        row += [
            f"{s.cpu_s[r]:.2f}" if r in s.cpu_s else "-"
            for r in roles
            if any(r in x.cpu_s for x in res.steps)
        ]
        row += [
            _mib(s.peak_rss_bytes.get(r))
            for r in roles
            if any(r in x.peak_rss_bytes for x in res.steps)
        ]
        row += [_mib(s.repo_bytes)]
        rows.append(row)
    lines = _grid(rows)
    verdict = {
        True: "restore verified: identical",
        False: f"restore DIFFERS ({res.difference_count})",
        None: "",
    }
    tail = [verdict[res.verified]] if res.verified is not None else []
    if res.verified is False:
        tail += [f"  {d}" for d in res.differences[:5]]
    if res.error:
        lines_ = res.error.strip().splitlines() or [""]
        short = lines_[0] if len(lines_) == 1 else f"{lines_[0]} ... {lines_[-1]}"
        tail.append(f"error: {short[:300]} (in full in the JSON report)")
    title = f"== {res.tool}" + (f" (repetition {res.repetition + 1})" if res.repetition else "")
    return "\n".join([title, *lines, *tail])


def _x(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def format_summary(
    summary: dict[str, dict[str, dict[str, Any]]], ratios: dict[str, dict[str, Any]]
) -> str:
    """Per step: every tool's medians, then clawback's ratios to each peer and to the faster one."""
    out: list[str] = []
    tools = [t for t in TOOLS if t in summary] + [t for t in summary if t not in TOOLS]
    for step in STEPS:
        present = [t for t in tools if step in summary[t]]
        if not present:
            continue
        n = max(summary[t][step]["n"] for t in present)
        out.append(f"-- {step} (median of {n})")
        rows = [["tool", "wall s", "cpu s", "MB/s", "peak RSS MiB", "repo MiB"]]
        for t in present:
            e = summary[t][step]
            rss = ", ".join(
                f"{_short(r)} {_mib(v)}" for r, v in e["peak_rss_bytes_by_process"].items()
            )
            rows.append(
                [
                    t,
                    f"{e['wall_s']:.2f}",
                    f"{e['cpu_s']:.2f}",
                    f"{e['mb_per_s']:.1f}",
                    rss or "-",
                    _mib(e["repo_bytes"]),
                ]
            )
        out += _grid(rows)
        r = ratios.get(step)
        if r:
            for p in PEERS:
                if p in r:
                    q = r[p]
                    out.append(
                        f"{SUBJECT} / {p}: wall {_x(q['wall'])}, cpu {_x(q['cpu'])}, "
                        f"peak RSS {_x(q['peak_rss'])}, repo {_x(q['repo'])}"
                    )
            target = r["target_wall"]
            verdict = (
                ""
                if r["meets_wall"] is None
                else f" (target <= {target:.2f}x: {'met' if r['meets_wall'] else 'NOT met'})"
            )
            out.append(
                f"{SUBJECT} / faster peer ({r['faster_peer']}): wall {_x(r['vs_faster']['wall'])}{verdict}"
            )
            if "vs_bound" in r:
                out.append(
                    f"{SUBJECT} / {BOUND} -a onto a fresh file system (the kernel's bound): "
                    f"wall {_x(r['vs_bound']['wall'])}, cpu {_x(r['vs_bound']['cpu'])}"
                )
        out.append("")
    mine = summary.get(SUBJECT, {})
    agent_peaks = [
        v
        for e in mine.values()
        for role, v in e["peak_rss_bytes_by_process"].items()
        if role.startswith("agent:")
    ]
    if agent_peaks:
        top = max(agent_peaks)
        out.append(
            f"{SUBJECT} agent peak RSS (max over steps): {_mib(top)} MiB "
            f"(target <= {_mib(TARGET_AGENT_RSS)} MiB: {'met' if top <= TARGET_AGENT_RSS else 'NOT met'})"
        )
    last = "backup-mutated"
    if last in mine and last in summary.get("restic", {}):
        q = _ratio(mine[last]["repo_bytes"], summary["restic"][last]["repo_bytes"])
        if q is not None:
            out.append(
                f"{SUBJECT} repository / restic's after the last backup: {_x(q)} "
                f"(target <= {TARGET_REPO_VS_RESTIC:.2f}x: {'met' if q <= TARGET_REPO_VS_RESTIC else 'NOT met'})"
            )
    return "\n".join(out).rstrip()


def host_info() -> dict[str, Any]:
    mem = 0
    model = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_bytes": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def rotated(names: list[str], repetition: int) -> list[str]:
    """The tool order of a repetition: rotated by one each time, so no tool always goes first."""
    if not names:
        return names
    k = repetition % len(names)
    return names[k:] + names[:k]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"a smoke run: {QUICK_SIZE} of data, one repetition"
    )
    parser.add_argument(
        "--size", help=f"volume size (default {DEFAULT_SIZE}; {QUICK_SIZE} with --quick)"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        help=f"repetitions, each on fresh repositories; medians are reported (default {DEFAULT_REPEAT}; 1 with --quick)",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    parser.add_argument(
        "--keep", action="store_true", help="keep the data, repositories and restores"
    )
    parser.add_argument(
        "--tools", nargs="+", choices=list(TOOLS), default=list(TOOLS), help="default: all"
    )
    parser.add_argument(
        "--no-install",
        action="store_true",
        help="do not install missing peers (by default, as root, they are installed like `make bench-deps`)",
    )
    parser.add_argument(
        "--drop-caches", action="store_true", help="drop the page cache before each step"
    )
    parser.add_argument(
        "--restore-fs",
        choices=("fresh", "workdir"),
        help="restore onto a fresh loop-mounted ext4 per tool (default as root) or into the "
        "work dir",
    )
    args = parser.parse_args(argv)
    fresh = (args.restore_fs or ("fresh" if fresh_fs_possible() else "workdir")) == "fresh"
    size = args.size or (QUICK_SIZE if args.quick else DEFAULT_SIZE)
    repeat = args.repeat or (1 if args.quick else DEFAULT_REPEAT)
    if repeat < 1:
        parser.error("--repeat must be at least 1")
    try:
        parse_size(size)
    except ValueError as exc:
        parser.error(str(exc))
    names: list[str] = list(dict.fromkeys(args.tools))

    wanted_peers = [t for t in names if t in PEERS]
    versions: dict[str, str | None] = {}
    if wanted_peers:
        from bench.peers import ensure_peers, peer_versions

        problems = ensure_peers(wanted_peers, install=not args.no_install)
        if problems:
            for why in problems.values():
                print(f"error: {why}", file=sys.stderr)
            print(
                "error: the benchmark needs its peers; install them with `make bench-deps` "
                f"(or measure clawback alone with --tools {SUBJECT})",
                file=sys.stderr,
            )
            return 2
        versions = {k: v for k, v in peer_versions().items() if k in wanted_peers}

    args.workdir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "size": size,
        "seed": args.seed,
        "repeat": repeat,
        "drop_caches": args.drop_caches,
        "restore_fs": "fresh" if fresh else "workdir",
        "host": host_info(),
        "versions": versions,
        "steps": list(STEPS),
        "tools": names,
        "results": [],
    }
    tables: list[str] = []
    ok = True
    all_results: list[ToolResult] = []
    try:
        for rep in range(repeat):
            order = rotated(names, rep)
            tools = [TOOLS[n]() for n in order]
            results, manifest = run_round(
                tools,
                args.workdir,
                size,
                args.seed,
                rep,
                args.drop_caches,
                keep_restores=args.keep,
                fresh_restore_fs=fresh,
            )
            report["volume"] = manifest.to_json()
            for res in results:
                all_results.append(res)
                report["results"].append(asdict(res))
                tables.append(format_table(res))
                print("\n" + tables[-1] + "\n", flush=True)
                ok = ok and res.error is None and res.verified is True
    finally:
        summary = summarize_results(all_results)
        ratios = compare(summary)
        report["summary"] = summary
        report["ratios"] = ratios
        report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2) + "\n")
        if not args.keep:
            for name in ["data", *names]:
                shutil.rmtree(args.workdir / name, ignore_errors=True)
            with suppress(OSError):
                args.workdir.rmdir()
    v = report.get("volume", {})
    print(
        f"volume: {size}, seed {args.seed}: {v.get('files', 0)} files, {v.get('total_bytes', 0) / 1e6:.1f} MB; "
        f"{repeat} repetition(s); host: {report['host']['cpus']} CPUs, "
        f"{report['host']['memory_bytes'] / (1 << 30):.1f} GiB"
    )
    for name, version in versions.items():
        print(f"{name}: {version}")
    print()
    print(format_summary(summary, ratios))
    if not ok:
        print("\nSOME RUNS FAILED or restores differ: see the per-repetition tables above")
    if args.json:
        print(f"results written to {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
