"""A/B runs: one clawback step measured under several variants, alternating within one run.

    python -m bench.ab --variant NAME[:SETTING[,SETTING...]] --variant ... [--step restore]
                       [--rounds 3] [--size 2G] [--seed 1] [--peer restic] [--no-verify]
                       [--workdir /var/tmp/clawback-ab] [--json FILE] [--keep-processes]

This machine's speed drifts by 20-40 % within an hour (docs/performance.md), more than
most single changes are worth, so two variants measured in separate runs cannot be told
apart. Here every round measures every variant (and the peer) back to back, in an order
that rotates per round, and the report gives each variant's median and its ratio to the
first variant *within each round* (the median of those paired ratios): drift that hits a
whole round cancels out.

A SETTING is one of:

- `agent.SECTION.KEY=VALUE` or `coordinator.SECTION.KEY=VALUE`: a key of that process's
  TOML config (VALUE a TOML literal: `3`, `false`, `"x"`), e.g.
  `coordinator.repository.direct_io=false`, `agent.performance.workers=3`;
- `@DIR`: the code the processes run, a checkout of this repository (its path goes first on
  their PYTHONPATH): `--variant old:@/var/tmp/main-before --variant new` compares two
  versions of the code on the same cluster and data.

Before every measurement of the `restore` and `backup-unchanged` steps the coordinator and
the agent are restarted with the variant's config and code, so that every variant starts on
fresh processes. When only a change of variant restarted them, the round's first variant
ran on the processes that had just done the previous measurement and the second on fresh
ones; in a restore A/B the first position cost ~8-12 % (docs/performance.md, eleventh
pass). `--keep-processes` restarts only what a change of variant needs. Steps:

- `restore`: one backup, then each measurement restores it onto a fresh file system (as
  `bench.run` does, the repository warmed first) and verifies it byte for byte;
- `backup-unchanged`: one backup, then each measurement backs the unchanged volume up again;
- `backup-full`: each measurement starts a fresh cluster (a fresh repository) and backs up;
- `backup-mutated`: each measurement copies the volume (`cp -a`), starts a fresh cluster,
  backs the copy up (untimed), applies `bench.generate.mutate` to it (the same change every
  time: the seed is fixed) and measures the backup of the changed copy. A fresh repository
  each time, or an earlier round's upload of the same changed data would be deduplicated.

The peer (`--peer restic` or `borg`) is measured once per round, after the variants. The
run exits non-zero when a step fails or a restore differs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.generate import generate, mutate, parse_size
from bench.run import (
    ClawbackTool,
    RestoreFs,
    StepResult,
    Tool,
    fresh_fs_possible,
    host_info,
    measure,
    restored_root,
    rotated,
    tree_bytes,
    unmount_below,
    warm,
)
from bench.verify import compare_trees, summarize

STEPS = ("restore", "backup-unchanged", "backup-full", "backup-mutated")
DEFAULT_WORKDIR = Path("/var/tmp/clawback-ab")
PROCESSES = ("agent", "coordinator")
_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_BASE_PYTHONPATH = os.environ.get("PYTHONPATH", "")  # what a variant's tree goes in front of


class AbError(Exception):
    """A bad variant or a failed step; the message says which."""


@dataclass(frozen=True)
class Variant:
    """A name, TOML keys per process ((process, section, key) -> literal) and the code's tree."""

    name: str
    settings: dict[tuple[str, str, str], str] = field(default_factory=dict)
    tree: str | None = None


def parse_variant(spec: str) -> Variant:
    """`NAME[:SETTING,...]` (module docstring) into a Variant; AbError if malformed."""
    name, _, rest = spec.partition(":")
    if not name or not _KEY.match(name):
        raise AbError(f"variant {spec!r}: a name of letters, digits, '_' or '-' comes first")
    settings: dict[tuple[str, str, str], str] = {}
    tree: str | None = None
    for item in filter(None, (s.strip() for s in rest.split(","))):
        if item.startswith("@"):
            if not Path(item[1:], "agent").is_dir():
                raise AbError(f"variant {name}: {item[1:]!r} is not a checkout of clawback")
            tree = str(Path(item[1:]).resolve())
            continue
        where, eq, value = item.partition("=")
        parts = where.split(".")
        if not eq or len(parts) != 3 or parts[0] not in PROCESSES or not value.strip():
            raise AbError(
                f"variant {name}: {item!r} is not PROCESS.SECTION.KEY=VALUE "
                f"(PROCESS one of {', '.join(PROCESSES)})"
            )
        if not all(_KEY.match(p) for p in parts[1:]):
            raise AbError(f"variant {name}: {where!r}: sections and keys are bare TOML keys")
        settings[(parts[0], parts[1], parts[2])] = value.strip()
    return Variant(name, settings, tree)


