"""Where clawback's time goes: py-spy samples the agent and the coordinator during each benchmark step.

    python -m bench.profile [--size 2G] [--seed 1] [--out bench/results/profile]
                            [--py-spy PATH] [--rate 100] [--workdir /var/tmp/clawback-profile]

Generates the benchmark volume, starts clawback as `bench.run` does, and for
each step (full backup, unchanged backup, restore) records both processes
with `py-spy record --format raw --nonblocking --threads` (collapsed stacks,
idle samples left out: what is sampled is time spent running Python or native
code). Writes `<step>-<process>.txt` (the collapsed stacks, for flame graphs)
and prints the functions with the most samples, self and inclusive, per
process. The numbers are samples, not seconds: at `--rate` per second and
thread. Wall times here are inflated by the sampling and are not the
benchmark's.

py-spy is not a project dependency: `pip install py-spy` (or
`pip install --target DIR py-spy` and `--py-spy DIR/bin/py-spy`).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.generate import generate
from bench.run import ClawbackTool, warm

STEPS = ("backup-full", "backup-unchanged", "restore")


def _frame_name(frame: str) -> str:
    # py-spy raw frames look like "function (module/path.py:123)"; drop the line number.
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path = where.rsplit(":", 1)[0]
    for marker in ("site-packages/", "/work/main/", "python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{name} ({path})" if path else name


def top(raw: Path, n: int = 12) -> tuple[int, list[tuple[str, int]], list[tuple[str, int]]]:
    """(total samples, the `n` functions with the most self samples, ... most inclusive samples)."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        k = int(count)
        total += k
        frames = [_frame_name(f) for f in stack.split(";") if " (" in f]
        if frames:
            own[frames[-1]] += k
        for f in set(frames):
            incl[f] += k
    return total, own.most_common(n), incl.most_common(n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.profile", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--size", default="2G")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench/results/profile"))
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/clawback-profile"))
    parser.add_argument("--py-spy", default=shutil.which("py-spy") or "py-spy")
    parser.add_argument("--rate", type=int, default=100, help="samples per second")
    args = parser.parse_args(argv)
    if not shutil.which(args.py_spy) and not Path(args.py_spy).exists():
        print(f"error: py-spy not found ({args.py_spy}): pip install py-spy", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    if args.workdir.exists():
        shutil.rmtree(args.workdir)
    data = args.workdir / "data"
    print(f"generating {args.size} in {data}", flush=True)
    generate(data, args.size, args.seed)
    tool = ClawbackTool()
    try:
        tool.start(args.workdir / "clawback", data)
        warm(data)
        snapshot = ""
        for step in STEPS:
            spies = []
            for role, pid in tool.processes().items():
                out = args.out / f"{step}-{role.split(':')[0]}.txt"
                spies.append(
                    (
                        role,
                        out,
                        subprocess.Popen(
                            [
                                args.py_spy,
                                "record",
                                "--pid",
                                str(pid),
                                "--rate",
                                str(args.rate),
                                "--format",
                                "raw",
                                "--nonblocking",
                                "--threads",
                                "--output",
                                str(out),
                            ],
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE,
                        ),
                    )
                )
            time.sleep(1.0)  # py-spy attaches
            t0 = time.perf_counter()
            if step == "restore":
                tool.restore(snapshot, args.workdir / "restore")
            else:
                snapshot = tool.backup()
            wall = time.perf_counter() - t0
            for _, _, p in spies:
                p.send_signal(signal.SIGINT)
            for _, _, p in spies:
                p.wait(60)
            print(f"\n== {step}: {wall:.2f} s (sampled)")
            for role, out, p in spies:
                if not out.exists():
                    err = p.stderr.read().decode(errors="replace") if p.stderr else ""
                    print(f"-- {role}: no profile ({err.strip()[-300:]})")
                    continue
                total, own, incl = top(out)
                print(f"-- {role}: {total} samples ({total / args.rate:.1f} thread-s busy)")
                print("   self:")
                for name, k in own:
                    print(f"   {100 * k / max(total, 1):5.1f} %  {name}")
                print("   inclusive:")
                for name, k in incl:
                    print(f"   {100 * k / max(total, 1):5.1f} %  {name}")
    finally:
        tool.stop()
        shutil.rmtree(args.workdir, ignore_errors=True)
    print(f"\ncollapsed stacks in {args.out}/ (e.g. flamegraph.pl or speedscope)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
