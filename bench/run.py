"""The benchmark runner: back up and restore a generated node volume with each tool, measuring every step.

    python -m bench.run [--quick] [--size 2G] [--seed 1] [--json FILE] [--keep]
                        [--workdir /var/tmp/clawback-bench] [--tools clawback] [--drop-caches]

For each tool, on a freshly generated volume (`bench.generate`, same seed, so
every tool sees identical bytes), four measured steps:

1. `backup-full`: the first backup;
2. `backup-unchanged`: the same data again (the files cache at work);
3. `backup-mutated`: after `bench.generate.mutate` (5 % of small files
   rewritten, 1 % of the database's pages, logs appended, files added and
   deleted);
4. `restore`: the last snapshot into an empty directory, then verified byte
   for byte and by metadata with `bench.verify.compare_trees` (not timed).

Per step: wall time, throughput (source bytes / wall), CPU seconds of each
long-lived process of the tool (utime+stime from /proc/<pid>/stat, its
children included) and of the CLI processes the runner starts
(RUSAGE_CHILDREN), peak RSS of each (VmHWM from /proc/<pid>/status, reset at
the start of the step through /proc/<pid>/clear_refs), and repository size
(du) after the step.

A tool is anything with the `Tool` protocol's methods; peers (restic, Borg)
are added to `TOOLS`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import stat
import sys
import threading
import time
import traceback
from collections.abc import Callable
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from bench.generate import Manifest, MutationSummary, generate, mutate, parse_size
from bench.verify import compare_trees, summarize

DEFAULT_WORKDIR = Path("/var/tmp/clawback-bench")
QUICK_SIZE = "200M"
DEFAULT_SIZE = "2G"
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

    def processes(self) -> dict[str, int]:
        """Long-lived processes to measure, role -> pid (empty for tools without daemons)."""

    def stop(self) -> None:
        """Stop the daemons (idempotent; also called after a failure)."""


# --------------------------------------------------------------------------- /proc


def _read_stat(pid: int) -> tuple[int, int] | None:
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


def _reset_hwm(pid: int) -> bool:
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
            st = _read_stat(int(name))
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

    def __init__(self, daemons: dict[str, int], interval: float = 0.2) -> None:
        self.daemons = dict(daemons)
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
        me = os.getpid()
        roles["cli"] = [p for p in _descendants(me, table) if p not in daemon_pids]
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
                self.hwm_reset = _reset_hwm(pid) and self.hwm_reset
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
        return disk_usage(Path(self.cluster.repo_dir))

    def processes(self) -> dict[str, int]:
        procs = {"coordinator": int(self.cluster.coordinator_pid)}
        procs.update({f"agent:{name}": int(pid) for name, pid in self.cluster.agent_pids.items()})
        return procs

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None


#: name -> factory; restic and Borg join here.
TOOLS: dict[str, Callable[[], Tool]] = {"clawback": ClawbackTool}


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


def _drop_caches() -> None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as exc:
        print(f"  (cannot drop caches: {exc.strerror})", file=sys.stderr)


def measure(
    tool: Tool,
    step: str,
    action: Callable[[], str | None],
    source_bytes: int,
    drop_caches: bool = False,
) -> StepResult:
    """Run one step of `tool` under a `Meter`; failures are recorded in the result, not raised."""
    os.sync()  # writeback of the previous step must not be billed to this one
    if drop_caches:
        _drop_caches()
    result = StepResult(step=step, source_bytes=source_bytes)
    meter = Meter(tool.processes())
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


def run_tool(
    tool: Tool,
    workdir: Path,
    size: str | int,
    seed: int,
    drop_caches: bool = False,
    log: Callable[[str], None] = print,
) -> tuple[ToolResult, Manifest]:
    """Generate the volume, then back it up three times and restore it with `tool`; verify the restore."""
    data = workdir / "data"
    tool_dir = workdir / tool.name
    for d in (data, tool_dir):
        if d.exists():
            shutil.rmtree(d)
    tool_dir.mkdir(parents=True)
    log(f"[{tool.name}] generating {size} (seed {seed}) in {data}")
    manifest = generate(data, size, seed)
    log(
        f"[{tool.name}] {manifest.files} files, {manifest.total_bytes / 1e6:.1f} MB in {manifest.seconds:.1f} s"
    )
    res = ToolResult(tool=tool.name)
    snapshots: list[str] = []

    def backup() -> str:
        sid = tool.backup()
        snapshots.append(sid)
        return sid

    def restore() -> str:
        tool.restore(snapshots[-1], tool_dir / "restore")
        return snapshots[-1]

    try:
        log(f"[{tool.name}] starting")
        tool.start(tool_dir / "work", data)
        for step in STEPS:
            if step == "backup-mutated":
                summary: MutationSummary = mutate(data, seed + 1)
                res.mutation = summary.to_json()
                log(
                    f"[{tool.name}] mutated: {summary.rewritten_files} rewritten, {summary.added_files} added, "
                    f"{summary.deleted_files} deleted, {summary.db_pages_changed} db pages, "
                    f"{summary.logs_appended} logs appended"
                )
            action = restore if step == "restore" else backup
            log(f"[{tool.name}] {step} ...")
            result = measure(tool, step, action, tree_bytes(data), drop_caches)
            res.steps.append(result)
            log(
                f"[{tool.name}] {step}: {result.wall_s:.2f} s"
                + (f"  ERROR {result.error}" if result.error else "")
            )
            if result.error:
                res.error = f"{step}: {result.error}"
                break
        else:
            log(f"[{tool.name}] verifying the restore against the source")
            diffs = compare_trees(data, tool_dir / "restore")
            res.verified = not diffs
            res.difference_count = len(diffs)
            res.differences = diffs[:100]
            log(f"[{tool.name}] restore: {summarize(diffs)}")
    except Exception as exc:  # the report must still be written; the traceback goes to stderr
        traceback.print_exc()
        res.error = f"{type(exc).__name__}: {exc}"
    finally:
        tool.stop()
    return res, manifest


# --------------------------------------------------------------------------- reporting


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / (1 << 20):.1f}"


def _short(role: str) -> str:
    return (
        role.split(":", 1)[1]
        if role.startswith("agent:")
        else ("coord" if role == "coordinator" else role)
    )


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
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    verdict = {
        True: "restore verified: identical",
        False: f"restore DIFFERS ({res.difference_count})",
        None: "",
    }
    tail = [verdict[res.verified]] if res.verified is not None else []
    if res.error:
        lines_ = res.error.strip().splitlines() or [""]
        short = lines_[0] if len(lines_) == 1 else f"{lines_[0]} ... {lines_[-1]}"
        tail.append(f"error: {short[:300]} (in full in the JSON report)")
    return "\n".join([f"== {res.tool}", *lines, *tail])


def _host() -> dict[str, Any]:
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "memory_bytes": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help=f"a smoke run on {QUICK_SIZE} of data")
    parser.add_argument(
        "--size", help=f"volume size (default {DEFAULT_SIZE}; {QUICK_SIZE} with --quick)"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    parser.add_argument(
        "--keep", action="store_true", help="keep the data, repositories and restores"
    )
    parser.add_argument("--tools", nargs="+", choices=sorted(TOOLS), default=sorted(TOOLS))
    parser.add_argument(
        "--drop-caches", action="store_true", help="drop the page cache before each step"
    )
    args = parser.parse_args(argv)
    size = args.size or (QUICK_SIZE if args.quick else DEFAULT_SIZE)
    try:
        parse_size(size)
    except ValueError as exc:
        parser.error(str(exc))

    args.workdir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "size": size,
        "seed": args.seed,
        "drop_caches": args.drop_caches,
        "host": _host(),
        "steps": list(STEPS),
        "results": [],
    }
    tables: list[str] = []
    ok = True
    try:
        for name in args.tools:
            res, manifest = run_tool(TOOLS[name](), args.workdir, size, args.seed, args.drop_caches)
            report["volume"] = manifest.to_json()
            report["results"].append(asdict(res))
            tables.append(format_table(res))
            print("\n" + tables[-1] + "\n", flush=True)
            ok = ok and res.error is None and res.verified is True
    finally:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2) + "\n")
        if not args.keep:
            for name in ["data", *args.tools]:
                shutil.rmtree(args.workdir / name, ignore_errors=True)
            with suppress(OSError):
                args.workdir.rmdir()
    v = report.get("volume", {})
    print(
        f"volume: {size}, seed {args.seed}: {v.get('files', 0)} files, {v.get('total_bytes', 0) / 1e6:.1f} MB; "
        f"host: {report['host']['cpus']} CPUs, {report['host']['memory_bytes'] / (1 << 30):.1f} GiB"
    )
    for t in tables:
        print(t)
    if args.json:
        print(f"results written to {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