def set_toml_key(text: str, section: str, key: str, value: str) -> str:
    """`text` (a TOML document) with `key = value` in table `[section]`: replaced where the
    key is set, else added at the table's start; the table is appended if it is missing."""
    lines = text.splitlines()
    header = re.compile(r"^\s*\[\s*([^\]]+?)\s*\]\s*$")
    start = next(
        (i for i, ln in enumerate(lines) if (m := header.match(ln)) and m[1] == section), None
    )
    if start is None:
        return text.rstrip("\n") + f"\n\n[{section}]\n{key} = {value}\n"
    end = next(
        (i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("[")), len(lines)
    )
    setting = re.compile(rf"^\s*{re.escape(key)}\s*=")
    for i in range(start + 1, end):
        if setting.match(lines[i]):
            lines[i] = f"{key} = {value}"
            break
    else:
        lines.insert(start + 1, f"{key} = {value}")
    return "\n".join(lines) + "\n"


@dataclass
class Sample:
    variant: str
    round: int
    wall_s: float
    cpu_s: float
    cpu_by_process: dict[str, float]
    peak_rss_mib: dict[str, float]
    verified: bool | None = None
    error: str = ""


def _sample(name: str, rnd: int, r: StepResult) -> Sample:
    return Sample(
        variant=name,
        round=rnd,
        wall_s=r.wall_s,
        cpu_s=round(sum(r.cpu_s.values()), 2),
        cpu_by_process=dict(r.cpu_s),
        peak_rss_mib={k: round(v / 2**20, 1) for k, v in r.peak_rss_bytes.items()},
        error=r.error or "",
    )


def paired_ratios(samples: list[Sample], base: str) -> dict[str, list[float]]:
    """Per variant, its wall time ÷ the base variant's in the same round (rounds where both
    succeeded)."""
    by_round: dict[int, dict[str, float]] = {}
    for s in samples:
        if not s.error and s.verified is not False:
            by_round.setdefault(s.round, {})[s.variant] = s.wall_s
    out: dict[str, list[float]] = {}
    for walls in by_round.values():
        if base not in walls or walls[base] <= 0:
            continue
        for name, wall in walls.items():
            out.setdefault(name, []).append(wall / walls[base])
    return out


def report(samples: list[Sample], names: list[str]) -> str:
    """The per-variant table: medians, spread, and the paired ratio to the first variant."""
    ratios = paired_ratios(samples, names[0])
    rows = [
        ["variant", "n", "wall s (median)", "min-max", "CPU s", "peak RSS MiB", f"÷ {names[0]}"]
    ]
    for name in names:
        ok = [s for s in samples if s.variant == name and not s.error and s.verified is not False]
        if not ok:
            rows.append([name, "0", "-", "-", "-", "-", "-"])
            continue
        walls = [s.wall_s for s in ok]
        peaks = [max(s.peak_rss_mib.values(), default=0.0) for s in ok]
        r = ratios.get(name)
        rows.append(
            [
                name,
                str(len(ok)),
                f"{statistics.median(walls):.2f}",
                f"{min(walls):.2f}-{max(walls):.2f}",
                f"{statistics.median(s.cpu_s for s in ok):.2f}",
                f"{max(peaks):.0f}",
                f"{statistics.median(r):.3f}x" if r else "-",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows
    )


class _Clawback:
    """The clawback cluster, kept running between measurements and restarted per variant."""

    def __init__(self, workdir: Path, data: Path, log: Callable[[str], None]) -> None:
        self.workdir, self.data, self.log = workdir, data, log
        self.tool = ClawbackTool()
        self.running: Variant | None = None
        self.pristine: dict[str, str] = {}
        self.snapshot = ""
        self.starts = 0

    def _paths(self) -> dict[str, Path]:
        c = self.tool.cluster
        return {"agent": c.agent_config(ClawbackTool.agent), "coordinator": c.coordinator_config}

    def start(self, v: Variant) -> None:
        _use_tree(v.tree)
        self.starts += 1
        self.tool.start(self.workdir / f"cluster{self.starts}", self.data)
        self.pristine = {p: path.read_text() for p, path in self._paths().items()}
        self.running = Variant("(default)")
        self.apply(v)

    def apply(self, v: Variant, fresh: bool = False) -> None:
        """Restart what runs differently under `v` than now (everything if `fresh`), with v's
        config and code."""
        assert self.running is not None
        c = self.tool.cluster
        restart = set(PROCESSES) if fresh or v.tree != self.running.tree else set()
        for proc in PROCESSES:
            mine = {k: val for k, val in v.settings.items() if k[0] == proc}
            theirs = {k: val for k, val in self.running.settings.items() if k[0] == proc}
            if mine != theirs:
                restart.add(proc)
        if not restart:
            self.running = v
            return
        _use_tree(v.tree)
        paths = self._paths()
        for proc in sorted(restart, reverse=True):  # the agent stops before the coordinator
            c.stop_process("agent-node1" if proc == "agent" else "coordinator")
        for proc in restart:
            text = self.pristine[proc]
            for (p, section, key), value in v.settings.items():
                if p == proc:
                    text = set_toml_key(text, section, key, value)
            paths[proc].write_text(text)
        if "coordinator" in restart:
            c.start_coordinator()
        if "agent" in restart:
            c.start_agent(ClawbackTool.agent)
        c.wait_agents([ClawbackTool.agent])
        self.running = v
        self.log(f"  [{v.name}] restarted: {', '.join(sorted(restart))}")

    def stop(self) -> None:
        self.tool.stop()
        self.running = None

    def discard(self) -> None:
        """Stop, and delete this cluster's repository (a 2G volume's is ~1.4 GB)."""
        self.stop()
        shutil.rmtree(self.workdir / f"cluster{self.starts}", ignore_errors=True)


def _use_tree(tree: str | None) -> None:
    """The processes started from now on run `tree`'s code (or the installed one)."""
    path = os.pathsep.join(p for p in (tree, _BASE_PYTHONPATH) if p)
    if path:
        os.environ["PYTHONPATH"] = path
    else:
        os.environ.pop("PYTHONPATH", None)


def _fresh_copy(data: Path, copy: Path) -> None:
    """`copy` made afresh from `data` with `cp -a` (owners, modes, times, links, xattrs)."""
    shutil.rmtree(copy, ignore_errors=True)
    done = subprocess.run(["cp", "-a", str(data), str(copy)], capture_output=True, text=True)
    if done.returncode:
        raise AbError(f"copying the volume failed: {done.stderr.strip()}")


def _changed(tool: Tool, source: Path, seed: int, size: int, name: str, rnd: int) -> Sample:
    """Back `source` up (untimed), apply the realistic change to it, measure the next backup."""
    warm(source)
    first = measure(tool, "backup-full", tool.backup, size)
    if first.error or not first.snapshot:
        return _sample(name, rnd, first)
    mutate(source, seed + 1)  # as bench.run does between its unchanged and mutated steps
    warm(source)
    return _sample(name, rnd, measure(tool, "backup-mutated", tool.backup, size))


def _restore_once(
    tool: Tool,
    snapshot: str,
    data: Path,
    fs_base: Path,
    size: int,
    verify: bool,
    name: str,
    rnd: int,
) -> Sample:
    fs = RestoreFs(fs_base, 2 * size + (1 << 30), fresh_fs_possible(), lambda m: None)
    try:
        warm(tool.repository())
        r = measure(tool, "restore", lambda: tool.restore(snapshot, fs.target), size)
        s = _sample(name, rnd, r)
        if verify and not s.error:
            diffs = compare_trees(data, restored_root(tool, fs.target))
            s.verified = not diffs
            if diffs:
                s.error = f"restore differs: {summarize(diffs)}"
        return s
    finally:
        fs.discard()


def run(
    variants: list[Variant],
    step: str,
    rounds: int,
    workdir: Path,
    size: str,
    seed: int,
    peer: str | None = None,
    verify: bool = True,
    log: Callable[[str], None] = print,
    fresh: bool = True,
) -> list[Sample]:
    """Measure `step` for every variant (and `peer`) in each of `rounds` rounds; `fresh`:
    restart the processes before every measurement (see the module's docstring)."""
    if step not in STEPS:
        raise AbError(f"unknown step {step!r} (one of {', '.join(STEPS)})")
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise AbError("variant names must differ")
    unmount_below(workdir)
    data = workdir / "data"
    marker = workdir / f"data-{parse_size(size)}-{seed}.done"
    if not marker.exists():
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
        log(f"generating {size} (seed {seed}) in {data}")
        generate(data, size, seed)
        marker.write_text("")
    for old in workdir.glob("cluster*"):
        shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(workdir / "peer", ignore_errors=True)
    nbytes = tree_bytes(data)
    samples: list[Sample] = []
    # backup-mutated backs up a copy, changed anew for every measurement.
    source = workdir / "mutated" if step == "backup-mutated" else data
    cw = _Clawback(workdir, source, log)
    peer_tool: Tool | None = None
    peer_snapshot = ""

    def note(s: Sample) -> None:
        samples.append(s)
        extra = (
            f" verify: {'identical' if s.verified else 'DIFFERS'}" if s.verified is not None else ""
        )
        log(f"round {s.round} {s.variant}: {s.wall_s:.2f} s, CPU {s.cpu_s:.2f} s{extra} {s.error}")

    try:
        if step in ("restore", "backup-unchanged"):
            cw.start(variants[0])
            warm(data)
            r = measure(cw.tool, "backup-full", cw.tool.backup, nbytes)
            if r.error or not r.snapshot:
                raise AbError(f"the first backup failed: {r.error}")
            cw.snapshot = r.snapshot
        if peer is not None:
            from bench.run import TOOLS

            peer_tool = TOOLS[peer]()
            if step in ("restore", "backup-unchanged"):
                peer_tool.start(workdir / "peer", data)
                warm(data)
                r = measure(peer_tool, "backup-full", peer_tool.backup, nbytes)
                if r.error or not r.snapshot:
                    raise AbError(f"{peer}'s first backup failed: {r.error}")
                peer_snapshot = r.snapshot
        for rnd in range(rounds):
            for v in rotated(variants, rnd):  # type: ignore[arg-type]
                if step == "backup-full":
                    cw.start(v)
                    warm(data)
                    note(_sample(v.name, rnd, measure(cw.tool, step, cw.tool.backup, nbytes)))
                    cw.discard()
                    continue
                if step == "backup-mutated":
                    _fresh_copy(data, source)
                    cw.start(v)
                    note(_changed(cw.tool, source, seed, nbytes, v.name, rnd))
                    cw.discard()
                    continue
                cw.apply(v, fresh=fresh)
                if step == "backup-unchanged":
                    warm(data)
                    note(_sample(v.name, rnd, measure(cw.tool, step, cw.tool.backup, nbytes)))
                else:
                    note(
                        _restore_once(
                            cw.tool,
                            cw.snapshot,
                            data,
                            workdir / "restore-fs",
                            nbytes,
                            verify,
                            v.name,
                            rnd,
                        )
                    )
            if peer_tool is not None:
                if step == "backup-mutated":
                    _fresh_copy(data, source)
                    shutil.rmtree(workdir / "peer", ignore_errors=True)
                    peer_tool.start(workdir / "peer", source)
                    note(_changed(peer_tool, source, seed, nbytes, peer, rnd))
                    peer_tool.stop()
                elif step == "backup-full":
                    shutil.rmtree(workdir / "peer", ignore_errors=True)
                    peer_tool.start(workdir / "peer", data)
                    warm(data)
                    note(_sample(peer, rnd, measure(peer_tool, step, peer_tool.backup, nbytes)))
                    peer_tool.stop()
                elif step == "backup-unchanged":
                    warm(data)
                    note(_sample(peer, rnd, measure(peer_tool, step, peer_tool.backup, nbytes)))
                else:
                    note(
                        _restore_once(
                            peer_tool,
                            peer_snapshot,
                            data,
                            workdir / "restore-fs",
                            nbytes,
                            verify,
                            peer,
                            rnd,
                        )
                    )
    finally:
        cw.stop()
        if peer_tool is not None:
            peer_tool.stop()
        _use_tree(None)
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", required=True, help="NAME[:SETTING,...]")
    parser.add_argument("--step", default="restore", choices=STEPS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", default="2G")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--peer", choices=("restic", "borg"))
    parser.add_argument("--no-verify", action="store_true", help="restores are not compared")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--json", type=Path, help="write every sample here")
    parser.add_argument(
        "--keep-processes",
        action="store_true",
        help="restart processes only when the variant changes, not before every measurement",
    )
    args = parser.parse_args(argv)
    try:
        variants = [parse_variant(v) for v in args.variant]
        if args.rounds < 1:
            raise AbError("--rounds must be at least 1")
        samples = run(
            variants,
            args.step,
            args.rounds,
            args.workdir,
            args.size,
            args.seed,
            peer=args.peer,
            verify=not args.no_verify,
            fresh=not args.keep_processes,
        )
    except AbError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    names = [v.name for v in variants] + ([args.peer] if args.peer else [])
    print(f"\n{args.step}, {args.size} (seed {args.seed}), {args.rounds} round(s):")
    print(report(samples, names))
    if args.json:
        doc: dict[str, Any] = {
            "step": args.step,
            "size": args.size,
            "seed": args.seed,
            "host": host_info(),
            "variants": [
                {
                    "name": v.name,
                    "settings": [f"{p}.{s}.{k}={val}" for (p, s, k), val in v.settings.items()],
                    "tree": v.tree,
                }
                for v in variants
            ],
            "samples": [asdict(s) for s in samples],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    failed = [s for s in samples if s.error]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
